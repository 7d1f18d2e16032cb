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
        # Cluster layout comes from TF_CONFIG, as on every multi-worker launcher. A crashed worker is noticed by
        # the coordination service's heartbeats (seconds); the timeout also ends collectives that a live but
        # stuck worker never joins.
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=config.collective_timeout_secs or None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "tpu":
        # --tpu=local on a TPU VM (the chips are on this host), a TPU name or grpc:// address otherwise; empty:
        # TF's own lookup ($TPU_NAME, then the GCE metadata server).
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy={name!r} is not known")


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


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


def worker_role(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """(is_chief, worker index). The chief is task "chief", else worker 0 (TF's rule); one process is chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    if not task_type:
        return True, 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief), task_id


def num_workers(strategy: tf.distribute.Strategy) -> int:
    return getattr(strategy.extended, "_num_workers", 1) if isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy) else 1


class Agreement:
    """One decision for all workers: each passes its own flags, all get their OR (one tiny all-reduce).

    Whatever changes the control flow (stop after a SIGTERM, a checkpoint due by the clock) must be the
    same on every worker, or the others wait forever in the collective that one of them skipped."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self._strategy = strategy
        self._reduce = None
        if num_workers(strategy) > 1:
            @tf.function
            def reduce(flags):
                per_replica = strategy.run(tf.identity, args=(flags,))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)  # no MAX: SUM > 0
            self._reduce = reduce

    def any(self, *flags: bool) -> list[bool]:
        if self._reduce is None:
            return [bool(f) for f in flags]
        agreed = self._reduce(tf.constant([1 if f else 0 for f in flags], tf.int32)).numpy()
        return [bool(f) for f in agreed]
