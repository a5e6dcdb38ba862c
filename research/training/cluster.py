"""Several machines: MultiWorkerMirroredStrategy over TF_CONFIG.

Every worker runs the same loop and takes part in every collective (train steps,
evaluation, checkpoint saves). Only the chief writes the run: the others get a config whose
checkpoint and log folders are a private temporary folder, removed at exit, and read the
chief's run folder (the shared filesystem or gs:// path) to resume.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import tempfile

import tensorflow as tf

from research.training.config import ConfigError, TrainConfig


def check_tf_config(strategy_name: str) -> dict | None:
    """The parsed TF_CONFIG for --strategy=multi_worker (before any work), else None."""
    if strategy_name != "multi_worker":
        return None
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ConfigError("--strategy=multi_worker: TF_CONFIG is not set (see README, "
                          "'Several machines', or `python -m research.apps.launch_local`)")
    try:
        tf_config = json.loads(text)
        task, cluster = tf_config["task"], tf_config["cluster"]
        jobs = [j for j in ("chief", "worker") if j in cluster]
        if task["type"] not in jobs or not 0 <= int(task["index"]) < len(cluster[task["type"]]):
            raise ValueError(f"task {task} is not in the cluster {sorted(cluster)}")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--strategy=multi_worker: TF_CONFIG is not a valid cluster "
                          f"description ({e}): {text[:200]}") from None
    return tf_config


def task(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The chief task, or worker 0 when the cluster has no chief (TensorFlow's rule)."""
    task_type, task_id = task(strategy)
    if task_type in (None, "chief"):
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def num_workers(strategy: tf.distribute.Strategy) -> int:
    if task(strategy)[0] is None:
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(cluster.get(j, ())) for j in ("chief", "worker"))


def worker_config(cfg: TrainConfig, strategy: tf.distribute.Strategy) -> TrainConfig:
    """`cfg` for the chief; for another worker, the same run written into a private
    temporary folder (TensorFlow needs every worker to save; only the chief's copy is kept)."""
    if is_chief(strategy):
        return cfg
    task_type, task_id = task(strategy)
    tmp = tempfile.mkdtemp(prefix=f"{cfg.run_name}-{task_type}{task_id}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return dataclasses.replace(cfg, checkpoint_dir=os.path.join(tmp, "checkpoints"),
                               log_dir=os.path.join(tmp, "logs"))


_FLAGS: dict = {}


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True on every worker if `flag` is True on any (a collective: all workers must call
    it at the same point). One process: `flag` itself."""
    if num_workers(strategy) <= 1:
        return flag
    if id(strategy) not in _FLAGS:
        # Summed over the replicas when read, like a Keras metric's state.
        with strategy.scope():
            _FLAGS[id(strategy)] = tf.Variable(
                0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM)
    var = _FLAGS[id(strategy)]
    for local in strategy.experimental_local_results(var):
        local.assign(1.0 if flag else 0.0)
    return float(var.read_value()) > 0


def barrier(strategy: tf.distribute.Strategy) -> None:
    any_worker(strategy, False)
