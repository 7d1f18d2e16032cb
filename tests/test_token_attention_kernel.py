"""engine/attention_kernel.cc's EngineTokenAttention, which Transformer blocks run at inference in our own process
(engine/attention.token_attention): each sentence's rows attend to that sentence's rows under Keras' mask, as the
float64 masked softmax over the padded positions gives it, in float32 and bfloat16; the fused encoder runs it in
both layouts (token rows, padded) and gives the NumPy BERT's values, while exports and the switch keep TensorFlow's
ops (test_fusion.py)."""
import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf

from engine import native

LIBRARY = native.ATTENTION


def _module():
    module = LIBRARY.load()
    assert module is not None, "the token attention kernel did not build here"
    return module


def _keras_attention_float64(query, key, value, mask, scale):
    """Keras' MultiHeadAttention core on the padded layout in float64: [batch, seq, heads, dim] operands."""
    logits = np.einsum("bqhd,bkhd->bhqk", query.astype(np.float64) * scale, key.astype(np.float64))
    logits += (1.0 - mask[:, None].astype(np.float64)) * -1e9
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probabilities, value.astype(np.float64))


def _case(token_mask, heads, head_dim, seed=0, within=None):
    """Padded operands for `token_mask` [batch, seq] (1: a token), Keras' mask over them (a token attends to the
    tokens of its sentence; `within`: also only where within[b, q, k]), and the token rows in position order."""
    rng = np.random.default_rng(seed)
    batch, seq = token_mask.shape
    padded = [rng.normal(size=(batch, seq, heads, head_dim)).astype(np.float32) for _ in range(3)]
    mask = np.broadcast_to(token_mask[:, None, :], (batch, seq, seq)).astype(np.float32)
    if within is not None:
        mask = mask * within
    positions = np.flatnonzero(token_mask.reshape(-1)).astype(np.int32)
    rows = [t.reshape(batch * seq, heads, head_dim)[positions][None] for t in padded]
    return padded, mask, positions, rows


@pytest.mark.parametrize("head_dim", [32, 40, 12, 1])  # 32 at a time, then 8, then one: each path and remainder
@pytest.mark.parametrize("lengths", [[17, 1, 33, 5], [16], [3, 0, 2]])  # a sentence without tokens too
def test_each_sentences_rows_attend_as_kerass_masked_softmax_in_float64(head_dim, lengths):
    seq = max(lengths) + 3
    token_mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
    padded, mask, positions, rows = _case(token_mask, heads=3, head_dim=head_dim)
    scale = 1.0 / np.sqrt(head_dim)
    got = _module().engine_token_attention(*rows, positions, mask, scale=scale).numpy()
    expected = _keras_attention_float64(*padded, mask, scale).reshape(-1, 3, head_dim)[positions]
    assert got.shape == (1, len(positions), 3, head_dim)
    np.testing.assert_allclose(got[0], expected, atol=2e-6, rtol=2e-5)


def test_tokens_anywhere_in_a_row_and_a_mask_within_the_sentence_are_kerass():
    """Tokens with padding between them (the mask rows are then read position by position) and a mask that also
    hides some tokens from some queries (each query keeps itself): Keras' values at every token row."""
    rng = np.random.default_rng(1)
    token_mask = (rng.random((3, 21)) < 0.6).astype(np.float32)
    token_mask[:, 0] = 1
    within = (rng.random((3, 21, 21)) < 0.7).astype(np.float32)
    within[:, np.arange(21), np.arange(21)] = 1
    padded, mask, positions, rows = _case(token_mask, heads=2, head_dim=32, within=within)
    got = _module().engine_token_attention(*rows, positions, mask, scale=0.25).numpy()
    expected = _keras_attention_float64(*padded, mask, 0.25).reshape(-1, 2, 32)[positions]
    np.testing.assert_allclose(got[0], expected, atol=2e-6, rtol=2e-5)


