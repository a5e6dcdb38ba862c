"""Devices and the tf.distribute strategy a run trains under."""

from __future__ import annotations

import tensorflow as tf

from research.training import cluster
from research.training.config import ConfigError


def configure_cpu_replicas(n: int) -> None:
    """Splits the CPU into n logical devices (must run before TensorFlow initialises)."""
    if n <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        raise ConfigError(f"--cpu_replicas={n}: TensorFlow is already initialised with "
                          f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); "
                          "set it before any TensorFlow work") from e


def make_strategy(name: str = "auto", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    if name == "multi_worker":  # before anything, listing devices included, starts TF
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
        devices = None if gpus else [d.name for d in cpus]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ConfigError(f"--strategy: unknown strategy {name!r}")
