"""Keras' MultiHeadAttention over one sequence axis as engine/fusion.py runs it: the scores and the context as
batched MatMuls over [batch, heads, seq, head_dim] instead of Keras' two einsums, which oneDNN runs as many small
head_dim-32 contractions with their own transposes. In training on the CPU the masked softmax and the attention
dropout are one C++ op and their gradient another (engine/dropout.softmax_dropout: the same masks as the keyed
Dropout layer); elsewhere they are the layer's own. At inference the transposes to and from heads-first run on the
bits as integers (see swap_seq_and_heads), and in float32 a short sentence's products and softmax run in Eigen's
kernels (see _inference_attention), or, in an export for a host that runs Eigen's kernels, a batch's products in
query chunks (_in_query_chunks), by halves of the heads (_in_head_halves). In our own process at inference in
float32 or bfloat16, a Transformer block's attention instead runs as one C++ op on the projections' rows as they
are (token_attention, called by engine/unpadding.py).
Its own module: fusion.py decides which layers to rebind, this is what one of them computes."""
from __future__ import annotations

import math

import tensorflow as tf
import tf_keras
from tf_keras.src.engine import base_layer_utils  # the call context: is this call training?

from engine import dropout, native


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
    onednn = lambda: _batched_matmul_attention(layer, query, key, value, attention_mask, training, in_training)
    if not in_training and query.dtype == tf.float32:
        context, scores = _inference_attention(query, key, value, attention_mask, onednn,
                                               getattr(layer, "_engine_eigen_host", False))
    else:
        context, scores = onednn()
    return swap_seq_and_heads(context, in_training), scores


def _batched_matmul_attention(layer, query, key, value, attention_mask, training, in_training):
    """(context, scores) on heads-first operands as BatchMatMulV2s, which TensorFlow's oneDNN build runs."""
    logits = tf.matmul(query, key, transpose_b=True)
    dropped, scores = softmax_and_dropout(layer, logits, attention_mask, training, in_training)
    return tf.matmul(dropped, value), scores


def softmax_and_dropout(layer, logits, attention_mask, training, in_training):
    """(dropped, probabilities): the layer's masked softmax of logits [batch, heads, queries, keys] and its
    attention dropout; in training on the CPU as one C++ op (engine/dropout.softmax_dropout)."""
    fused = dropout.softmax_dropout(logits, attention_mask, layer._dropout_layer) if in_training else None
    if fused is not None:
        return fused
    scores = layer._masked_softmax(logits, attention_mask)
    return layer._dropout_layer(scores, training=training), scores


def token_attention(layer, query, key, value, positions, attention_mask):
    """The layer's attention context at inference for a Transformer block (engine/unpadding.py): query, key and
    value as the projections give them, [1, rows, heads, head_dim] on a block's token rows or [batch, seq, heads,
    head_dim] in the padded layout, `positions` each row's flat position in the padded batch (ascending; every
    position in the padded layout), `attention_mask` Keras' [batch, seq, seq]. One C++ pass per sentence and head
    (attention_kernel.cc), where the padded way spreads Q, K and V back to [batch, seq, ...], swaps sequence and
    heads four times, runs two batched products and a softmax over every padded position and gathers the context
    again: ~9 % of a float32 task.predict's op time on the Zen 3 (bench/RESULTS.md). Padded keys are left out
    rather than weighted exp(-1e9) = 0, so this assumes what the token rows already assume: padding is masked out
    as a key. None where the op cannot run (another dtype or layout, an export-safe graph, not a CPU, or the
    library unavailable); the caller then takes the padded way."""
    if (attention_mask is None or attention_mask.shape.rank != 3 or query.shape.rank != 4
            or any(t.dtype != query.dtype or t.shape.rank != 4 for t in (key, value))
            or not query.shape[2:].is_compatible_with(value.shape[2:])):
        return None
    module = _token_attention_module(layer, query.dtype, query.device)
    if module is None:
        return None
    positions, mask = tf.cast(positions, tf.int32), tf.cast(attention_mask, tf.float32)
    scale = 1.0 / math.sqrt(float(layer._key_dim))

    @tf.custom_gradient
    def attend(query, key, value):
        def gradient(upstream):  # gradients at inference (e.g. saliency): those of the same math in TensorFlow's ops
            with tf.GradientTape() as tape:
                tape.watch([query, key, value])
                context = _token_attention_in_padded_ops(query, key, value, positions, mask, scale)
            return tape.gradient(context, [query, key, value], output_gradients=upstream)
        return module.engine_token_attention(query, key, value, positions, mask, scale=scale), gradient
    return attend(query, key, value)


