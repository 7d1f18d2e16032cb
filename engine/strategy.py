"""Builds the tf.distribute strategy named by RuntimeConfig.strategy."""
from __future__ import annotations

import functools

import tensorflow as tf

from engine.config import RuntimeConfig


def make_strategy(config: RuntimeConfig) -> tf.distribute.Strategy:
    """default | one_device | mirrored | multi_worker_mirrored | tpu."""
    name = config.strategy
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
        if config.num_gpus:
            if config.num_gpus > len(gpus):
                raise ValueError(f"--num_gpus={config.num_gpus} but only {len(gpus)} GPUs are visible")
            gpus = gpus[:config.num_gpus]
        # Without GPUs, mirror over the logical CPU devices (tests split the CPU into two).
        devices = gpus or [d.name for d in tf.config.list_logical_devices("CPU")]
        return _mirrored(tuple(devices))
    if name == "multi_worker_mirrored":
        # Cluster layout comes from TF_CONFIG, as on every multi-worker launcher.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy={name!r} is not known")


@functools.lru_cache(maxsize=None)
def _mirrored(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per device set and process.

    Each new strategy restarts its collective group/instance keys, and the runtime keeps the
    parameters of earlier collectives under those keys: a second strategy over the same devices
    then fails with "Shape mismatch in the collective instance". Reusing the strategy keeps the
    keys unique (several Trainers in one process, as in the tests).
    """
    return tf.distribute.MirroredStrategy(list(devices))


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into `num_devices` logical devices (before TF initialises its devices)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