def test_every_position_of_the_padded_layout_is_the_stock_attention_padding_rows_included():
    """The padded layout's way (engine/fusion.py): every position is a row, [batch, seq, heads, dim] as is; padded
    keys are masked out, padded queries give the stock layer's values too."""
    token_mask = (np.arange(9)[None] < np.asarray([[9], [4]])).astype(np.float32)
    padded, mask, _, _ = _case(token_mask, heads=4, head_dim=8)
    got = _module().engine_token_attention(*padded, np.arange(18, dtype=np.int32), mask, scale=0.5).numpy()
    np.testing.assert_allclose(got, _keras_attention_float64(*padded, mask, 0.5), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("head_dim", [32, 40, 12, 1])
def test_bfloat16_operands_attend_in_float32_and_round_only_the_context(head_dim):
    """bfloat16 Q, K and V (mixed_bfloat16 evaluation): the scale rounded to bfloat16 as the stock layer's multiply
    rounds it, then float32 throughout: the context is the float64 attention of the bf16 operands rounded once,
    within half a bf16 step (a version rounding the scaled query, logits or probabilities is off by several)."""
    lengths = [17, 1, 33, 5]
    seq = max(lengths) + 3
    token_mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
    padded, mask, positions, rows = _case(token_mask, heads=3, head_dim=head_dim, seed=5)
    padded = [tf.cast(t * 2.0, tf.bfloat16) for t in padded]  # logits of a few units: softmaxes not all one-hot
    rows = [tf.cast(t * 2.0, tf.bfloat16) for t in rows]
    scale = 1.0 / np.sqrt(head_dim)
    got = _module().engine_token_attention(*rows, positions, mask, scale=scale)
    assert got.dtype == tf.bfloat16
    rounded_scale = float(tf.cast(tf.cast(scale, tf.bfloat16), tf.float32))
    expected = _keras_attention_float64(*[t.numpy().astype(np.float64) for t in padded], mask, rounded_scale)
    expected = expected.reshape(-1, 3, head_dim)[positions]
    got = got.numpy().astype(np.float64)[0]
    half_step = np.abs(expected) * 2.0 ** -8 + 1e-6  # half of bf16's spacing (8 significant bits), plus float32's
    assert np.all(np.abs(got - expected) <= half_step), np.max(np.abs(got - expected) / half_step)


@pytest.mark.parametrize("positions, message", [([0, 2, 1], "ascend"), ([0, 1, 40], "ascend within"),
                                                ([-1, 0, 1], "ascend within")])
def test_positions_out_of_order_or_range_are_refused(positions, message):
    token_mask = np.ones((2, 4), np.float32)
    _, mask, _, _ = _case(token_mask, heads=1, head_dim=8)
    rows = tf.zeros([1, 3, 1, 8])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _module().engine_token_attention(rows, rows, rows, np.asarray(positions, np.int32), mask, scale=1.0)


def test_mismatched_operands_are_refused():
    mask = np.ones((1, 4, 4), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one shape"):
        _module().engine_token_attention(tf.zeros([1, 4, 2, 8]), tf.zeros([1, 4, 2, 4]), tf.zeros([1, 4, 2, 8]),
                                         np.arange(4, dtype=np.int32), mask, scale=1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="positions"):
        _module().engine_token_attention(*[tf.zeros([1, 4, 2, 8])] * 3, np.arange(3, dtype=np.int32), mask,
                                         scale=1.0)



@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_gradients_at_inference_are_those_of_kerass_attention(dtype):
    """Gradients taken at inference (e.g. saliency) through attention.token_attention: the op has none of its own,
    so they come from the same math in TensorFlow's ops (in bf16 under mixed bf16); here against Keras' attention
    in float64 on the same operands."""
    from engine import attention  # pylint: disable=import-outside-toplevel

    class Layer:  # what token_attention reads of a rebound MultiHeadAttention
        _engine_native_at_inference = True
        _key_dim = 8

    token_mask = (np.arange(7)[None] < np.asarray([[7], [3], [5]])).astype(np.float32)
    padded, mask, positions, rows = _case(token_mask, heads=2, head_dim=8, seed=3)
    weights = np.random.default_rng(4).normal(size=rows[0].shape)

    rows = [tf.cast(tf.cast(t, dtype), tf.float32).numpy() for t in rows]  # operands that bf16 holds exactly
    padded = [tf.cast(tf.cast(t, dtype), tf.float32).numpy() for t in padded]

    def gradient(attend, operands):
        operands = [tf.constant(t) for t in operands]
        with tf.GradientTape() as tape:
            tape.watch(operands)
            loss = tf.reduce_sum(attend(*operands) * tf.cast(weights, operands[0].dtype))
        return [g.numpy() for g in tape.gradient(loss, operands)]

    mask64 = tf.constant(mask, tf.float64)

    def keras_float64(query, key, value):  # on the padded layout, then the token rows
        logits = tf.einsum("bqhd,bkhd->bhqk", query / np.sqrt(8.0), key) + (1.0 - mask64[:, None]) * -1e9
        context = tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(logits), value)
        return tf.gather(tf.reshape(context, [-1, 2, 8]), positions)[None]
    got = gradient(lambda q, k, v: attention.token_attention(Layer(), q, k, v, positions, tf.constant(mask)),
                   [t.astype(dtype.as_numpy_dtype) for t in rows])
    expected = gradient(keras_float64, [t.astype(np.float64) for t in padded])
    atol, rtol = (1e-5, 1e-4) if dtype == tf.float32 else (0.05, 0.05)  # bf16: each op rounds to 8 bits
    for g, e in zip(got, expected):  # the padded gradient at the token positions (zero elsewhere: masked keys)
        assert g.dtype == dtype.as_numpy_dtype
        np.testing.assert_allclose(g[0].astype(np.float64), e.reshape(-1, 2, 8)[positions], atol=atol, rtol=rtol)
