"""engine/dropout_kernel.cc's EngineSoftmaxDropout and its gradient, which the fused attention runs in training on
the CPU: the probabilities are Keras' masked softmax (against float64), the dropped values are keyed dropout's of
those probabilities bit for bit (so masks do not depend on which path ran), the gradient matches float64, and a
fused encoder trains with the stock layers' values and gradients under the same keys."""
import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from engine import dropout
from engine_helpers import DROPOUT_KEY, encoder_pair_with_dropout, encoder_training_step, graph_op_types

RATE = 0.1
KEY = DROPOUT_KEY


def _keyed_dropout_layer():
    """A Dropout layer keyed by dropout.rebind, and the key its first call draws under `dropout.keys(KEY)`."""
    model = tf_keras.Sequential([tf_keras.layers.Dropout(RATE)])
    assert dropout.rebind(model, xla=True) == 1
    layer = model.layers[0]
    layer_id = next(i for i, m in enumerate(model.submodules) if m is layer)
    return layer, dropout.fold_in(dropout.fold_in(KEY, layer_id), 0)


def _inputs(dtype, shape, seed=0):
    batch, _, queries, keys = shape
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 4).astype(np.float32)
    mask = (rng.random((batch, queries, keys)) > 0.3).astype(np.float32)
    mask[0, 0, :] = 0  # a query that attends to nothing: Keras' -1e9 swamps the logits, so its row is uniform
    return tf.cast(logits, dtype), tf.constant(mask)


def _keras_softmax_float64(logits, mask):
    x = tf.cast(logits, tf.float64).numpy() + (1.0 - mask.numpy()[:, None]) * -1e9
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _relative_tolerance(dtype):
    return 2.0 ** -8 if dtype == tf.bfloat16 else 2e-6  # bf16: one rounding (8 significant bits)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("shape", [[2, 3, 6, 40], [1, 3, 5, 7], [4, 12, 33, 33]])  # 15 rows: an odd count
def test_probabilities_are_kerass_masked_softmax_and_dropped_values_keyed_dropouts(dtype, shape):
    logits, mask = _inputs(dtype, shape)
    layer, layer_key = _keyed_dropout_layer()
    with dropout.keys(KEY):
        dropped, probabilities = dropout.softmax_dropout(logits, mask, layer)
    got = tf.cast(probabilities, tf.float64).numpy()
    expected = _keras_softmax_float64(logits, mask)
    attends = np.broadcast_to(mask.numpy().max(-1)[:, None, :, None] > 0, shape)
    np.testing.assert_allclose(got[attends], expected[attends], rtol=_relative_tolerance(dtype), atol=1e-30)
    assert np.all(got[np.broadcast_to(mask.numpy()[:, None] == 0, shape) & attends] == 0)
    np.testing.assert_allclose(got[0, :, 0], 1.0 / shape[-1], rtol=_relative_tolerance(dtype))
    # The dropped values are keyed dropout's (XLA and TensorFlow kernels) on these probabilities, bit for bit.
    for xla in (True, False):
        expected_dropped, keep = dropout._kernels(RATE, xla)[0](probabilities, layer_key)
        np.testing.assert_array_equal(tf.bitcast(dropped, tf.int16 if dtype == tf.bfloat16 else tf.int32),
                                      tf.bitcast(expected_dropped, tf.int16 if dtype == tf.bfloat16 else tf.int32))
    assert abs(1 - keep.numpy().mean() - RATE) < 0.05


def test_a_mask_shared_by_the_batch_broadcasts_as_in_keras():
    logits, mask = _inputs(tf.float32, [3, 2, 5, 7])
    layer, _ = _keyed_dropout_layer()
    with dropout.keys(KEY):
        _, probabilities = dropout.softmax_dropout(logits, mask[:1], layer)
    expected = _keras_softmax_float64(logits, tf.repeat(mask[:1], 3, axis=0))
    # Query 0 attends to nothing (uniform: see above); the others as if each batch row had the mask.
    np.testing.assert_allclose(probabilities[:, :, 1:], expected[:, :, 1:], rtol=2e-6, atol=1e-30)


