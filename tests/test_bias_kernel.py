"""engine/bias_kernel.cc: EngineBiasAdd has the bits of TensorFlow's AddV2; EngineBiasGelu and its gradient, which
the fused FFN runs in training on the CPU, match a float64 GELU (math.erf) in values and gradients, sum the bias
gradient over fixed chunks of rows, and run in a fused encoder's training graph only (not with the switch off)."""
import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import math

import numpy as np
import pytest
import tensorflow as tf

from engine import bias as bias_ops
from engine_helpers import encoder_pair_with_dropout, encoder_training_step, graph_op_types

_erf = np.vectorize(math.erf)


def _inputs(dtype, rows=24, units=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, units)) * 3  # through GELU's bend, its flat tail and erf's clamp at |a / sqrt 2| = 4
    x[0, :8] = [-20.0, -7.0, -5.7, -0.01, 0.0, 1e-5, 6.0, 30.0]
    bias = (rng.normal(size=units) * 0.5).astype(np.float32)
    upstream = rng.normal(size=(rows, units))
    return tf.cast(x, dtype), tf.constant(bias), tf.cast(upstream, dtype)


def _float64(t):
    return tf.cast(t, tf.float64).numpy()


def _pre_activation(x, bias):
    # The op adds the bias rounded to x's dtype, as Keras' autocast reads a float32 bias into a bf16 layer.
    return _float64(x) + _float64(tf.cast(bias, x.dtype))


def _gelu64(a):
    return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))


def _gelu_slope64(a):
    return 0.5 * (1.0 + _erf(a / math.sqrt(2.0))) + a * np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


def _rtol(dtype):
    # bfloat16: the float32 result rounded once (half an ulp, 2^-8 relative) plus erf's few float32 ulp.
    return 2.0 ** -8 * 1.01 if dtype == tf.bfloat16 else 2e-6


def _cancellation(a):
    # Where erf(a / sqrt 2) is near -1, 1 + erf keeps only erf's absolute error, a few float32 ulp of 1: Keras' and
    # XLA's float32 GELU lose the same digits there. 4 ulp, times the factor a / 2 (GELU) or 1 + |a| (its slope).
    return 4 * 2.0 ** -24 * np.abs(a)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_forward_is_gelu_of_x_plus_bias(dtype):
    x, bias, _ = _inputs(dtype)
    got = _float64(bias_ops.add_gelu(x, bias))
    a = _pre_activation(x, bias)
    expected = _gelu64(a)
    assert (np.abs(got - expected) <= _rtol(dtype) * np.abs(expected) + _cancellation(a) + 1e-30).all()
    assert bias_ops.add_gelu(x, bias).dtype == dtype


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_gradient_matches_float64(dtype):
    x, bias, upstream = _inputs(dtype, seed=1)
    with tf.GradientTape() as tape:
        tape.watch([x, bias])
        y = bias_ops.add_gelu(x, bias)
    x_grad, bias_grad = tape.gradient(y, [x, bias], output_gradients=upstream)
    assert x_grad.dtype == dtype and bias_grad.dtype == tf.float32
    a, upstream = _pre_activation(x, bias), _float64(upstream)
    expected = _gelu_slope64(a) * upstream
    error = np.abs(_float64(x_grad) - expected)
    assert (error <= _rtol(dtype) * np.abs(expected) + 2 * _cancellation(1 + np.abs(a)) * np.abs(upstream)).all()
    # The bias gradient sums the rounded x gradients: bound by the rounding of each term.
    tolerance = _rtol(dtype) * np.abs(expected).sum(0) + 1e-6
    np.testing.assert_array_less(np.abs(_float64(bias_grad) - expected.sum(0)), tolerance)


def test_nan_propagates():
    x, bias, upstream = _inputs(tf.float32)
    x = tf.tensor_scatter_nd_update(x, [[3, 5]], [np.nan])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bias_ops.add_gelu(x, bias)
    x_grad = tape.gradient(y, x, output_gradients=upstream)
    assert np.isnan(y.numpy()[3, 5]) and np.isnan(x_grad.numpy()[3, 5])
    assert np.isfinite(np.delete(y.numpy().ravel(), 3 * 40 + 5)).all()


def test_bias_gradient_sums_fixed_chunks_of_32_rows_in_order():
    # So the sum does not depend on how the rows are split between threads: rows 0-31, then row 32.
    x, bias, upstream = _inputs(tf.float32, rows=33, seed=2)

    def gradients(rows):
        with tf.GradientTape() as tape:
            tape.watch(bias)
            y = bias_ops.add_gelu(x[:rows], bias)
        return tape.gradient(y, [bias], output_gradients=upstream[:rows])[0].numpy()
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bias_ops.add_gelu(x, bias)
    last_row = tape.gradient(y, x, output_gradients=upstream).numpy()[32]
    np.testing.assert_array_equal(gradients(33), gradients(32) + last_row)


def test_fused_encoder_runs_the_op_in_training_only(monkeypatch):
    inputs, _, fused = encoder_pair_with_dropout()
    training_ops = graph_op_types(encoder_training_step(fused, inputs))
    assert {"EngineBiasGelu", "EngineBiasGeluGrad"} <= training_ops
    assert "EngineBiasGelu" not in graph_op_types(tf.function(lambda: fused(inputs, training=False)))
    monkeypatch.setenv(bias_ops.LIBRARY.switch, "0")
    assert "EngineBiasGelu" not in graph_op_types(encoder_training_step(fused, inputs))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_bias_add_has_the_bits_of_tensorflows_add(dtype):
    # Q/K/V biases have the kernel's trailing shape [heads, head_dim]: the op adds over the flattened trailing axes.
    x = tf.cast(tf.random.stateless_normal([3, 5, 4, 6], seed=[1, 2]) * 10, dtype)
    bias_values = tf.cast(tf.random.stateless_normal([4, 6], seed=[3, 4]), dtype)
    got, expected = bias_ops.add(x, bias_values), x + bias_values
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(tf.bitcast(got, tf.int16 if dtype == tf.bfloat16 else tf.int32).numpy(),
                                  tf.bitcast(expected, tf.int16 if dtype == tf.bfloat16 else tf.int32).numpy())
