"""Keras' MultiHeadAttention over one sequence axis as engine/fusion.py runs it: the scores and the context as
batched MatMuls over [batch, heads, seq, head_dim] instead of Keras' two einsums, which oneDNN runs as many small
head_dim-32 contractions with their own transposes. In training on the CPU the masked softmax and the attention
dropout are one C++ op and their gradient another (engine/dropout.softmax_dropout: the same masks as the keyed
Dropout layer); elsewhere they are the layer's own. At inference the transposes to and from heads-first run on the
bits as integers (see swap_seq_and_heads). Its own module: fusion.py decides which layers to rebind, this is what
one of them computes."""
from __future__ import annotations

import math

import tensorflow as tf
import tf_keras
from tf_keras.src.engine import base_layer_utils  # the call context: is this call training?

from engine import dropout


def is_plain(layer) -> bool:
    """A MultiHeadAttention with Keras' own _compute_attention and its einsums over one sequence axis."""
    return (isinstance(layer, tf_keras.layers.MultiHeadAttention)
            and type(layer)._compute_attention is tf_keras.layers.MultiHeadAttention._compute_attention
            and getattr(layer, "_dot_product_equation", None) == "aecd,abcd->acbe"
            and getattr(layer, "_combine_equation", None) == "acbe,aecd->abcd")


def compute_attention(layer, query, key, value, attention_mask=None, training=None):
    """Keras' _compute_attention with its two einsums ("aecd,abcd->acbe", "acbe,aecd->abcd") as batched MatMuls;
    the scale is the layer's own, and so are the masked softmax and dropout except in training on the CPU."""
    in_training = training is True or (training is None and bool(base_layer_utils.call_context().training))
    query = tf.multiply(query, 1.0 / math.sqrt(float(layer._key_dim)))
    query, key, value = (swap_seq_and_heads(t, in_training) for t in (query, key, value))
    logits = tf.matmul(query, key, transpose_b=True)
    fused = dropout.softmax_dropout(logits, attention_mask, layer._dropout_layer) if in_training else None
    if fused is None:
        scores = layer._masked_softmax(logits, attention_mask)
        dropped = layer._dropout_layer(scores, training=training)
    else:
        dropped, scores = fused
    return swap_seq_and_heads(tf.matmul(dropped, value), in_training), scores


# Same-width integer types for swap_seq_and_heads.
_AS_INTEGERS = {tf.float32: tf.int32, tf.bfloat16: tf.int16, tf.float16: tf.int16}


def swap_seq_and_heads(tensor, training: bool):
    """[batch, seq, heads, head_dim] <-> [batch, heads, seq, head_dim].

    At inference the transpose runs on the bits as same-width integers: TensorFlow's oneDNN build rewrites every
    float Transpose into _MklTranspose, which took ~50 us for one sentence's [1, 25, 12, 32] against ~5 us for
    Eigen's integer transpose (the same at batch 32; bench/RESULTS.md), and a forward has 4 per layer. Bitcasts
    are views; the gradient (for gradients taken at inference, e.g. saliency) is the plain transpose. Training
    keeps tf.transpose."""
    if training or tensor.dtype not in _AS_INTEGERS:
        return tf.transpose(tensor, [0, 2, 1, 3])
    return _swap_as_integers(tensor)


@tf.custom_gradient
def _swap_as_integers(tensor):
    swapped = tf.bitcast(tf.transpose(tf.bitcast(tensor, _AS_INTEGERS[tensor.dtype]), [0, 2, 1, 3]), tensor.dtype)
    return swapped, lambda upstream: tf.transpose(upstream, [0, 2, 1, 3])  # the swap is its own inverse
