"""engine/layer_norm_kernel.cc, which engine/layer_norm.training (and add_native_op, with the residual add)
runs on the CPU: the forward and every gradient against float64, at sizes that are not multiples of the kernel's
vector lanes (16) or row chunks (32), and in the traced graph only where it can run."""
import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf

from engine import layer_norm
from engine_helpers import encoder_pair_with_dropout, encoder_training_step, graph_op_types

EPSILON = 1e-12


def test_the_layer_norm_kernel_is_built_in_this_environment():
    assert layer_norm.LIBRARY.load() is not None, "engine/layer_norm_kernel.cc did not build: python -m engine.native"


@pytest.mark.parametrize("shape", [[5, 7, 37], [2, 40, 384], [3]])
def test_forward_and_gradients_match_float64(shape):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    gamma = rng.normal(size=shape[-1:]).astype(np.float32)
    beta = rng.normal(size=shape[-1:]).astype(np.float32)
    upstream = rng.normal(size=shape).astype(np.float32)

    @tf.function
    def compute(x, gamma, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y = layer_norm.training(x, gamma, beta, EPSILON)
        return [y] + tape.gradient(y, [x, gamma, beta], output_gradients=tf.constant(upstream))

    assert "EngineLayerNormGrad" in graph_op_types(compute, x, gamma, beta)
    got = [t.numpy() for t in compute(x, gamma, beta)]
    x64, dy = x.astype(np.float64), upstream.astype(np.float64)
    rstd = 1 / np.sqrt(x64.var(-1, keepdims=True) + EPSILON)
    x_hat = (x64 - x64.mean(-1, keepdims=True)) * rstd
    g = dy * gamma
    rows = tuple(range(len(shape) - 1))
    expected = [x_hat * gamma + beta,
                rstd * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True)),
                (dy * x_hat).sum(rows), dy.sum(rows)]
    for name, e, a in zip(("y", "dx", "dgamma", "dbeta"), expected, got):
        assert a.shape == e.shape, name
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=2e-6 * max(np.abs(e).max(), 1.0), err_msg=name)


def test_parameter_gradients_sum_fixed_chunks_of_32_rows_in_order():
    # So the sums do not depend on how the rows are split between threads (cpu_kernels.h's SumColumnsInFixedChunks,
    # which the bias op's gradient uses too): each chunk of 32 rows summed row by row from zero, in float32, then the
    # chunks' sums added in order. dbeta is the sum of the upstream rows, so float32 numpy redoes it bit for bit.
    rng = np.random.default_rng(3)
    x, upstream = (rng.normal(size=[100, 40]).astype(np.float32) for _ in range(2))
    gamma, beta = (rng.normal(size=[40]).astype(np.float32) for _ in range(2))
    module = layer_norm.LIBRARY.load()
    _, mean, rstd = module.engine_layer_norm(x, gamma, beta, epsilon=EPSILON)
    _, _, dbeta = module.engine_layer_norm_grad(upstream, x, mean, rstd, gamma)

    def in_order(rows):
        total = np.zeros(rows.shape[1:], np.float32)
        for row in rows:
            total = total + row
        return total
    chunked = in_order(np.stack([in_order(upstream[start:start + 32]) for start in range(0, 100, 32)]))
    np.testing.assert_array_equal(dbeta.numpy(), chunked)
    assert not np.array_equal(chunked, in_order(upstream))  # the check can tell the two orders apart


def test_xla_and_other_dtypes_keep_tensorflows_ops():
    x, gamma, beta = tf.ones([4, 8]), tf.ones([8]), tf.zeros([8])
    compiled = tf.function(lambda x: layer_norm.training(x, gamma, beta, EPSILON), jit_compile=True)
    assert "EngineLayerNorm" not in graph_op_types(compiled, x)
    half = tf.function(lambda x: layer_norm.training(x, tf.cast(gamma, tf.bfloat16), tf.cast(beta, tf.bfloat16),
                                                     EPSILON))
    assert "EngineLayerNorm" not in graph_op_types(half, tf.cast(x, tf.bfloat16))


