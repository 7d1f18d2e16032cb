"""Precision policy: float32, mixed_bfloat16 or mixed_float16, and "auto" that measures nothing it need not."""
from __future__ import annotations

import functools
import time

import tensorflow as tf
import tf_keras
from absl import logging


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); otherwise TF emulates it, slowly."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


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


def resolve_precision(requested: str) -> str:
    """Maps "auto" to the fastest exact-enough policy for the hardware; warns about slow requests."""
    has_accelerator = bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    if requested == "auto":
        if tf.config.list_logical_devices("TPU"):
            return "mixed_bfloat16"
        if tf.config.list_logical_devices("GPU"):
            return "mixed_float16"
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
