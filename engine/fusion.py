"""Dropout and activation layers of the trained model as small XLA kernels; matmuls stay on oneDNN.

Why: on CPU the non-matmul ops of BERT training cost far more than their FLOPs. TensorFlow's generic
elementwise kernels are built for a baseline ISA (bf16 ones convert through fp32 in portable code),
while XLA compiles the same few ops for the host's vector units. Whole-model XLA does not help on
such CPUs because its matmuls lose to oneDNN's (bench/RESULTS.md); compiling only these islands does.
Measured on AMD EPYC Zen 5, forward+backward CPU time: dropout on [32,12,128,128] 2.4x less in bf16,
1.35x in fp32; erf-GELU on [32,128,1536] 1.45x less in fp32 and 3x in bf16 (computed in fp32 inside).

Dropout is engine/dropout.py's keyed dropout with its mask and scaling as one XLA kernel. An
Activation layer runs its own activation function, XLA-compiled (TensorFlow differentiates it), in
float32 inside the kernel for 16-bit inputs; one pinned to float32 under a mixed policy (Model Garden's
FFN GELU) is switched to the 16-bit dtype, which gives the same values without the casts around it.

`fuse_elementwise(model)` rebinds `call` on the model's own layer instances, not on the classes, so
other models in the process, e.g. a `model.fit` baseline, keep the stock layers.
"""
from __future__ import annotations

import functools

import tensorflow as tf
import tf_keras

from engine import dropout


def resolve_fuse_elementwise(setting) -> bool:
    """RuntimeConfig.fuse_elementwise: True, False, or "auto" = on for the CPU, where it was measured (above),
    off on GPUs and TPUs. A TPU runs the whole step as one XLA program anyway (islands inside it are simply
    inlined); on GPUs cuDNN/cuBLAS and TensorFlow's grappler already fuse matmul+bias+activation, and XLA
    (--jit_compile) fuses the elementwise rest; the CPU-tuned islands were not measured there."""
    if setting == "auto":
        return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return bool(setting)


@functools.lru_cache(maxsize=None)
def _compiled(activation):
    def in_float32(x):
        # XLA:CPU runs bf16/fp16 transcendentals (GELU's erf) through per-op conversions: upcasting once
        # inside the kernel halves GELU's forward+backward CPU time in bf16 and rounds once instead of per op.
        if x.dtype in (tf.bfloat16, tf.float16):
            return tf.cast(activation(tf.cast(x, tf.float32)), x.dtype)
        return activation(x)
    return tf.function(in_float32, jit_compile=True)


def _fused_activation_call(layer: tf_keras.layers.Activation, inputs):
    return _compiled(layer.activation)(inputs)


def fuse_elementwise(model: tf.Module) -> dict[str, int]:
    """Rebinds the model's plain Dropout (rate > 0, no noise_shape) and Activation layers; returns counts."""
    counts = {"dropout": dropout.rebind(model, xla=True), "activation": 0}
    for layer in model.submodules:
        if type(layer) is tf_keras.layers.Activation and layer.activation is not tf_keras.activations.linear:
            layer.call = functools.partial(_fused_activation_call, layer)
            counts["activation"] += 1
            global_policy = tf_keras.mixed_precision.global_policy()
            if layer.compute_dtype == "float32" and global_policy.compute_dtype in ("bfloat16", "float16"):
                # Model Garden pins the FFN activation to float32 under mixed_bfloat16, so Keras casts its
                # 16-bit input up and the next layer casts the output back down: two stock Cast passes over
                # [batch, seq, 4 x hidden] each way. The kernel computes in float32 inside anyway, so taking
                # and returning the 16-bit dtype gives the same values without those passes.
                layer._set_dtype_policy(global_policy)  # pylint: disable=protected-access
    return counts
