"""Precision policy: float32, mixed_bfloat16 or mixed_float16, and "auto" that measures nothing it need not."""
from __future__ import annotations

import functools
import os
import re
import time
import urllib.request
from typing import Optional

import tensorflow as tf
import tf_keras
from absl import logging

from engine.host import cpu_has_native_bf16, cpu_model_name  # noqa: F401 - callers and tests use them here


# Square and BERT-shaped (tokens x hidden x FFN) products: the best of them is the peak MFU is measured against.
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 384, 1536), (4096, 1536, 384))


@functools.lru_cache(maxsize=None)  # about a second per dtype; once per process is enough
def matmul_gflops(dtype: tf.DType, shapes=PEAK_SHAPES, samples: int = 3, calls: int = 3) -> float:
    """Measured dense matmul throughput of this device in GFLOP/s: the best over `shapes` and `samples`.

    Each sample times `calls` back-to-back matmuls ending in one host copy, so call overhead and the
    copy do not eat into the result. The same estimate as bench/engine_vs_fit.py's peak.
    """
    best = 0.0
    for m, k, n in shapes:
        a, b = tf.cast(tf.random.normal([m, k]), dtype), tf.cast(tf.random.normal([k, n]), dtype)
        matmul = tf.function(tf.matmul)
        matmul(a, b).numpy()  # trace and warm up oneDNN's primitive cache
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(calls):
                product = matmul(a, b)
            product.numpy()
            best = max(best, 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9)
    return best


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) of each visible GPU, as TF reports it; (0, 0) where it does not say."""
    return [tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
            for gpu in tf.config.list_physical_devices("GPU")]


def resolve_precision(requested: str) -> str:
    """Maps "auto" to the fastest exact-enough policy for the hardware; warns about slow requests.

    auto: bf16 on TPU (its matmul units are bf16); on GPUs bf16 from Ampere on (compute capability 8.0: A100,
    H100, L4, ...; same tensor-core speed as fp16 and no loss scale), fp16 with a dynamic loss scale before
    (V100, T4: no bf16 tensor cores); on the CPU bf16 only with native support (AVX512-BF16/AMX), else fp32."""
    has_accelerator = bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    if requested == "auto":
        if tf.config.list_logical_devices("TPU"):
            return "mixed_bfloat16"
        if tf.config.list_logical_devices("GPU"):
            capabilities = gpu_compute_capabilities()
            return "mixed_bfloat16" if capabilities and min(capabilities) >= (8, 0) else "mixed_float16"
        return "mixed_bfloat16" if cpu_has_native_bf16() else "float32"
    if requested == "mixed_bfloat16" and not has_accelerator and not cpu_has_native_bf16():
        fp32, bf16 = matmul_gflops(tf.float32), matmul_gflops(tf.bfloat16)
        logging.warning(  # one string argument, so tests and log scrapers see the whole sentence
            "mixed_bfloat16 requested but this CPU (%s) has no native bf16 (avx512_bf16/amx_bf16): "
            "measured matmul %.0f GFLOP/s bf16 vs %.0f GFLOP/s fp32 (%.2fx). Use --precision=float32 or auto.",
            cpu_model_name(), bf16, fp32, bf16 / fp32)
    return requested


def set_policy(precision: str) -> tf_keras.mixed_precision.Policy:
    """Sets the global Keras policy used by models built afterwards; returns it."""
    tf_keras.mixed_precision.set_global_policy(precision)
    return tf_keras.mixed_precision.global_policy()


# Peak dense matmul TFLOP/s per device TF trains on, by the device name TF reports (first match wins), for MFU.
# Columns: 16-bit (bf16, or fp16 where the device has no bf16 units: V100, T4), TF32 (float32 matmuls when TF's
# TensorFloat-32 is on, the default on Ampere+), float32. A TPU multiplies float32 in bf16 passes: one figure.
# TPU v2/v3 chips have two TensorCores that TF lists as two devices; v4/v5p (megacore), v5e and v6e one per chip.
_GPU_PEAKS = (  # pattern, {"bfloat16": ..., "float16": ..., "tf32": ..., "float32": ...} (NVIDIA datasheets, dense)
    (r"H100.*PCIe", {"bfloat16": 756, "float16": 756, "tf32": 378, "float32": 51}),
    (r"H100", {"bfloat16": 989, "float16": 989, "tf32": 494.5, "float32": 67}),  # SXM
    (r"A100", {"bfloat16": 312, "float16": 312, "tf32": 156, "float32": 19.5}),
    (r"V100", {"float16": 125, "float32": 15.7}),
    (r"\bT4\b", {"float16": 65, "float32": 8.1}),
)
_TPU_PEAKS = (  # pattern on the accelerator type ("v4-8", "v5litepod-16", "TPU v3"), bf16 TFLOP/s per chip, devices/chip
    (r"v2\b|v2-", 45, 2),
    (r"v3\b|v3-", 123, 2),
    (r"v4\b|v4-", 275, 1),
    (r"v5e|v5lite", 197, 1),
    (r"v5p", 459, 1),
    (r"v6e", 918, 1),
)


def _gce_accelerator_type() -> str:
    """A Cloud TPU VM's accelerator type ("v4-8") from the GCE metadata server; "" elsewhere."""
    request = urllib.request.Request(
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/accelerator-type",
        headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return response.read().decode().strip()
    except (OSError, ValueError):
        return ""


def accelerator() -> tuple[str, str]:
    """("TPU" | "GPU" | "CPU", the device's name): the GPU name TF reports ("NVIDIA A100-SXM4-40GB"); for a
    TPU its accelerator type ($TPU_ACCELERATOR_TYPE, else the TPU VM's metadata, e.g. "v4-8"); the CPU model."""
    if tf.config.list_logical_devices("TPU"):
        tpus = tf.config.list_physical_devices("TPU")
        name = (tf.config.experimental.get_device_details(tpus[0]).get("device_name", "") if tpus else "")
        return "TPU", name or os.environ.get("TPU_ACCELERATOR_TYPE", "") or _gce_accelerator_type() or "TPU"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU", tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return "CPU", cpu_model_name()


def device_peak_tflops(kind: str, name: str, precision: str) -> Optional[float]:
    """Peak dense TFLOP/s of one device TF trains on (a GPU; a TPU core or chip as TF lists it) under `precision`,
    from the tables above; None when the device is not in them (then no MFU is reported)."""
    if kind == "TPU":
        for pattern, chip_tflops, devices_per_chip in _TPU_PEAKS:
            if re.search(pattern, name):
                return chip_tflops / devices_per_chip
        return None
    if kind == "GPU":
        for pattern, peaks in _GPU_PEAKS:
            if re.search(pattern, name):
                if precision == "float32":
                    tf32 = "tf32" in peaks and tf.config.experimental.tensor_float_32_execution_enabled()
                    return peaks["tf32" if tf32 else "float32"]
                return peaks.get("bfloat16" if "bfloat16" in precision else "float16")
    return None


def peak_flops(precision: str, *, num_replicas: int, num_workers: int = 1,
               override_tflops: float = 0.0) -> tuple[Optional[float], str]:
    """(peak FLOP/s of everything the run trains on, a description), for MFU. `override_tflops` (--peak_tflops)
    replaces the per-device figure: one GPU or TPU device, or one host's CPU. On a CPU the peak is this CPU's
    measured matmul throughput (logical CPU devices share it: counted once per worker)."""
    kind, name = accelerator()
    if kind == "CPU":
        per_host = (override_tflops * 1e12 if override_tflops else
                    matmul_gflops(tf.bfloat16 if "bfloat16" in precision else tf.float32) * 1e9)
        how = "--peak_tflops" if override_tflops else "measured matmul peak"
        return per_host * num_workers, f"{name}: {how} {per_host / 1e12:.2f} TFLOP/s x {num_workers} host(s)"
    per_device = override_tflops or device_peak_tflops(kind, name, precision)
    if not per_device:
        return None, f"{name}: peak FLOP/s unknown for {precision}; no MFU (set --peak_tflops)"
    how = "--peak_tflops" if override_tflops else "datasheet peak"
    return per_device * 1e12 * num_replicas, f"{name}: {how} {per_device:g} TFLOP/s x {num_replicas} device(s)"
