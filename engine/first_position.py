"""A Transformer block that outputs its first position only ([CLS]; Model Garden's `output_range=1`, the last
block of a [CLS]-pooled classifier) without projecting every token to keys and values.

The stock block still multiplies all T positions by the key and value kernels (2 T D^2 multiply-adds) for the
one query that reads them. For one query q of head n, with x_t the block's input at position t:

    score_t = q . (x_t Wk_n + bk_n) = (Wk_n q) . x_t + q . bk_n

and the last term is the same for every t, which the softmax over t ignores; and with d_t the probabilities
after attention dropout (sum_t d_t = 1 without it),

    context = sum_t d_t (x_t Wv_n + bv_n) = (sum_t d_t x_t) Wv_n + (sum_t d_t) bv_n.

So each head needs Wk_n q, the scores against the inputs themselves, and one weighted sum of the inputs:
2 T D x heads multiply-adds instead of 2 T D^2 (MiniLM: 9.2 thousand per token instead of 295 thousand; ~3 % of
a [CLS] classifier's forward, and its gradient likewise). The same arithmetic up to float rounding, the same
dropout masks. Model Garden's block has no such mode."""
from __future__ import annotations

import math

import tensorflow as tf

from engine import attention as attention_ops
from engine import dense as dense_ops

_PROJECTION = "abc,cde->abde"  # Keras MultiHeadAttention's query/key/value EinsumDense: [B, T, D] -> [B, T, N, H]


def applies(block) -> bool:
    """Whether block_call computes this (plain, post-LayerNorm: engine/fusion.py checks that) block's attention:
    its key and value projections are plain EinsumDenses over one sequence axis."""
    attention = block._attention_layer
    return all(dense_ops.is_plain(layer) and layer.equation == _PROJECTION
               for layer in (attention._query_dense, attention._key_dense, attention._value_dense))


def block_call(block, x, attention_mask, training, ffn, add_norm):
    """The block's output at position 0, [batch, 1, D]; `ffn` and `add_norm` as in engine/unpadding.block_sublayers.
    In training the key bias gets no gradient: it changes no output (the stock block's is rounding noise)."""
    attention = block._attention_layer
    target = x[:, :1, :]
    query = attention._query_dense(target)[:, 0]  # [B, N, H]
    query *= 1.0 / math.sqrt(float(attention._key_dim))
    inputs = tf.cast(x, query.dtype)
    key_query = _per_head(query, attention._key_dense, "bnh,dnh->bnd", heads_first=[1, 2, 0])  # Wk_n q: [B, N, D]
    logits = tf.matmul(key_query, inputs, transpose_b=True)  # [B, N, T]
    # The masked softmax and attention dropout as the stock attention runs them on [B, N, queries, T] with the
    # first query's mask row: the same shape, so a keyed dropout draws the same mask.
    dropped, _ = attention_ops.softmax_and_dropout(attention, logits[:, :, None, :], attention_mask[:, :1, :],
                                                   training, training)
    mixed = tf.matmul(dropped[:, :, 0, :], inputs)  # sum_t p_t x_t per head: [B, N, D]
    context = _per_head(mixed, attention._value_dense, "bnd,dnh->bnh", heads_first=[1, 0, 2])  # [B, N, H]
    value_bias = _weight(attention._value_dense, "bias", query.dtype)
    if value_bias is not None:
        context += value_bias * tf.reduce_sum(dropped[:, :, 0, :], -1)[..., None] if training else value_bias
    attended = block._attention_dropout(attention._output_dense(context[:, None]), training=training)  # [B, 1, D]
    attended = add_norm(block._attention_layer_norm, attended, target)
    return add_norm(block._output_layer_norm, block._output_dropout(ffn(attended), training=training), attended)


def _per_head(x, layer, equation: str, heads_first: list):
    """tf.einsum(equation, x, kernel) for x [B, N, *] and the EinsumDense's kernel [D, N, H], head by head.
    An export's held kernel is laid out heads first instead (`heads_first`: [N, H, D] or [N, D, H]) for a product
    batched over heads: TensorFlow folds that transpose into the constant, where tf.einsum transposes the kernel
    inside every call (~0.35 ms of a batch-1 call on an AMD EPYC Zen 3). Variables keep tf.einsum: its gradient
    contracts over the batch, where the gradient of a product broadcast over it materializes [B, N, H, D]."""
    kernel = _weight(layer, "kernel", x.dtype)
    if getattr(layer, "_held_kernel", None) is None:
        return tf.einsum(equation, x, kernel)
    return tf.matmul(x[:, :, None, :], tf.transpose(kernel, heads_first))[:, :, 0, :]


def _weight(layer, name: str, dtype):
    """The EinsumDense's `kernel` ([D, N, H]) or `bias` ([N, H]; None without one): a serving export's held
    constant (engine/dense.hold_kernels_in holds both, flattened) if it has one, else the variable."""
    variable = getattr(layer, name)
    if variable is None:
        return None
    held = getattr(layer, f"_held_{name}", None)
    return tf.cast(tf.reshape(variable if held is None else tf.constant(held), variable.shape), dtype)