def test_nan_logits_give_a_nan_row_and_other_rows_stay_finite():
    logits, mask = _inputs(tf.float32, [1, 2, 4, 16])
    logits = tf.tensor_scatter_nd_update(logits, [[0, 1, 2, 3]], [np.nan])
    with dropout.keys(KEY):
        _, probabilities = dropout.softmax_dropout(logits, mask, _keyed_dropout_layer()[0])
    assert np.isnan(probabilities[0, 1, 2]).all()
    rest = np.delete(probabilities.numpy().reshape(8, 16), 6, axis=0)
    assert np.isfinite(rest).all()


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("use_probabilities", [False, True])  # True: the attention scores feed the loss too
def test_gradient_matches_float64(dtype, use_probabilities):
    logits, mask = _inputs(dtype, [2, 3, 6, 40], seed=1)
    rng = np.random.default_rng(2)
    upstream = rng.normal(size=logits.shape).astype(np.float32)
    upstream_of_probabilities = rng.normal(size=logits.shape).astype(np.float32) if use_probabilities else 0.0
    layer, _ = _keyed_dropout_layer()

    @tf.function  # a graph, where TensorFlow fills an unused output's gradient with zeros (dropout._is_zero_fill)
    def compute():
        with tf.GradientTape() as tape:
            tape.watch(logits)
            with dropout.keys(KEY):
                dropped, probabilities = dropout.softmax_dropout(logits, mask, layer)
            loss = tf.reduce_sum(tf.cast(dropped, tf.float32) * upstream)
            if use_probabilities:
                loss += tf.reduce_sum(tf.cast(probabilities, tf.float32) * upstream_of_probabilities)
        return dropped, probabilities, tape.gradient(loss, logits)

    dropped, probabilities, grad = compute()
    p = tf.cast(probabilities, tf.float64).numpy()
    scale = float(tf.cast(1 / (1 - RATE), dtype))
    kept = dropped.numpy() != 0  # probabilities of masked keys are 0 and get no gradient either way
    def rounded(t):  # the upstream gradients reach the op in its dtype
        return tf.cast(tf.cast(t, dtype), tf.float64).numpy()
    g = rounded(upstream) * scale * kept + rounded(upstream_of_probabilities)
    expected = p * (g - (g * p).sum(-1, keepdims=True))
    got = tf.cast(grad, tf.float64).numpy()
    # bf16: the op's float32 math rounds once; the scores' part (TensorFlow's bf16 ops) rounds a few times more.
    atol = (2.0 ** (-6 if use_probabilities else -8) if dtype == tf.bfloat16 else 1e-6) * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=atol, rtol=_relative_tolerance(dtype))


def test_fused_encoder_trains_with_stock_values_and_gradients_under_the_same_keys(monkeypatch):
    inputs, stock, fused = encoder_pair_with_dropout()
    fused_step = encoder_training_step(fused, inputs)
    assert "EngineSoftmaxDropout" in graph_op_types(fused_step)
    assert "EngineSoftmaxDropoutGrad" in graph_op_types(fused_step)
    expected = [t.numpy() for t in encoder_training_step(stock, inputs)()]
    got = [t.numpy() for t in fused_step()]
    assert len(got) == len(expected) == len(stock.trainable_variables) + 1
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=3e-5 * max(np.abs(e).max(), 1e-3))
    # Inference has no dropout, so the layer's own softmax runs; with the switch off, training runs it too.
    assert "EngineSoftmaxDropout" not in graph_op_types(tf.function(lambda: fused(inputs, training=False)))
    monkeypatch.setenv(dropout.LIBRARY.switch, "0")
    assert "EngineSoftmaxDropout" not in graph_op_types(encoder_training_step(fused, inputs))
