"""engine/layer_norm_kernel.cc, which engine/layer_norm.training runs on the CPU: the forward and every gradient
against float64, at sizes that are not multiples of the kernel's vector lanes (16) or row chunks (32), and in the
traced graph only where it can run."""
import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf

from engine import layer_norm
from engine_helpers import graph_op_types

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


def test_xla_and_other_dtypes_keep_tensorflows_ops():
    x, gamma, beta = tf.ones([4, 8]), tf.ones([8]), tf.zeros([8])
    compiled = tf.function(lambda x: layer_norm.training(x, gamma, beta, EPSILON), jit_compile=True)
    assert "EngineLayerNorm" not in graph_op_types(compiled, x)
    half = tf.function(lambda x: layer_norm.training(x, tf.cast(gamma, tf.bfloat16), tf.cast(beta, tf.bfloat16),
                                                     EPSILON))
    assert "EngineLayerNorm" not in graph_op_types(half, tf.cast(x, tf.bfloat16))
