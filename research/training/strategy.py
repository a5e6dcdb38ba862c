"""Devices and the tf.distribute strategy a run trains under."""

from __future__ import annotations

import tensorflow as tf

from research.devices import configure_cpu_replicas
from research.training import cluster
from research.training.config import ConfigError


# One MirroredStrategy per set of devices per process: two over the same devices issue
# collectives with the same instance keys, and the second's all-reduces abort ("Collective
# instance N expected type ..."); the lab and compare train or score several runs in one
# process.
_MIRRORED: dict[tuple, tf.distribute.MirroredStrategy] = {}


def make_strategy(name: str = "auto", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    if name == "multi_worker":  # before the runtime starts (research.devices only lists)
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster.resolve(name))
    configure_cpu_replicas(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 or (not gpus and cpu_replicas > 1) else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
    if name == "mirrored":
        devices = tuple(d.name for d in (gpus or cpus))
        if devices not in _MIRRORED:
            _MIRRORED[devices] = tf.distribute.MirroredStrategy(devices=list(devices))
        return _MIRRORED[devices]
    raise ConfigError(f"--strategy: unknown strategy {name!r}")
