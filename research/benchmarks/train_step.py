r"""Training throughput, measured in one run on the same model, data and batch:

1. our custom loop (tf.function around strategy.run, `steps_per_loop` steps per call)
   against `model.fit` (the reference; used nowhere else in this codebase);
2. mixed_bfloat16 against float32 with our loop;
3. Keras' BatchNormalization against our FusedBatchNorm, and XLA on/off (informational).

  python -m research.benchmarks.train_step [--steps=60] [--batch_size=256]

Inputs are one fixed in-memory batch repeated, so the numbers measure the step, not tf.data.
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 60, "Timed steps per configuration (after warm-up).")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("steps_per_loop", 20, "Steps per tf.function call in the custom loop.")
flags.DEFINE_bool("extras", True, "Also time Keras BN and XLA variants.")


def _model(precision: str, keras_bn: bool = False):
    import keras

    from research.models import build_model
    from research.models import scratch

    dtype = None if precision == "float32" else precision
    if not keras_bn:
        return build_model("scratch", (32, 32, 3), 10, dtype=dtype)
    original = scratch.FusedBatchNorm
    scratch.FusedBatchNorm = lambda momentum, name, dtype: keras.layers.BatchNormalization(
        momentum=momentum, name=name, dtype=dtype)
    try:
        return build_model("scratch", (32, 32, 3), 10, dtype=dtype)
    finally:
        scratch.FusedBatchNorm = original


def custom_loop_rate(precision: str, steps: int, batch_size: int, steps_per_loop: int,
                     keras_bn: bool = False, jit: bool = False) -> float:
    import keras
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = _model(precision, keras_bn)
        opt = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
        opt.build(model.trainable_variables)
    x = tf.random.uniform([batch_size, 32, 32, 3])
    y = tf.random.uniform([batch_size], 0, 10, tf.int32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    it = iter(strategy.experimental_distribute_dataset(ds))

    @tf.function(jit_compile=jit or None)  # as in research.training.loop
    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_ex = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                  from_logits=True)
            loss = tf.nn.compute_average_loss(per_ex, global_batch_size=batch_size)
        return tape.gradient(loss, model.trainable_variables)

    def replica_step(batch):
        grads = forward_backward(*batch)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def loop(n):
        for _ in tf.range(n):
            strategy.run(replica_step, args=(next(it),))

    loop(tf.constant(steps_per_loop))  # trace + warm up
    start = time.perf_counter()
    done = 0
    while done < steps:
        loop(tf.constant(steps_per_loop))
        done += steps_per_loop
    float(opt.iterations.numpy())
    return done * batch_size / (time.perf_counter() - start)


def fit_rate(precision: str, steps: int, batch_size: int) -> float:
    import keras
    import tensorflow as tf

    model = _model(precision)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=1)
    x = tf.random.uniform([batch_size, 32, 32, 3])
    y = tf.random.uniform([batch_size], 0, 10, tf.int32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
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
    print(f"scratch CNN (ResNet-9-style, 1.65M params), batch {b}, {s} timed steps each")
    rows = []

    def row(name, rate):
        rows.append((name, rate))
        print(f"  {name:<46}{rate:>9,.0f} img/s", flush=True)
        return rate

    bf16 = row("custom loop, mixed_bfloat16", custom_loop_rate("mixed_bfloat16", s, b, k))
    fit = row("model.fit, mixed_bfloat16 (reference)", fit_rate("mixed_bfloat16", s, b))
    fp32 = row("custom loop, float32", custom_loop_rate("float32", s // 2, b, k // 2 or 1))
    if FLAGS.extras:
        row("custom loop, bf16, Keras BatchNormalization",
            custom_loop_rate("mixed_bfloat16", s // 2, b, k // 2 or 1, keras_bn=True))
        row("custom loop, bf16, jit_compile (XLA)",
            custom_loop_rate("mixed_bfloat16", s // 2, b, k // 2 or 1, jit=True))
    print(f"custom loop / model.fit (bf16): {bf16 / fit:.2f}   (target >= 1.0)")
    print(f"bf16 / fp32 (custom loop):      {bf16 / fp32:.2f}   (target >= 2.5)")
    if FLAGS.extras:
        print(f"FusedBatchNorm / Keras BN:      {bf16 / rows[3][1]:.2f}")
        print(f"no XLA / XLA:                   {bf16 / rows[4][1]:.2f}")


if __name__ == "__main__":
    app.run(main)