def attends_on_token_rows(layer, dtype, device: str) -> bool:
    """Whether token_attention can run for this layer at inference on `dtype` operands on `device`, so that a block
    on its token rows moves only its input and output rows, not Q, K, V and the context too."""
    return _token_attention_module(layer, dtype, device) is not None


def _token_attention_module(layer, dtype, device: str):
    if not getattr(layer, "_engine_native_at_inference", False) or dtype not in (tf.float32, tf.bfloat16):
        return None
    return native.ATTENTION.load_for(device)


def _token_attention_in_padded_ops(query, key, value, positions, mask, scale):
    """token_attention's context in TensorFlow's ops: the rows spread to the padded layout [batch, seq, heads, dim]
    (zeros at the other positions, which the mask hides as keys), Keras' masked softmax attention, rows gathered."""
    shape, mask_shape = tf.shape(query), tf.shape(mask)
    padded_shape = tf.stack([mask_shape[0], mask_shape[1], shape[-2], shape[-1]])
    spread = lambda t: tf.reshape(tf.scatter_nd(positions[:, None], tf.reshape(t, tf.concat([[-1], shape[-2:]], 0)),
                                                tf.stack([mask_shape[0] * mask_shape[1], shape[-2], shape[-1]])),
                                  padded_shape)
    logits = tf.einsum("bqhd,bkhd->bhqk", spread(query) * scale, spread(key))
    logits += tf.cast(_mask_adder(mask[:, None]), logits.dtype)
    context = tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(logits), spread(value))
    return tf.reshape(tf.gather(tf.reshape(context, tf.concat([[-1], shape[-2:]], 0)), positions), shape)


# At inference in float32, attention products with at most this many score elements per head (batch x queries x
# keys: one sentence of up to 28 word-pieces) run in Eigen's kernel, larger ones in oneDNN's (_inference_attention).
# Eigen's was the faster up to ~25 word-pieces in a hot loop and 3x slower at 64 (bench/RESULTS.md, 2026-12-06).
EIGEN_SCORES_UP_TO = 28 * 28
# TensorFlow's CPU BatchMatMul (Eigen's kernels) shards a batch of products over its threads while each product
# costs at most this many multiply-adds (rows x inner x columns, kMaxCostOuterParallelism in TensorFlow 2.20's
# batch_matmul_op_impl.h); above it, it runs them one after another, each through Eigen's tensor contraction.
BATCH_MATMUL_SHARDS_UP_TO = 128 * 128


def _inference_attention(query, key, value, attention_mask, onednn, eigen_host: bool = False):
    """Keras' (context, scores) at inference in float32 on heads-first operands (`onednn()`: the usual way);
    `eigen_host`: the graph is an export for a host whose TensorFlow runs Eigen's kernels (_in_query_chunks).

    TensorFlow's oneDNN build rewrites every BatchMatMulV2 into _MklBatchMatMulV2 and every Softmax into
    _MklSoftmax; for one sentence ([1, 12, 25, 32] x [1, 12, 32, 25]) each hands its few microseconds of work to
    the intra-op thread pool and waits, and between two layers' attention those threads have gone to sleep. The
    rewrite leaves BatchMatMulV3 (the same product, with an output dtype) to Eigen's kernel, and a softmax spelled
    as Eigen ops stays Eigen's, so a short sentence's attention runs on the calling thread: the export answered
    SST-2 sentences 1.04-1.11x sooner (p50; bench/RESULTS.md, 2026-12-06). Eigen's products are slower on bigger
    operands (the export's batch-32 throughput 0.72-0.78x with them), hence the tf.cond on the size; the cond holds
    no weights, so the export does not grow."""
    shape = tf.shape(query)
    keys = tf.shape(key)[2]
    if eigen_host:
        # There eigen() runs the kernels onednn() runs (its softmax in elementwise ops cost single sentences ~1 %),
        # and batches whose products Eigen would contract one by one go in query chunks, by halves of the heads.
        chunks = tf.logical_and(shape[0] > 1, shape[2] * shape[3] * keys > BATCH_MATMUL_SHARDS_UP_TO)
        return tf.cond(chunks, lambda: _in_head_halves(query, key, value, attention_mask), onednn)
    small = shape[0] * shape[2] * keys <= EIGEN_SCORES_UP_TO

    def eigen():
        logits = tf.raw_ops.BatchMatMulV3(x=query, y=key, adj_y=True, Tout=query.dtype)
        if attention_mask is not None:  # Keras' _masked_softmax and Softmax layer: the mask's adder, then softmax
            mask = tf.cast(attention_mask, logits.dtype)
            while mask.shape.rank < logits.shape.rank:
                mask = tf.expand_dims(mask, -3)  # [batch, 1, queries, keys]
            logits += _mask_adder(mask)
        exps = tf.exp(logits - tf.reduce_max(logits, -1, keepdims=True))
        scores = exps / tf.reduce_sum(exps, -1, keepdims=True)
        return tf.raw_ops.BatchMatMulV3(x=scores, y=value, Tout=query.dtype), scores

    return tf.cond(small, eigen, onednn)