@pytest.mark.parametrize("x_dtype,residual_dtype", [(tf.float32, tf.float32), (tf.bfloat16, tf.bfloat16),
                                                    (tf.bfloat16, tf.float32), (tf.float32, tf.bfloat16)])
def test_add_layer_norm_matches_float64_of_the_sum(x_dtype, residual_dtype):
    # Model Garden's block: LayerNorm(attended + source) in bf16 + bf16, LayerNorm(output + attended) in bf16 +
    # float32; the op sums in float32 (exactly, for bf16 inputs) and its gradient reaches each input in its dtype.
    rng = np.random.default_rng(1)
    shape = [3, 21, 37]
    x = tf.cast(rng.normal(size=shape) * 3, x_dtype)
    residual = tf.cast(rng.normal(size=shape) + 1, residual_dtype)
    gamma = tf.constant(rng.normal(size=shape[-1:]), tf.float32)
    beta = tf.constant(rng.normal(size=shape[-1:]), tf.float32)
    upstream = tf.constant(rng.normal(size=shape), tf.float32)

    @tf.function
    def compute(x, residual, gamma, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, residual, gamma, beta])
            y = layer_norm.add_native_op(x, residual, gamma, beta, EPSILON)
        return [y] + tape.gradient(y, [x, residual, gamma, beta], output_gradients=upstream)

    assert {"EngineAddLayerNorm", "EngineLayerNormGrad"} <= graph_op_types(compute, x, residual, gamma, beta)
    y, dx, dresidual, dgamma, dbeta = compute(x, residual, gamma, beta)
    assert dx.dtype == x_dtype and dresidual.dtype == residual_dtype
    total = tf.cast(x, tf.float64).numpy() + tf.cast(residual, tf.float64).numpy()
    rstd = 1 / np.sqrt(total.var(-1, keepdims=True) + EPSILON)
    x_hat = (total - total.mean(-1, keepdims=True)) * rstd
    dy, gamma64 = upstream.numpy().astype(np.float64), gamma.numpy().astype(np.float64)
    g = dy * gamma64
    d_total = rstd * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True))
    expected = {"y": x_hat * gamma64 + beta.numpy(), "dgamma": (dy * x_hat).sum((0, 1)), "dbeta": dy.sum((0, 1))}
    for name, got in (("y", y), ("dgamma", dgamma), ("dbeta", dbeta)):
        np.testing.assert_allclose(got.numpy(), expected[name], rtol=1e-5,
                                   atol=2e-6 * max(np.abs(expected[name]).max(), 1.0), err_msg=name)
    for name, got in (("dx", dx), ("dresidual", dresidual)):  # d_total rounded once to the input's dtype
        rtol = 2.0 ** -8 if got.dtype == tf.bfloat16 else 1e-5
        np.testing.assert_allclose(tf.cast(got, tf.float64).numpy(), d_total, rtol=rtol,
                                   atol=2e-6 * np.abs(d_total).max(), err_msg=name)


def test_fused_encoder_adds_and_normalizes_in_one_op_unless_switched_off(monkeypatch):
    # In training and at inference (export-safe graphs never: test_fusion.py); with the switch off, neither.
    inputs, _, fused = encoder_pair_with_dropout()
    assert "EngineAddLayerNorm" in graph_op_types(encoder_training_step(fused, inputs))
    assert "EngineAddLayerNorm" in graph_op_types(tf.function(lambda: fused(inputs, training=False)))
    monkeypatch.setenv(layer_norm.LIBRARY.switch, "0")
    assert "EngineAddLayerNorm" not in graph_op_types(encoder_training_step(fused, inputs))
    assert not {"EngineAddLayerNorm", "EngineLayerNorm"} & graph_op_types(
        tf.function(lambda: fused(inputs, training=False)))
