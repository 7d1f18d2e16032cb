"""LayerNormalization over the last axis as engine/fusion.py runs it: on the CPU our C++ op in training and at
inference in our own process (layer_norm_kernel.cc: one pass forward and one backward, 1.1 ms against 5.7 for
TensorFlow's ops on [32, 128, 384]; the bench's MiniLM step 1.17x in bf16, 1.07x in fp32 on the AMX Xeon,
bench/RESULTS.md); elsewhere Keras' own forward ops with a closed-form gradient in training, and fewer ops than
Keras at inference (export-safe graphs always). Inputs arrive in the dtype Keras
would normalize in (float32 under a mixed policy); gamma and beta in the same dtype, or None where the layer has
none. A Transformer block's LayerNorms take their residual add into the op too (add_native_op).
BERT_ENGINE_NATIVE_LAYER_NORM=0 turns the ops off."""
from __future__ import annotations

import tensorflow as tf

from engine import native

LIBRARY = native.LAYER_NORM


def inference(inputs, gamma, beta, epsilon: float):
    """(x - mean) * (rsqrt(variance + epsilon) * gamma) + beta: the same math as Keras' moments +
    batch_normalization path (a SquaredDifference against a stop_gradient, then x * inv + (beta - mean * inv)) in
    fewer ops. MiniLM's fp32 forward ran ~1.06x at batch 32 and ~1.1x at batch 1 on an AMX Xeon (bench/RESULTS.md)."""
    mean = tf.reduce_mean(inputs, axis=[-1], keepdims=True)
    centered = inputs - mean
    inverse = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), axis=[-1], keepdims=True) + epsilon)
    if gamma is not None:
        inverse *= gamma
    outputs = centered * inverse
    return outputs + beta if beta is not None else outputs


def training(inputs, gamma, beta, epsilon: float):
    """LayerNorm in training: our C++ op where it can run (float32 on a CPU, outside XLA; native_op), else
    TensorFlow's ops (tf_training)."""
    outputs = native_op(inputs, gamma, beta, epsilon)
    return tf_training(inputs, gamma, beta, epsilon) if outputs is None else outputs


def native_op(inputs, gamma, beta, epsilon: float):
    """The same math as tf_training in one C++ pass forward (keeping each row's mean and 1/std) and one backward
    (layer_norm_kernel.cc), in float32 with other summation orders; None where the op cannot run."""
    if (inputs.dtype != tf.float32 or gamma is None or beta is None or gamma.dtype != tf.float32
            or beta.dtype != tf.float32):
        return None
    module = LIBRARY.load_for(inputs.device)
    if module is None:
        return None

    @tf.custom_gradient
    def layer_norm(inputs, gamma, beta):
        outputs, mean, rstd = module.engine_layer_norm(inputs, gamma, beta, epsilon=epsilon)
        return outputs, lambda upstream: module.engine_layer_norm_grad(upstream, inputs, mean, rstd, gamma)
    return layer_norm(inputs, gamma, beta)


def add_native_op(x, residual, gamma, beta, epsilon: float):
    """LayerNorm(x + residual) as one C++ pass forward (EngineAddLayerNorm: the sum in float32, from x
    and a residual in float32 or bfloat16) and EngineLayerNormGrad backward, its gradient cast back to each input's
    dtype; gamma and beta in float32. Saves the add and the casts to float32 before Model Garden's float32
    LayerNorms. None where the op cannot run (as native_op)."""
    if (x.dtype not in (tf.float32, tf.bfloat16) or residual.dtype not in (tf.float32, tf.bfloat16)
            or gamma is None or beta is None or gamma.dtype != tf.float32 or beta.dtype != tf.float32):
        return None
    module = LIBRARY.load_for(x.device)
    if module is None:
        return None

    @tf.custom_gradient
    def add_layer_norm(x, residual, gamma, beta):
        outputs, total, mean, rstd = module.engine_add_layer_norm(x, residual, gamma, beta, epsilon=epsilon)

        def gradient(upstream):
            grad, gamma_grad, beta_grad = module.engine_layer_norm_grad(upstream, total, mean, rstd, gamma)
            x_grad = tf.cast(grad, x.dtype)
            residual_grad = x_grad if residual.dtype == x.dtype else tf.cast(grad, residual.dtype)
            return x_grad, residual_grad, gamma_grad, beta_grad
        return outputs, gradient
    return add_layer_norm(x, residual, gamma, beta)


def tf_training(inputs, gamma, beta, epsilon: float):
    """Keras' forward with its own ops (moments, then batch_normalization's x * inv + (beta - mean * inv)), so the
    same bits, and the closed-form gradient instead of autodiff's ~20 ops through those: with
    x_hat = (x - mean) * rsqrt(variance + epsilon) and g = dy * gamma,
    dx = rsqrt(variance + epsilon) * (g - mean(g) - x_hat * mean(g * x_hat)), dgamma = sum(dy * x_hat),
    dbeta = sum(dy). One LayerNorm's forward + backward on [32, 128, 384] (bf16 in, float32 statistics) took 5.6
    ms against Keras' 7.2 on the AMX Xeon (bench/RESULTS.md, 2026-12-04); the gradients equal autodiff's up to
    float rounding (tests/test_fusion.py). Needs both gamma and beta (BERT's LayerNorms have them)."""
    @tf.custom_gradient
    def layer_norm(inputs, gamma, beta):
        mean, variance = tf.nn.moments(inputs, [-1], keepdims=True)
        inverse = tf.math.rsqrt(variance + epsilon)
        scaled = inverse * gamma
        outputs = inputs * scaled + (beta - mean * scaled)

        def gradient(upstream):
            normalized = (inputs - mean) * inverse
            scaled_upstream = upstream * gamma
            inputs_gradient = inverse * (
                scaled_upstream - tf.reduce_mean(scaled_upstream, -1, keepdims=True)
                - normalized * tf.reduce_mean(scaled_upstream * normalized, -1, keepdims=True))
            rows = list(range(inputs.shape.rank - 1))
            return inputs_gradient, tf.reduce_sum(upstream * normalized, rows), tf.reduce_sum(upstream, rows)
        return outputs, gradient
    return layer_norm(inputs, gamma, beta)