def _in_head_halves(query, key, value, attention_mask):
    """_in_query_chunks' (context, scores) on each half of the heads, concatenated: two independent subgraphs,
    which the serving host's two inter-op threads run side by side. For a host serving with one intra-op thread
    per half of the cores (engine/host.serving_intra_op_threads), where a batch's attention otherwise runs on one
    core: batches of 32 SST-2 sentences 1.19x and 1.11x faster on the Zen 3 with the query chunks in halves (two
    in-process A/Bs of bench/export_ab.py, one in each order; bench/RESULTS.md, 2026-12-07). Not for single
    sentences: their attention is a few per cent of a call, and halving it measured within noise (1.10x one way,
    0.97x the other)."""
    half = (query.shape[1] or 0) // 2
    if not half:
        return _in_query_chunks(query, key, value, attention_mask)
    parts = [_in_query_chunks(query[:, heads], key[:, heads], value[:, heads], attention_mask)
             for heads in (slice(0, half), slice(half, None))]
    return tf.concat([context for context, _ in parts], 1), tf.concat([scores for _, scores in parts], 1)


def _in_query_chunks(query, key, value, attention_mask):
    """Keras' (context, scores) at inference, each sentence's query rows in chunks whose products cost at most
    BATCH_MATMUL_SHARDS_UP_TO, every chunk a batch entry of its own: Eigen's BatchMatMul then shards the entries
    over its threads instead of contracting the batch x heads products one by one (~10 us of set-up each). Five
    layers' attention at batch 32 on the Zen 3 (bench/RESULTS.md): 1.3-1.8x faster at 23-57 word-pieces, 1.16x at
    128; at batch 1 (12 products) one by one is as fast or faster, so only batches take this. The last chunk is
    padded with query rows whose results are dropped."""
    shape = tf.shape(query)  # [batch, heads, queries, head_dim]
    batch, heads, queries, head_dim, keys = shape[0], shape[1], shape[2], shape[3], tf.shape(key)[2]
    rows = tf.maximum(BATCH_MATMUL_SHARDS_UP_TO // (head_dim * keys), 1)
    chunks = (queries + rows - 1) // rows
    padding = [[0, 0], [0, chunks * rows - queries], [0, 0]]  # of the query rows, for [batch or heads, queries, x]
    in_chunks = tf.reshape(tf.pad(query, [[0, 0]] + padding), tf.stack([batch, heads, chunks, rows, head_dim]))
    logits = tf.matmul(in_chunks, key[:, :, None], transpose_b=True)  # [batch, heads, chunks, rows, keys]
    if attention_mask is not None:  # as _inference_attention's eigen(): Keras' adder, then the softmax
        mask = tf.broadcast_to(tf.cast(attention_mask, logits.dtype), tf.stack([batch, queries, keys]))
        mask = tf.pad(mask, padding, constant_values=1.0)
        logits += _mask_adder(tf.reshape(mask, tf.stack([batch, 1, chunks, rows, keys])))
    scores = tf.nn.softmax(logits)
    context = tf.matmul(scores, value[:, :, None])  # [batch, heads, chunks, rows, head_dim]
    unchunked = lambda t: tf.reshape(t, tf.stack([batch, heads, chunks * rows, -1]))[:, :, :queries]
    return unchunked(context), unchunked(scores)


def _mask_adder(mask):
    """What Keras' masked softmax adds to the logits where a float32 `mask` is 0 (its _large_compatible_negative
    for float32), for the softmaxes written out here."""
    return (1.0 - mask) * -1e9


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
