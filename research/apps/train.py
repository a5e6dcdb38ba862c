r"""Trains a cat detector with the custom loop; resumes if the run has a checkpoint.

  python -m research.apps.train --data_dir=data/cifar10 --model=scratch --run_name=scratch
  tensorboard --logdir logs
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "TFRecords folder written by make_tfrecords.")
flags.DEFINE_string("run_name", None, "Run name: checkpoints/<run_name>, logs/<run_name>.")
flags.DEFINE_string("model", "scratch", "Model name (see research.models.MODELS).")
flags.DEFINE_enum("objective", "multiclass", ["binary", "multiclass"],
                  "binary: one sigmoid logit for the positive class; multiclass: softmax over "
                  "the source classes, the detector score is P(positive class).")
flags.DEFINE_list("widths", ["64", "128", "256"], "Scratch CNN: channels per stage.")
flags.DEFINE_list("res_blocks", ["1", "0", "1"], "Scratch CNN: residual blocks per stage.")
flags.DEFINE_integer("stem_width", 32, "Scratch CNN: channels of the stem conv.")
flags.DEFINE_float("dropout", 0.0, "Dropout before the logits.")
flags.DEFINE_float("feature_scale", 0.125, "Scratch CNN: multiply the pooled features by this "
                   "before the logits layer (tames the loss spike of early training).")
flags.DEFINE_bool("pool_before_bn", True, "Scratch CNN: max-pool each stage's conv output "
                  "before BN and ReLU (20% faster on CPU; else conv-BN-ReLU-pool).")
flags.DEFINE_string("checkpoint_dir", "checkpoints", "Parent folder of run checkpoints.")
# --log_dir is absl.logging's own flag (it names where absl would put log files, which it
# does not do unless asked); we share it as the parent folder of TensorBoard logs.
FLAGS.set_default("log_dir", "logs")
flags.DEFINE_float("epochs", 20, "Epochs to train (ignored if --train_steps is set).")
flags.DEFINE_integer("train_steps", None, "Total optimizer steps.")
flags.DEFINE_integer("batch_size", 256, "Global batch size (divisible by the replicas).")
flags.DEFINE_integer("eval_batch_size", 1000, "Global eval batch size.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adamw"], "SGD with Nesterov momentum, or AdamW.")
flags.DEFINE_float("learning_rate", 0.2, "Peak learning rate after warmup.")
flags.DEFINE_float("warmup_epochs", 1.0, "Linear warmup length in epochs.")
flags.DEFINE_float("final_lr_fraction", 0.0, "Cosine decays to this fraction of the peak.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-3, "Decoupled weight decay (kernels only).")
flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing.")
flags.DEFINE_float("clip_norm", None, "Clip the global gradient norm to this.")
flags.DEFINE_enum("class_weighting", "none", ["none", "balanced"], "Per-example loss weights.")
flags.DEFINE_bool("rebalance", False, "Sample positives and negatives 50/50 in training.")
flags.DEFINE_bool("augment", True, "Random flip and pad-and-crop in training.")
flags.DEFINE_bool("tta", True, "Average the score over the image and its mirror in eval.")
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                  "auto: mixed_float16 on GPU, mixed_bfloat16 on CPUs with AMX/AVX512-BF16, "
                  "else float32.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
flags.DEFINE_integer("steps_per_loop", 50, "Steps per tf.function call.")
flags.DEFINE_integer("eval_every_steps", None, "Eval on val every N steps (default: epoch).")
flags.DEFINE_integer("checkpoint_every_steps", None, "Checkpoint every N steps "
                     "(default: at every eval).")
flags.DEFINE_integer("keep_checkpoints", 3, "Rolling checkpoints kept.")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "one_device", "mirrored",
                                       "multi_worker"], "tf.distribute strategy.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into N logical devices (N > 1 makes "
                     "--strategy=auto mirrored over them).")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation.")
flags.DEFINE_bool("deterministic", False, "Enable TF op determinism.")
flags.DEFINE_integer("patience", 0, "Stop after N evals without val PR-AUC gain (0: off).")
flags.DEFINE_bool("restart", False, "Delete the run's checkpoints and logs and start anew.")
flags.DEFINE_string("init_checkpoint", None, "Warm start the model (weights only) from here.")
flags.DEFINE_integer("stop_at_step", None, "Stop (resumably) at this step, as if preempted.")
flags.DEFINE_list("profile_steps", None, "a,b: record a profiler trace for steps [a, b).")
flags.DEFINE_integer("gradcam_images", 16, "Val images (half cats) whose Grad-CAM overlays "
                     "are logged to TensorBoard at every eval (0: off).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["data_dir", "run_name"])


def config_from_flags():
    from research.training.config import ConfigError, TrainConfig
    from research.training.loop import resolve_precision

    options = {}
    if FLAGS.model == "scratch":
        try:
            options = {"widths": tuple(int(w) for w in FLAGS.widths),
                       "res_blocks": tuple(int(r) for r in FLAGS.res_blocks),
                       "stem_width": FLAGS.stem_width, "dropout": FLAGS.dropout,
                       "pool_before_bn": FLAGS.pool_before_bn,
                       "feature_scale": FLAGS.feature_scale}
        except ValueError as e:
            raise ConfigError(f"--widths/--res_blocks must be integers: {e}") from e
    profile = None
    if FLAGS.profile_steps:
        if len(FLAGS.profile_steps) != 2:
            raise ConfigError("--profile_steps: want two steps a,b")
        profile = (int(FLAGS.profile_steps[0]), int(FLAGS.profile_steps[1]))
    return TrainConfig(
        data_dir=FLAGS.data_dir, run_name=FLAGS.run_name, model=FLAGS.model,
        model_options=options, objective=FLAGS.objective, checkpoint_dir=FLAGS.checkpoint_dir,
        log_dir=FLAGS.log_dir, epochs=FLAGS.epochs, train_steps=FLAGS.train_steps,
        batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
        optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
        warmup_epochs=FLAGS.warmup_epochs, final_lr_fraction=FLAGS.final_lr_fraction,
        momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
        label_smoothing=FLAGS.label_smoothing, clip_norm=FLAGS.clip_norm,
        class_weighting=FLAGS.class_weighting, rebalance=FLAGS.rebalance,
        augment=FLAGS.augment, tta=FLAGS.tta, precision=resolve_precision(FLAGS.precision),
        jit_compile=FLAGS.jit_compile, steps_per_loop=FLAGS.steps_per_loop,
        eval_every_steps=FLAGS.eval_every_steps,
        checkpoint_every_steps=FLAGS.checkpoint_every_steps,
        keep_checkpoints=FLAGS.keep_checkpoints, strategy=FLAGS.strategy,
        cpu_replicas=FLAGS.cpu_replicas, seed=FLAGS.seed, deterministic=FLAGS.deterministic,
        patience=FLAGS.patience, restart=FLAGS.restart, init_checkpoint=FLAGS.init_checkpoint,
        stop_at_step=FLAGS.stop_at_step, profile_steps=profile,
        gradcam_images=FLAGS.gradcam_images, progress=FLAGS.progress)


def main(argv):
    del argv
    from research.data.pipeline import DataError
    from research.training.config import ConfigError
    from research.training.loop import (NonFiniteLossError, configure_cpu_replicas,
                                        train_and_evaluate)

    try:
        cfg = config_from_flags()
        cfg.validate()  # before any TensorFlow work
        configure_cpu_replicas(cfg.cpu_replicas)
        summary = train_and_evaluate(cfg, flagfile=FLAGS.flags_into_string())
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    except NonFiniteLossError as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
