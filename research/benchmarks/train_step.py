r"""Training throughput, measured in one run on the same model, data and batch:

1. the real training loop (`research.training.steps.make_train_loop`: a tf.function around
   strategy.run, `steps_per_loop` steps per call) against `model.fit` (the reference; used
   nowhere else in this codebase);
2. mixed_bfloat16 against float32 in the real loop (where the CPU runs bf16 natively);
3. Keras' BatchNormalization against our FusedBatchNorm, and XLA on/off (informational);
4. the real loop's GFLOP/s (FLOPs per image counted by research.models.flops) as a fraction of
   the attainable FP32 peak measured here (research.benchmarks.peak), per model.

  python -m research.benchmarks.train_step [--steps=60] [--batch_size=256] [--peak_matmul=4096]

Inputs are one fixed in-memory batch repeated, so the numbers measure the step, not tf.data.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import keras
import tensorflow as tf
from absl import app, flags

from research.benchmarks import peak
from research.benchmarks.ratios import Ratios
from research import devices
from research.machine import banner, has_fast_bf16, resolve_precision
from research.models.flops import count_flops
from research.training.config import TrainConfig
from research.training.model import make_model
from research.training.state import create_train_state, plan_steps
from research.training.steps import make_train_loop

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 60, "Timed steps per configuration (after warm-up).")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("steps_per_loop", 20, "Steps per tf.function call in the custom loop.")
flags.DEFINE_bool("extras", True, "Also time Keras BN and XLA variants.")
flags.DEFINE_bool("fast_row", True, "Also time the fast CNN (--model=fast) in the same loop.")
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16"],
                  "Precision of the loop and model.fit rows; auto: bf16 where the CPU runs it "
                  "natively (AMX / AVX512-BF16), as training does.")
flags.DEFINE_bool("bf16_row", None, "Time bf16 against fp32 (default: only where the CPU has "
                  "native bf16; elsewhere bf16 is emulated and very slow).")

MANIFEST = {"image_shape": [32, 32, 3], "class_names": [str(i) for i in range(10)],
            "positive_class": "3", "positive_class_id": 3}


def _config(precision: str, batch_size: int, jit: bool = False, model: str = "scratch"):

    return TrainConfig(data_dir="<in memory>", run_name="bench", model=model,
                       checkpoint_dir=tempfile.mkdtemp(prefix="bench-"), batch_size=batch_size,
                       precision=precision, jit_compile=jit, learning_rate=0.01,
                       weight_decay=0.0, label_smoothing=0.0, tta=False)


def _batches(batch_size: int):

    batch = {"image": tf.random.uniform([batch_size, 32, 32, 3]),
             "label": tf.random.uniform([batch_size], 0, 2, tf.int32),
             "class_id": tf.random.uniform([batch_size], 0, 10, tf.int32)}
    return tf.data.Dataset.from_tensors(batch).repeat()


def custom_loop_rate(precision: str, steps: int, batch_size: int, steps_per_loop: int,
                     keras_bn: bool = False, jit: bool = False, model: str = "scratch") -> float:
    """img/s of the real train loop (state, steps, metrics) on one fixed batch."""

    cfg = _config(precision, batch_size, jit, model)
    strategy = tf.distribute.get_strategy()
    plan = dataclasses.replace(plan_steps(cfg, {"splits": {"train": {
        "num_examples": batch_size * 100}}}), total_steps=10 ** 6)
    with strategy.scope():
        bn = {"bn_layer": keras.layers.BatchNormalization} if keras_bn else {}
        model = make_model(cfg, MANIFEST, **bn)
    state = create_train_state(cfg, strategy, MANIFEST, plan, model=model)
    loop = make_train_loop(cfg, state, MANIFEST["positive_class_id"], None)
    it = iter(strategy.experimental_distribute_dataset(_batches(batch_size)))
    loop(it, tf.constant(steps_per_loop))  # trace + warm up
    float(state.train_metrics["loss"].result())
    start = time.perf_counter()
    done = 0
    while done < steps:
        loop(it, tf.constant(steps_per_loop))
        done += steps_per_loop
    float(state.train_metrics["loss"].result())  # waits for the steps
    return done * batch_size / (time.perf_counter() - start)


def model_flops(model: str):
    """research.models.flops.Flops per image of the benchmark's network `model`."""
    return count_flops(make_model(_config("float32", 1, model=model), MANIFEST))


