"""Dropout whose random mask and masking run as one small XLA kernel, for the model the engine trains.

Why: on CPU, stock Keras dropout (`tf.nn.dropout`) is the largest non-matmul cost of BERT
training. TensorFlow's generic RandomUniform/GreaterEqual/SelectV2 kernels are built for a baseline
ISA, and in bfloat16 they are slower than in float32 (RandomUniform draws bf16 values, whose coarse
grid also drops 10.14% instead of 10% at rate 0.1). XLA compiles the same few ops for the host's
vector units: measured on AMD EPYC Zen 5 (bench/RESULTS.md), forward+backward of a [32,12,128,128]
dropout costs 2.4x less CPU in bf16 and 1.35x less in fp32, while whole-model XLA is slower there
because its matmuls are slower than oneDNN's. So only dropout is compiled; matmuls stay on oneDNN.

Semantics are those of `tf_keras.layers.Dropout` without noise_shape: each element is kept with
probability 1 - rate (uniform float32 draw >= rate) and scaled by 1 / (1 - rate); the gradient uses the
same mask. The draw is XLA's stateful RNG, fresh on every call, like the stock layer's.

`fuse_dropout(model)` rebinds `call` on the model's own Dropout layers (instances, not the class),
so other models in the process, e.g. a `model.fit` baseline, keep the stock layer.
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


def fuse_dropout(model: tf.Module) -> int:
    """Makes every plain Dropout layer of `model` (no noise_shape, rate > 0) use `dropout`; returns how many."""
    count = 0
    for layer in model.submodules:
        if type(layer) is tf_keras.layers.Dropout and layer.noise_shape is None and layer.rate > 0:
            layer.call = functools.partial(_fused_call, layer)
            count += 1
    return count
