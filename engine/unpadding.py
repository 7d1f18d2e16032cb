"""Model Garden Transformer blocks run on a batch's real tokens only: the rows that move between the padded
layout [batch, seq, ...] and the token rows [1, rows, ...], and the block's sublayers on those rows.

engine/fusion.py decides when (_unpadded_block_call: at inference above a padding fraction, in training when
asked); this module does the work. Its own module because the row bookkeeping and its gradients are a job
of their own, separate from the per-layer kernel rewrites.
"""
from __future__ import annotations

import math

import tensorflow as tf

from engine import attention as attention_ops


def training_rows(tokens, positions):
    """How many rows a training batch's `tokens` run as: rounded up to 4 sizes per doubling (at most 25 % more
    rows, ~12 % on average; at least multiples of 16), at most the batch's `positions`."""
    octave = tf.floor(tf.math.log(tf.cast(tf.maximum(tokens, 1), tf.float32)) / math.log(2.0))
    step = tf.maximum(tf.cast(tf.pow(2.0, octave - 2.0), tf.int32), 16)
    return tf.minimum((tokens + step - 1) // step * step, positions)


def block_on_tokens(block, x, attention_mask, is_token, rows, training, ffn, add_norm):
    """The block on the first `rows` positions of [tokens in order, then padding] (`is_token`: [batch x seq])."""
    positions = tf.size(is_token)
    # Tokens first, each group in row-major order; rows beyond the tokens are padding positions, whose values
    # are computed and discarded like the stock block's. `slot`: each position's row, or `rows` (a zero row).
    permutation = tf.argsort(tf.cast(tf.logical_not(is_token), tf.int32), stable=True)
    order = permutation[:rows]
    slot = tf.minimum(tf.math.invert_permutation(permutation), rows)
    padded_shape = tf.shape(x)[:2]

    def unpad(t):  # [batch, seq, ...] -> [1, rows, ...]
        flat = tf.reshape(t, tf.concat([[positions], tf.shape(t)[2:]], 0))
        return tf.expand_dims(take_rows(flat, order, slot, training), 0)

    def pad(t):  # [1, rows, ...] -> [batch, seq, ...], zeros where no row went
        flat = spread_rows(tf.squeeze(t, 0), slot, order, training)
        return tf.reshape(flat, tf.concat([padded_shape, tf.shape(t)[2:]], 0))

    # At inference the rows are the tokens alone, in ascending position: attention can run on them directly.
    return block_sublayers(block, x, attention_mask, training, ffn, add_norm, unpad, pad,
                           row_positions=None if training else order)


def block_sublayers(block, x, attention_mask, training, ffn, add_norm, unpad=None, pad=None, row_positions=None):
    """A post-LayerNorm TransformerEncoderBlock's call (query residual, full attention), sublayer by sublayer:
    the projections, FFN (`ffn(attended)`: from the attention's LayerNorm output to the output projection's) and
    LayerNorms (`add_norm(layer, x, residual)`: the layer on x + residual, summed in the residual's dtype as the
    stock call does) on `unpad(x)`'s rows, attention on the padded layout; `pad` brings rows back. Without
    unpad/pad: the padded layout throughout, the stock call's ops. `row_positions` (inference only: each row's flat
    position in the padded batch, ascending; every position in the padded layout): attention on the rows
    themselves where our op can run (engine/attention.token_attention)."""
    unpad = unpad or (lambda t: t)
    pad = pad or (lambda t: t)
    attention = block._attention_layer
    source = unpad(x)
    projections = [dense(source) for dense in (attention._query_dense, attention._key_dense, attention._value_dense)]
    context = None
    if row_positions is not None:
        context = attention_ops.token_attention(attention, *projections, row_positions, attention_mask)
    if context is None:
        query, key, value = (pad(t) for t in projections)
        context = unpad(attention._compute_attention(query, key, value, attention_mask, training=training)[0])
    attended = block._attention_dropout(attention._output_dense(context))
    attended = add_norm(block._attention_layer_norm, attended, source)
    output = block._output_dropout(ffn(attended))
    # As the stock block: under a mixed policy the LayerNorm works in float32 (`attended` is float32 there).
    return pad(add_norm(block._output_layer_norm, output, attended))


# Moving rows between the padded layout and the token rows, both ways by gathers: `order` lists the rows'
# positions, `slot` each position's row (or one past the last, a zero row). Each is the other's gradient, since
# every row comes from exactly one position. With TensorFlow's own gradients (a gather's is a scatter-add,
# UnsortedSegmentSum) and a zero-filled ScatterNd to pad, moving rows took 17.6 ms of op time per update of
# make demo, 8.4 ms this way (bench/RESULTS.md). Inference (no tape, and inside a tf.cond) takes the plain ops.
def take_rows(flat, order, slot, with_gradient):  # [positions, ...] -> [rows, ...]
    if not with_gradient:
        return tf.gather(flat, order)

    @tf.custom_gradient
    def take(values):
        return tf.gather(values, order), lambda upstream: spread_rows(upstream, slot, order, True)
    return take(flat)


def spread_rows(values, slot, order, with_gradient):  # [rows, ...] -> [positions, ...], zeros where no row
    def spread(values):  # (a batch may have no tokens at all, e.g. a replica's share of a padded last batch)
        zero_row = tf.zeros(tf.concat([[1], tf.shape(values)[1:]], 0), values.dtype)
        return tf.gather(tf.concat([values, zero_row], 0), slot)
    if not with_gradient:
        return spread(values)

    @tf.custom_gradient
    def spread_with_gradient(values):
        return spread(values), lambda upstream: take_rows(upstream, order, slot, True)
    return spread_with_gradient(values)