def fit_rate(precision: str, steps: int, batch_size: int) -> float:
    cfg = _config(precision, batch_size)
    model = make_model(cfg, MANIFEST)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=1)
    ds = _batches(batch_size).map(lambda b: (b["image"], b["class_id"]))
    model.fit(ds, steps_per_epoch=10, epochs=1, verbose=0)  # trace + warm up

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    return steps * batch_size / timer.seconds


def main(argv):
    del argv

    s, b, k = FLAGS.steps, FLAGS.batch_size, FLAGS.steps_per_loop
    print(banner())
    print(f"scratch CNN (ResNet-9-style, 1.65M params), batch {b}, {s} timed steps each")
    rows = []

    def row(name, rate):
        rows.append((name, rate))
        print(f"  {name:<46}{rate:>9,.0f} img/s", flush=True)
        return rate
    p = resolve_precision(FLAGS.precision, devices.current().capability)
    flops = {m: model_flops(m) for m in ("scratch", "fast")[:2 if FLAGS.fast_row else 1]}
    for m, f in flops.items():
        print(f"{m}: {f.forward / 1e9:.3f} GFLOP/img forward, {f.train_step / 1e9:.3f} "
              "training step (counted: research.models.flops)")
    fp32_peak = peak.measure_peak(bf16=p == "mixed_bfloat16" and has_fast_bf16())
    print(fp32_peak.describe(), flush=True)
    loop = row(f"custom loop, {p}", custom_loop_rate(p, s, b, k))
    fit = row(f"model.fit, {p} (reference)", fit_rate(p, s, b))
    print(f"custom loop / model.fit ({p}): {loop / fit:.2f}   (target >= 1.0)")
    ratios = Ratios("train_step")
    ratios.add(f"custom loop / model.fit ({p})", loop / fit, ">= 1.0",
               f"{loop:,.0f} vs {fit:,.0f} img/s")
    bf16_row = has_fast_bf16() if FLAGS.bf16_row is None else FLAGS.bf16_row
    if bf16_row:
        other = "float32" if p == "mixed_bfloat16" else "mixed_bfloat16"
        rate = row(f"custom loop, {other}", custom_loop_rate(other, s // 2, b, k // 2 or 1))
        bf16, fp32 = (loop, rate) if p == "mixed_bfloat16" else (rate, loop)
        print(f"bf16 / fp32 (custom loop):      {bf16 / fp32:.2f}")
        ratios.add("bf16 / fp32 (custom loop)", bf16 / fp32, "",
                   f"{bf16:,.0f} vs {fp32:,.0f} img/s")
    else:
        why = ("--bf16_row=false" if FLAGS.bf16_row is not None else
               "no fast bf16 here (no AMX / AVX512-BF16, or oneDNN capped below it)")
        print(f"bf16 / fp32: skipped ({why}; --bf16_row to time it anyway)")
        ratios.add("bf16 / fp32 (custom loop)", None, "", f"skipped: {why}")
    loops = {"scratch": peak.Achieved(flops["scratch"].train_step, loop, p)}
    if FLAGS.fast_row:
        fast = row(f"custom loop, {p}, fast CNN (--model=fast)",
                   custom_loop_rate(p, s // 2, b, k // 2 or 1, model="fast"))
        print(f"fast CNN / scratch CNN (img/s): {fast / loop:.2f}")
        ratios.add("fast CNN / scratch CNN, img/s per step", fast / loop, "",
                   f"{fast:,.0f} vs {loop:,.0f} img/s")
        loops["fast"] = peak.Achieved(flops["fast"].train_step, fast, p)
    print("\n".join(peak.train_step_rows(ratios, fp32_peak, loops)))
    if FLAGS.extras:
        keras_bn = row(f"custom loop, {p}, Keras BatchNormalization",
                       custom_loop_rate(p, s // 2, b, k // 2 or 1, keras_bn=True))
        xla = row(f"custom loop, {p}, jit_compile (XLA)",
                  custom_loop_rate(p, s // 2, b, k // 2 or 1, jit=True))
        print(f"FusedBatchNorm / Keras BN:      {loop / keras_bn:.2f}")
        print(f"no XLA / XLA:                   {loop / xla:.2f}")
        ratios.add("FusedBatchNorm / Keras BN", loop / keras_bn)
        ratios.add("no XLA / XLA", loop / xla)
    ratios.write()


if __name__ == "__main__":
    app.run(main)
