r"""Trains a cat detector with the custom loop; resumes if the run has a checkpoint.

  python -m research.apps.train --data_dir=data/cifar10 --model=scratch --run_name=scratch
  tensorboard --logdir logs

Every flag but the model's options comes from a field of `TrainConfig`; the model options
(--widths, --dropout, ...) come from the model's own options dataclass
(research.model_options.MODEL_OPTIONS). Defaults and help live there, not here.

Exit status: 0 trained (or already finished); 1 an error, named in one line; 75 preempted
(SIGTERM or SIGINT): a checkpoint was saved at the loop boundary, run the same command again.
"""

from __future__ import annotations

import json
import sys

from absl import flags, logging

from research import files
from research.apps import config_flags
from research.errors import UserError
from research.training.config import TrainConfig
from research.training.runlock import RunLock

FLAGS = flags.FLAGS
config_flags.define_train_flags()
config_flags.define_device_flags()
flags.mark_flags_as_required(["data_dir", "run_name"])


def config_from_flags() -> TrainConfig:
    return config_flags.train_config_from_flags()


def main(argv):
    del argv
    try:
        cfg = config_from_flags()
        cfg.validate()  # bad settings cost one line, before TensorFlow is even imported
        # A read-only or full folder is one line before anything is written (config.json).
        files.check_writable(cfg.checkpoint_dir, "--checkpoint_dir")
        files.check_writable(cfg.log_dir, "--log_dir")
        # A second process on the run is refused now, not after the imports (several workers
        # lock their own folders once the strategy says which worker is the chief).
        lock = RunLock(cfg.run_dir)
        if cfg.strategy != "multi_worker":
            lock.acquire()
    except UserError as e:
        config_flags.fail(e)
    try:
        config_flags.setup_devices(cfg.strategy, cfg.cpu_replicas)
        train(cfg)
    finally:
        lock.release()


def train(cfg: TrainConfig) -> None:
    """The training itself, once the flags are good and the run is ours."""
    # The heavy imports, deferred until the flags are known to be good and the lock is held.
    from research.explain.hooks import gradcam_actions
    from research.training.actions import NonFiniteLossError
    from research.training.loop import train_and_evaluate
    from research.training.preemption import PREEMPTED_EXIT, Preemption

    try:
        actions = gradcam_actions(cfg)
        with Preemption() as preemption:  # SIGTERM/SIGINT: checkpoint, then exit 75
            summary = train_and_evaluate(cfg, flagfile=FLAGS.flags_into_string(),
                                         actions=actions + [preemption])
    except UserError as e:
        config_flags.fail(e)
    except NonFiniteLossError as e:
        logging.error("%s", e)
        config_flags.fail(e)
    print(json.dumps(summary, indent=1))
    if preemption.stopped_at is not None:
        print(preemption.message(cfg), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    config_flags.run(main)
