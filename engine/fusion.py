"""Dropout and activation layers of the trained model as small XLA kernels; matmuls stay on oneDNN.

Why: on CPU the non-matmul ops of BERT training cost far more than their FLOPs. TensorFlow's generic
elementwise kernels are built for a baseline ISA (bf16 ones convert through fp32 in portable code),
while XLA compiles the same few ops for the host's vector units. Whole-model XLA does not help on
such CPUs because its matmuls lose to oneDNN's (bench/RESULTS.md); compiling only these islands does.
Measured on AMD EPYC Zen 5, forward+backward CPU time: dropout on [32,12,128,128] 2.4x less in bf16,
1.35x in fp32; erf-GELU on [32,128,1536] 1.45x less in fp32 and 3x in bf16 (computed in fp32 inside).

Dropout keeps the semantics of `tf_keras.layers.Dropout` without noise_shape: each element is kept
with probability 1 - rate (a uniform float32 draw >= rate; stock bf16 dropout draws bf16, whose
coarse grid drops 10.14% instead of 10% at rate 0.1) and scaled by 1 / (1 - rate); the gradient uses
the same mask. The draw is XLA's stateful RNG, fresh on every call, like the stock layer's. An
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


@functools.lru_cache(maxsize=None)
def _kernels(rate: float):
    scale = 1.0 / (1.0 - rate)

    @tf.function(jit_compile=True)
    def forward(x):
        keep = tf.random.uniform(tf.shape(x), dtype=tf.float32) >= rate
        return tf.where(keep, x * tf.cast(scale, x.dtype), tf.zeros_like(x)), keep

    @tf.function(jit_compile=True)
    def backward(grad, keep):
        return tf.where(keep, grad * tf.cast(scale, grad.dtype), tf.zeros_like(grad))

    return forward, backward


def dropout(x: tf.Tensor, rate: float) -> tf.Tensor:
    """Inverted dropout of `x` at `rate` (training mode), mask and scaling in one XLA kernel."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate {rate} must be in [0, 1)")
    if rate == 0.0:
        return tf.identity(x)
    forward, backward = _kernels(float(rate))

    @tf.custom_gradient
    def masked(x):
        y, keep = forward(x)
        return y, lambda grad: backward(grad, keep)

    return masked(x)


def _fused_call(layer: tf_keras.layers.Dropout, inputs, training=None):
    if training is None:
        training = tf_keras.backend.learning_phase()
    return tf.__internal__.smart_cond.smart_cond(
        training, lambda: dropout(inputs, layer.rate), lambda: tf.identity(inputs))


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
    counts = {"dropout": 0, "activation": 0}
    for layer in model.submodules:
        if type(layer) is tf_keras.layers.Dropout and layer.noise_shape is None and layer.rate > 0:
            layer.call = functools.partial(_fused_call, layer)
            counts["dropout"] += 1
        elif type(layer) is tf_keras.layers.Activation and layer.activation is not tf_keras.activations.linear:
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
