"""Several machines: MultiWorkerMirroredStrategy over the scheduler's own description of the
cluster.

`resolve` finds the cluster for --strategy=multi_worker, in this order:
1. TF_CONFIG, if set: `launch_local`, a Kubeflow TFJob (the training operator writes it into
   every pod) or a user. It wins over SLURM, so `launch_local` inside an allocation works.
2. An srun step (SLURM_STEP_NODELIST is set): TensorFlow's SlurmClusterResolver, one worker
   per task, GPUs and ports chosen here (see `slurm_resolver`).
3. Neither: a one-line ConfigError naming both.

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
# The resolver's own parser of SLURM's "2(x3),1" (not exported under tf.distribute).
from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
    expand_tasks_per_node)

from research.training.config import ConfigError, TrainConfig

# What srun sets in every task that the SLURM resolver reads (TensorFlow's, then ours).
SLURM_TASK_VARS = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                   "SLURM_STEP_TASKS_PER_NODE", "SLURMD_NODENAME", "SLURM_LOCALID")
PORT_VAR = "RESEARCH_PORT"  # the first port of a node's tasks; else derived from SLURM_JOB_ID
_NO_CLUSTER = ("--strategy=multi_worker: no cluster found: set TF_CONFIG (launch_local, a "
               "Kubeflow TFJob, or by hand) or start every worker with srun under SLURM (see "
               "docs/several_machines.md)")


def resolve(strategy_name: str) -> tf.distribute.cluster_resolver.ClusterResolver | None:
    """The cluster resolver for --strategy=multi_worker (None for other strategies), in the
    order above. It only reads the environment, so the loop calls it before any work and a
    bad cluster stops there with one line."""
    if strategy_name != "multi_worker":
        return None
    if os.environ.get("TF_CONFIG"):
        check_tf_config(os.environ["TF_CONFIG"])
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if os.environ.get("SLURM_STEP_NODELIST"):
        return slurm_resolver()
    if os.environ.get("SLURM_JOB_ID"):
        raise ConfigError(f"--strategy=multi_worker: SLURM job {os.environ['SLURM_JOB_ID']} "
                          "but not an srun step (SLURM_STEP_NODELIST is not set): start the "
                          "workers with `srun python -m research.apps.train ...`")
    raise ConfigError(_NO_CLUSTER)


def check_tf_config(text: str) -> dict:
    """TF_CONFIG parsed, or a one-line ConfigError if it does not place this task in a
    cluster of chief/worker tasks."""
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


def slurm_port() -> int:
    """The first port of a node's tasks (task k on a node listens on it + k): RESEARCH_PORT
    if set, else 20000 + 8 * (SLURM_JOB_ID mod 5000): jobs sharing a node get eight ports
    each (unless their ids differ by a multiple of 5000), never TensorFlow's fixed 8888."""
    text = os.environ.get(PORT_VAR)
    if text is None:
        job = os.environ.get("SLURM_JOB_ID", "")
        if not job.isdigit():
            raise ConfigError(f"--strategy=multi_worker: set {PORT_VAR} (SLURM_JOB_ID is "
                              f"{job or 'not set'}, so no port can be derived from it)")
        return 20000 + 8 * (int(job) % 5000)
    if not text.isdigit() or not 1024 <= int(text) <= 65000:
        raise ConfigError(f"{PORT_VAR}: must be a port number in 1024-65000, got {text!r}")
    return int(text)


def slurm_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """This srun step as a cluster of workers, read by TensorFlow's SlurmClusterResolver.

    - GPUs per node: SLURM_GPUS_ON_NODE (SLURM sets it when the job has GPUs), else 0. The
      resolver cannot be told 0 (it hands out GPUs in steps of gpus_per_task and drops the
      tasks beyond them), so a CPU node is described as one unused slot per task and its
      devices left alone; with GPUs, each task's share (CUDA_VISIBLE_DEVICES) was set by
      research.devices before TensorFlow started: set here, as the resolver's auto_set_gpu
      would, it comes after CUDA has read it and has no effect.
    - Ports: `slurm_port`, not the resolver's fixed 8888.
    - This task's index: its own address (SLURMD_NODENAME, port + SLURM_LOCALID) in the
      cluster the resolver lists, hosts sorted by name. The resolver's own index is
      SLURM_PROCID, which names another task's address when srun's node order is not that
      sort (node9 before node10) or tasks are placed cyclically.
    """
    missing = [v for v in SLURM_TASK_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"--strategy=multi_worker: the srun step's environment lacks "
                          f"{', '.join(missing)}")
    port = slurm_port()
    try:
        per_node = max(expand_tasks_per_node(os.environ["SLURM_STEP_TASKS_PER_NODE"]))
        gpus = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0)
        if 0 < gpus < per_node:
            raise ValueError(f"{gpus} GPU(s) for {per_node} tasks on a node")
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port, gpus_per_node=gpus or per_node, gpus_per_task=None if gpus else 1,
            auto_set_gpu=False)
        spec = resolver.cluster_spec()
        own = f"{os.environ['SLURMD_NODENAME']}:{port + int(os.environ['SLURM_LOCALID'])}"
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--strategy=multi_worker: SLURM's environment does not describe a "
                          f"cluster ({str(e).splitlines()[0]})") from None
    workers = spec.as_dict()["worker"]
    if own not in workers:
        raise ConfigError(f"--strategy=multi_worker: this task ({own}) is not in the cluster "
                          f"SLURM describes: {', '.join(workers)}")
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type="worker", task_id=workers.index(own), rpc_layer="grpc",
        num_accelerators={"GPU": resolver.num_accelerators()["GPU"] if gpus else 0})


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
