"""What the host is (CPU model, native bf16) and when this process started, read from /proc without TensorFlow,
so the PyTorch peers in bench/ use the same answers."""
from __future__ import annotations

import functools
import os
from typing import Optional

import engine  # the package, imported before this module: whether its import set TF_ENABLE_ONEDNN_OPTS


@functools.lru_cache(maxsize=None)  # asked once per dense layer while a graph is traced (cpu_has_amx)
def _cpu_flags() -> frozenset:
    """The first CPU's feature flags from /proc/cpuinfo; empty where it cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); otherwise TF emulates it, slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles for bf16 (Sapphire Rapids and later Xeons); False off Linux."""
    return "amx_bf16" in _cpu_flags()


# TensorFlow 2.20 on Linux turns its oneDNN rewrites and kernels on by default only on x86 CPUs with one of these
# (DefaultOneDnnPolicy in tensorflow/core/util/port.cc; also on Arm Neoverse V1, which this does not read).
ONEDNN_BY_DEFAULT_FLAGS = frozenset({"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"})


def tensorflow_runs_onednn_by_default() -> bool:
    """Whether TensorFlow runs oneDNN here when TF_ENABLE_ONEDNN_OPTS is unset (else Eigen's kernels)."""
    return bool(ONEDNN_BY_DEFAULT_FLAGS & _cpu_flags())


def serving_host_environment() -> dict:
    """This process's environment as a serving host set up as launch.export advises has it: without
    TF_ENABLE_ONEDNN_OPTS where only the engine's import set it (engine/__init__.py turns oneDNN on for its own
    programs only; a host keeps TensorFlow's default), with TF_NUM_INTRAOP_THREADS as serving_intra_op_threads
    says unless the user set it."""
    env = dict(os.environ)
    env.pop(engine.ONEDNN_DEFAULT_MARKER, None)  # whatever the host runs, it is not the engine's default
    if _serving_onednn_setting() is None:
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    threads = serving_intra_op_threads()
    if threads is not None and "TF_NUM_INTRAOP_THREADS" not in env:
        env["TF_NUM_INTRAOP_THREADS"] = str(threads)
    return env


def _serving_onednn_setting() -> Optional[str]:
    """TF_ENABLE_ONEDNN_OPTS as a serving host has it: the user's, not the one engine/__init__.py set for the
    engine's own programs (None: TensorFlow's default on this CPU)."""
    return None if engine.ONEDNN_OPTS_DEFAULTED else os.environ.get("TF_ENABLE_ONEDNN_OPTS")


def serving_host_runs_onednn() -> bool:
    """Whether a SavedModel exported by this process will be served with oneDNN: as TF_ENABLE_ONEDNN_OPTS says if
    the user set it, else TensorFlow's default on this CPU (serving_host_environment)."""
    setting = _serving_onednn_setting()
    if setting is None:
        return tensorflow_runs_onednn_by_default()
    return setting.strip().lower() in ("1", "true")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as TensorFlow counts them for its thread pools)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def serving_intra_op_threads() -> Optional[int]:
    """The intra-op thread count to serve this process's exports with, or None for TensorFlow's default.

    An export for a host whose TensorFlow runs Eigen's kernels computes every dense product as two halves that the
    executor's inter-op threads run side by side (engine/dense.py, halves_run_side_by_side). With TensorFlow's
    default pools (inter-op and intra-op threads both as many as the cores) each half is itself an Eigen
    contraction sharded over the intra-op pool, so on 2 cores two halves make four tasks for two cores: in a profile
    two same-size halves took 481 and 1,374 us side by side. With the intra-op pool at half the cores each half
    runs on its own core: on the 2-core AVX2 Zen 3 single sentences were answered 1.2-1.5x sooner (p50 and p99
    over 256 SST-2 dev sentences; `make bench` p50 1.68x PyTorch's against 1.08x with the default pools), batches of
    32 as fast since their attention runs in halves of the heads (attention._in_head_halves; bench/RESULTS.md,
    2026-12-07). Where the host runs oneDNN the halves follow its one-thread rule (L2-sized halves only) and the
    pools keep TensorFlow's default. Measured on 2 cores only; half the cores on larger hosts keeps the two
    halves' threads within the cores."""
    if serving_host_runs_onednn():
        return None
    return max(1, usable_cores() // 2)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# When the L2 size cannot be read: the smaller of the two CPUs measured (Zen 4 1 MiB, the AMX Xeon 2 MiB per core).
DEFAULT_L2_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def l2_cache_bytes() -> int:
    """The first CPU's L2 (per core) in bytes, from Linux sysfs; DEFAULT_L2_BYTES where it cannot be read."""
    folder = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(folder)):
            with open(os.path.join(folder, index, "level"), encoding="ascii") as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(folder, index, "size"), encoding="ascii") as f:
                size = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return DEFAULT_L2_BYTES


def process_age_seconds() -> Optional[float]:
    """Seconds since this process started (Linux /proc: the interpreter's own start-up and imports count); None
    where /proc cannot say."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        # Field 22, starttime, in clock ticks since boot; fields are counted after the command's ")".
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return age if age >= 0 else None
    except (OSError, ValueError, IndexError):
        return None
