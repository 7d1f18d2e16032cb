"""The trained model's layers rebound to kernels that run faster on CPU: XLA islands and oneDNN fusions.

Why: on CPU the non-matmul ops of BERT cost far more than their FLOPs, and some matmuls run below peak.
TensorFlow's generic elementwise kernels are built for a baseline ISA (bf16 ones convert through fp32 in
portable code), while XLA compiles a few ops for the host's vector units; whole-model XLA does not help on
such CPUs because its matmuls lose to oneDNN's (bench/RESULTS.md). So:

  * Dropout: engine/dropout.py's keyed dropout, mask and scaling as one XLA kernel (on the CPU outside XLA,
    the forward pass as our C++ op with the same bits).
  * Activation layers: their activation function XLA-compiled, and its gradient as a second XLA kernel that
    differentiates it inside (see _compiled), in float32 inside the kernels for 16-bit inputs; one pinned to
    float32 under a mixed policy (Model Garden's FFN GELU) is switched to the 16-bit dtype, which gives the
    same values without the casts around it.
  * EinsumDense layers whose equation contracts the input's trailing axes (BERT's Q/K/V, attention output
    and FFN projections; engine/dense.py): one 2-D MatMul + BiasAdd, which grappler's oneDNN remapper fuses into
    a single `_MklFusedMatMul` (Keras' Einsum + AddV2 runs the bias as a separate pass); in bfloat16 on AMX CPUs
    the bias stays a separate op, since that fused op has no AMX kernel. In training the bias gradient is a
    matmul of ones summed in float32 (TensorFlow's BiasAddGrad sums bf16 in bf16), for Keras' Dense layers
    (heads, Model Garden's pooler) too. At inference the FFN's GELU joins the fusion (MatMul + BiasAdd +
    GeluExact); in training on the CPU the FFN's bias and GELU are our C++ op (engine/bias.py, which recomputes
    the pre-activation in its backward pass), and elsewhere the GELU stays the XLA Activation kernel.
  * Multi-head attention (Keras' MultiHeadAttention over one sequence axis; engine/attention.py): the scores and
    the context as batched MatMuls over [batch, heads, seq, head_dim] instead of Keras' two einsums; in training
    on the CPU the masked softmax and the attention dropout as one C++ op, and their gradient as another.
  * LayerNormalization over the last axis (engine/layer_norm.py): on the CPU as one C++ pass forward (and one
    backward in training), in a Transformer block with its residual add (_add_layer_norm); elsewhere Keras'
    forward ops with a closed-form gradient in training, and at inference fewer ops than Keras' moments +
    batch_normalization (export-safe graphs always: they must run where our libraries do not exist).
  * Model Garden's Transformer blocks, sublayer by sublayer (so that the FFN and the residual adds can take the
    C++ ops); at inference when over 15 % of the batch's positions are padding (5 % where attention runs as our
    op), and in training when asked (RuntimeConfig.skip_padding_in_training), the projections, FFN and LayerNorms
    on the real tokens only, gathered into one row ([1, tokens, hidden]); attention runs on the padded layout,
    except at inference in our own process (float32 or bfloat16), where it runs as one C++ op on the rows themselves
    (attention.token_attention; see _block_call; the rows move in engine/unpadding.py). Zeros at padded positions.
  * Model Garden's word-embedding lookup (OnDeviceEmbedding): gathered from a dense read of the table
    instead of by ResourceGather, which would put the variable into TensorFlow's copy-on-read mode, where
    every optimizer update copies the whole table (see _embedding_call). Not in export_safe graphs: they
    never update the table.

Measured on AMD EPYC Zen 4 (bench/RESULTS.md, 2026-12-01): MiniLM forward at batch 32 on SST-2 dev 1.15x
stock Keras; no gain at batch 1, where the extra reshapes cost as much as they save;
training at seq 128, batch 32: engine / model.fit 1.01 -> 1.15x in float32, unchanged (1.18-1.20x) in
mixed_bfloat16. Values are the same up to float rounding (tests/test_fusion.py), and do not depend on the batch size.
The embedding lookup, on an Intel Xeon with AMX (2026-12-01): bf16 batch 32, seq 32 1.05x (126.6 vs
121.1 examples/s, 3 alternating process pairs), seq 128 1.01x: it saves a fixed ~12 ms per update.

Not an XLA kernel, on purpose: LayerNorm. As an XLA kernel it made MiniLM inference about 4 % faster, but its results
depended on the batch's shape (two workers evaluating 7 rows each disagreed with one process evaluating 14:
tests/test_multi_worker.py), and its gradient reductions rounded differently enough to show after Adam's first
step (1 x 16 vs 4 x 4 micro-batches, tests/test_classification.py). The C++ training kernel computes every row
alike whatever the batch, and sums its gradient over fixed chunks of rows.

`fuse_elementwise(model)` rebinds `call` on the model's own layer instances, not on the classes, so other
models in the process, e.g. a `model.fit` baseline, keep the stock layers. `export_safe=True` leaves out
the XLA kernels, for graphs that must run where XLA may not exist (a SavedModel served elsewhere).
"""
from __future__ import annotations

import functools

import tensorflow as tf
import tf_keras
from tf_keras.src.mixed_precision import autocast_variable  # reading a variable in its own dtype

from engine import attention, dropout, first_position, host, layer_norm, unpadding
from engine import bias as bias_ops  # (layers have `bias` attributes and arguments)
from engine import dense as dense_ops  # (and local `dense` layers)


def resolve_fuse_elementwise(setting) -> bool:
    """RuntimeConfig.fuse_elementwise: True, False, or "auto" = on for the CPU, where it was measured (above),
    off on GPUs and TPUs. A TPU runs the whole step as one XLA program anyway (islands inside it are simply
    inlined); on GPUs cuDNN/cuBLAS and TensorFlow's grappler already fuse matmul+bias+activation, and XLA
    (--jit_compile) fuses the elementwise rest; the CPU-tuned islands were not measured there."""
    if setting == "auto":
        return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return bool(setting)


def for_inference(model: tf.Module, *, export_safe: bool = False) -> dict[str, int]:
    """What launch.predict (and the bench's copy of its path) applies to a restored model: the rewrites where
    "auto" turns them on (CPU). launch.export passes export_safe=True: a SavedModel may be served on a machine
    without XLA or on another device, so it gets the rewrites made of standard TensorFlow ops only."""
    return fuse_elementwise(model, export_safe=export_safe) if export_safe or resolve_fuse_elementwise("auto") else {}


_training = dense_ops.in_training  # whether the layer call in progress is a training call


# ------------------------------------------------------------------------------------------ XLA islands

@functools.lru_cache(maxsize=None)
def _compiled(activation):
    """The activation as two XLA kernels: the forward, and a backward that differentiates it inside one kernel,
    recomputing the forward from x there. TensorFlow's own gradient of the compiled forward ran ~3x the forward's
    time: GELU's forward + backward on [32, 128, 1536] bf16 took 21.1 ms that way, 11.2 ms this way (AMX Xeon,
    bench/RESULTS.md). The same math: in bf16 a few gradients in 10^6 differ from TensorFlow's by one unit in
    the last place, in float32 by at most 5e-7."""
    def in_float32(x):
        # XLA:CPU runs bf16/fp16 transcendentals (GELU's erf) through per-op conversions: upcasting once
        # inside the kernel halves GELU's forward+backward CPU time in bf16 and rounds once instead of per op.
        if x.dtype in (tf.bfloat16, tf.float16):
            return tf.cast(activation(tf.cast(x, tf.float32)), x.dtype)
        return activation(x)

    forward = tf.function(in_float32, jit_compile=True)

    @tf.function(jit_compile=True)
    def backward(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = in_float32(x)
        return tape.gradient(outputs, x, output_gradients=upstream)

    @tf.custom_gradient
    def compiled(x):
        return forward(x), lambda upstream: backward(x, upstream)
    return compiled


def _fused_activation_call(layer: tf_keras.layers.Activation, inputs):
    if getattr(layer, "_fused_into_dense", False) and not _training():
        return inputs  # applied by the preceding dense layer's fused MatMul (see engine/dense.py)
    return _compiled(layer.activation)(inputs)


# ----------------------------------------------------------------------------------------- oneDNN fusions

def _trains_with_our_kernels(layer) -> bool:
    """Whether engine/layer_norm's training kernels fit a LayerNormalization over its axis: Keras' unfused path,
    with both gamma and beta."""
    return not layer._fused and layer.scale and layer.center


def _layer_norm_call(layer, inputs):
    # Keras' LayerNormalization over the last axis with engine/layer_norm's kernels: the C++ op in training, and at
    # inference outside export-safe graphs (_native_at_inference); else Keras' forward ops with a closed-form
    # gradient in training, fewer ops at inference. Keras' call elsewhere (other axes, its fused path).
    last = inputs.shape.rank - 1 if inputs.shape.rank is not None else None
    training = _training()
    if isinstance(inputs, tf.RaggedTensor) or layer.axis != [last] or training and not _trains_with_our_kernels(layer):
        return type(layer).call(layer, inputs)
    inputs = tf.cast(inputs, layer.compute_dtype)
    input_dtype = inputs.dtype
    if input_dtype in (tf.float16, tf.bfloat16) and layer.dtype == "float32":
        inputs = tf.cast(inputs, tf.float32)  # as Keras does: statistics in float32 under a mixed policy
    held = getattr(layer, "_held_gamma_beta", None)  # hold_layer_norm_parameters: an export's graph constants
    gamma, beta = held if held and not training else (layer.gamma if layer.scale else None,
                                                      layer.beta if layer.center else None)
    gamma = None if gamma is None else tf.cast(gamma, inputs.dtype)
    beta = None if beta is None else tf.cast(beta, inputs.dtype)
    if training:
        outputs = layer_norm.training(inputs, gamma, beta, layer.epsilon)
    else:
        outputs = layer_norm.native_op(inputs, gamma, beta, layer.epsilon) if _native_at_inference(layer) else None
        if outputs is None:
            outputs = layer_norm.inference(inputs, gamma, beta, layer.epsilon)
    return tf.cast(outputs, input_dtype)


def hold_layer_norm_parameters(model: tf.Module) -> int:
    """For a serving export, as engine/dense.hold_kernels_in for the kernels: each rewritten LayerNormalization
    reads its gamma and beta as values, constants of the traced graph; returns how many layers. A variable read
    costs a batch-1 call a VarHandleOp and a ReadVariableOp, plus a Switch to enter each padding-cond branch of a
    block: ~150 of the ~1,150 nodes a call of MiniLM's export executed, ~0.15 ms (bench/RESULTS.md, thirty-second
    session). The model is for inference only from then on (training still reads the variables)."""
    count = 0
    for layer in model.submodules:
        if isinstance(layer.call, functools.partial) and layer.call.func is _layer_norm_call:
            layer._held_gamma_beta = (layer.gamma.numpy() if layer.scale else None,
                                      layer.beta.numpy() if layer.center else None)
            count += 1
    return count


def _native_at_inference(layer) -> bool:
    """Whether this LayerNorm may run our C++ op at inference: a model rewritten for our own process (evaluation,
    launch.predict), not for an export-safe graph, which must run where our libraries do not exist."""
    return getattr(layer, "_engine_native_at_inference", False)


# _block_call removes padding at inference when it is more than this fraction of a batch's positions.
# Moving rows cost ~6 % of a block (measured with ScatterNd, before unpadding.spread_rows) on sorted SST-2
# batches of 32 (little padding) and at batch 1 (none), where the padded layout is kept instead; in input order
# (~45 % padding) MiniLM's forward ran 1.36x. The tf.cond itself costs ~0.35 ms per batch-1 forward (0.96x;
# bench/RESULTS.md).
_UNPAD_ABOVE = 0.15
# The same where attention runs on the token rows themselves (attention.token_attention): a block then moves two
# row sets instead of six, and task.predict over the bench's sentences (longest first: 4.5-22 % padding per
# batch) ran 1.03-1.10x faster with this threshold than with 0.15 (bench/RESULTS.md).
_UNPAD_WITH_TOKEN_ATTENTION_ABOVE = 0.05


def _block_call(block, on_tokens_in_training, inputs, output_range=None):
    # A TransformerEncoderBlock sublayer by sublayer (unpadding.block_sublayers), so that its FFN can run as one
    # C++ op in training (_ffn); and its projections, FFN and LayerNorms on the real tokens only at inference,
    # and in training when `on_tokens_in_training`: [1, rows, hidden] gathered from [batch, seq, hidden], so a
    # batch of mixed lengths costs its tokens, not batch x longest. Only attention needs the padded layout: Q, K
    # and V are spread back for it and the context gathered again. Values at padded positions differ from the
    # stock block's, and no mask lets any later position or head read them. The idea of FasterTransformer's and
    # ByteTransformer's "remove padding"; Model Garden's block has no such mode. Other block configurations run
    # the stock call. At inference a batch with little padding runs the same sublayers in the padded layout, and
    # a block that outputs its first position only ([CLS]) skips the keys and values (engine/first_position.py),
    # in training too.
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2 or inputs[1] is None:
        return type(block).call(block, inputs, output_range=output_range)
    x, attention_mask = inputs
    training = _training()
    ffn = functools.partial(_ffn, block)
    output_range = output_range or block._output_range
    if output_range == 1 and first_position.applies(block):
        return first_position.block_call(block, x, attention_mask, training, ffn, _add_layer_norm)
    if output_range:
        return type(block).call(block, inputs, output_range=output_range)
    if training and not on_tokens_in_training:
        return unpadding.block_sublayers(block, x, attention_mask, training, ffn, _add_layer_norm)
    # A position is a token if some query may attend to it (padding columns are masked out for every row).
    is_token = tf.reshape(tf.reduce_any(tf.cast(attention_mask, tf.bool), axis=1), [-1])
    tokens = tf.reduce_sum(tf.cast(is_token, tf.int32))
    if training:
        # No tf.cond here: keyed dropout's custom gradient cannot reach into a cond branch. Rows are bucketed
        # (unpadding.training_rows) so the XLA dropout kernels compile once per bucket, not per batch.
        return unpadding.block_on_tokens(block, x, attention_mask, is_token,
                                         unpadding.training_rows(tokens, tf.size(is_token)), training, ffn,
                                         _add_layer_norm)
    padding = 1.0 - tf.cast(tokens, tf.float32) / tf.cast(tf.size(is_token), tf.float32)
    on_token_rows = attention.attends_on_token_rows(block._attention_layer, x.dtype, x.device)

    def padded():  # the padded layout's rows are every position (for token_attention, where it runs)
        every_position = tf.range(tf.shape(x)[0] * tf.shape(x)[1]) if on_token_rows else None
        return unpadding.block_sublayers(block, x, attention_mask, False, ffn, _add_layer_norm,
                                         row_positions=every_position)
    return tf.cond(padding > (_UNPAD_WITH_TOKEN_ATTENTION_ABOVE if on_token_rows else _UNPAD_ABOVE),
                   lambda: unpadding.block_on_tokens(block, x, attention_mask, is_token, tokens, False, ffn,
                                                     _add_layer_norm),
                   padded)


def _add_layer_norm(layer, x, residual):
    """layer(x + residual) with the sum in the residual's dtype, as Model Garden's block computes it. On the CPU in
    training (and at inference outside export-safe graphs), for a float32 LayerNorm over the last axis: add and
    LayerNorm as one C++ pass (the sum in float32 from bf16 or float32 inputs, saving the add and the cast;
    engine/layer_norm.add_native_op)."""
    if ((_training() or _native_at_inference(layer)) and layer.dtype == "float32"
            and layer.axis == [x.shape.rank - 1] and _trains_with_our_kernels(layer)):
        with autocast_variable.enable_auto_cast_variables(None):  # float32, not the block's compute dtype
            gamma, beta = layer.gamma.value(), layer.beta.value()
        outputs = layer_norm.add_native_op(x, residual, gamma, beta, layer.epsilon)
        if outputs is not None:
            return outputs
    return layer(tf.cast(x, residual.dtype) + residual)


def _ffn(block, inputs):
    """A TransformerEncoderBlock's FFN up to its output projection: intermediate dense, GELU, inner dropout,
    output dense. In training with Keras' exact GELU on the CPU: the dense's MatMul, then its bias and the GELU as
    one C++ op and their gradient as another (engine/bias.py); at inference in a float32 serving export, in two
    halves that run side by side (dense.held_ffn_in_halves); else the layers."""
    dense, activation = block._intermediate_dense, block._intermediate_activation_layer
    training = _training()
    if not training:
        in_halves = dense_ops.held_ffn_in_halves(dense, block._output_dense, inputs)
        if in_halves is not None:
            return in_halves
    if training and getattr(activation, "_fused_into_dense", False) and dense.bias is not None:
        rows, kernel, output_shape = dense_ops.operands(dense, tf.cast(inputs, dense.compute_dtype))
        product = tf.matmul(rows, kernel)
        with autocast_variable.enable_auto_cast_variables(None):
            bias = tf.reshape(dense.bias.value(), [-1])  # float32: the op rounds it as Keras' autocast would
        activated = bias_ops.add_gelu(product, bias)
        if activated is not None:
            return block._output_dense(block._inner_dropout_layer(tf.reshape(activated, output_shape)))
    return block._output_dense(block._inner_dropout_layer(activation(dense(inputs))))


def _is_plain_block(layer) -> bool:
    # Recognized by name and module, so the engine does not import Model Garden for this check; the settings
    # _block_call replicates (post-LayerNorm BERT with the query residual, full attention).
    cls = type(layer)
    return (cls.__name__ == "TransformerEncoderBlock" and cls.__module__.startswith("official.")
            and not layer._norm_first and layer._use_query_residual and layer._linformer_dim is None
            and not layer._return_attention_scores and attention.is_plain(layer._attention_layer))


def _embedding_call(layer, inputs):
    # Model Garden's OnDeviceEmbedding looks rows up with tf.gather(variable, ids), a ResourceGather. That op
    # switches the variable into TensorFlow's copy-on-read mode for good (EnsureSparseVariableAccess), and from
    # then on every dense update copies the whole table first: the optimizer's, every step, on MiniLM's
    # 30,522 x 384 word embedding (measured: Adam on it 15.8 vs 12.1 ms; and the decay's read copies it too).
    # Gathering from a dense read instead leaves the variable in place; the read aliases the variable's buffer
    # (no copy), and the rows, their cast and the IndexedSlices gradient are the same as the stock layer's.
    with autocast_variable.enable_auto_cast_variables(None):
        table = layer.embeddings.value()
    flat_ids = tf.reshape(inputs, [-1])
    embeddings = tf.cast(tf.gather(table, flat_ids), layer.compute_dtype)
    embeddings = tf.reshape(embeddings, tf.concat([tf.shape(inputs), [layer._embedding_width]], axis=0))
    embeddings.set_shape(inputs.shape.as_list() + [layer._embedding_width])
    if layer._scale_factor:
        embeddings *= layer._scale_factor
    return embeddings


def _is_plain_embedding(layer) -> bool:
    # Recognized by name and module, so the engine does not import Model Garden for this check.
    cls = type(layer)
    return (cls.__name__ == "OnDeviceEmbedding" and cls.__module__.startswith("official.")
            and not getattr(layer, "_use_one_hot", True) and hasattr(layer, "_embedding_width"))


def fuse_elementwise(model: tf.Module, *, export_safe: bool = False, skip_padding_in_training: bool = False
                     ) -> dict[str, int]:
    """Rebinds the model's layers as the module docstring lists; returns how many of each kind.

    export_safe: only the rewrites made of standard TensorFlow ops (dense, attention, LayerNorm, and the GELU
    fused into the dense at inference), no XLA kernels, and not the embedding lookup (a served graph updates nothing).
    skip_padding_in_training: Transformer blocks train on their real tokens too (_block_call); the
    token count is dynamic, so not under whole-step XLA (a TPU's, or --jit_compile)."""
    counts = dict.fromkeys(("dropout", "activation", "dense", "keras_dense", "attention", "layer_norm", "embedding",
                            "block"), 0)
    if not export_safe:
        counts["dropout"] = dropout.rebind(model, xla=True)
    layers = list(model.submodules)
    for layer in layers:
        if dense_ops.is_plain(layer):
            layer.call = functools.partial(dense_ops.call, layer)
            layer._engine_native_at_inference = not export_safe
            counts["dense"] += 1
        elif dense_ops.is_plain_keras(layer) and not export_safe:
            layer.call = functools.partial(dense_ops.keras_call, layer)
            counts["keras_dense"] += 1
        elif _is_plain_embedding(layer) and not export_safe:
            layer.call = functools.partial(_embedding_call, layer)
            counts["embedding"] += 1
        elif attention.is_plain(layer):
            layer._compute_attention = functools.partial(attention.compute_attention, layer)
            # An export served where TensorFlow runs Eigen's kernels batches its attention otherwise (attention.py).
            layer._engine_eigen_host = export_safe and not host.serving_host_runs_onednn()
            layer._engine_native_at_inference = not export_safe  # token rows' attention as our op
            counts["attention"] += 1
        elif _is_plain_block(layer):
            layer.call = functools.partial(_block_call, layer, skip_padding_in_training)
            counts["block"] += 1
        elif type(layer) is tf_keras.layers.LayerNormalization and len(layer.axis) == 1:
            layer.call = functools.partial(_layer_norm_call, layer)
            layer._engine_native_at_inference = not export_safe
            counts["layer_norm"] += 1
        elif (type(layer) is tf_keras.layers.Activation and layer.activation is not tf_keras.activations.linear
              and not export_safe):
            _fuse_activation(layer)
            counts["activation"] += 1
    for layer in layers:  # a TransformerEncoderBlock's FFN: dense then GELU -> one fused MatMul at inference
        dense = getattr(layer, "_intermediate_dense", None)
        activation = getattr(layer, "_intermediate_activation_layer", None)
        if (dense is not None and dense_ops.is_plain(dense)  # rebound to dense_ops.call in the loop above
                and type(activation) is tf_keras.layers.Activation
                and activation.activation is tf_keras.activations.gelu):
            dense._fused_activation = functools.partial(tf.nn.gelu, approximate=False)
            activation._fused_into_dense = True
            if export_safe:
                activation.call = functools.partial(_identity_at_inference, activation)
    return counts


def _identity_at_inference(layer, inputs):
    return inputs if not _training() else layer.activation(inputs)


def _fuse_activation(layer: tf_keras.layers.Activation) -> None:
    layer.call = functools.partial(_fused_activation_call, layer)
    global_policy = tf_keras.mixed_precision.global_policy()
    if layer.compute_dtype == "float32" and global_policy.compute_dtype in ("bfloat16", "float16"):
        # Model Garden pins the FFN activation to float32 under mixed_bfloat16, so Keras casts its 16-bit
        # input up and the next layer casts the output back down: two stock Cast passes over
        # [batch, seq, 4 x hidden] each way. The kernel computes in float32 inside anyway, so taking and
        # returning the 16-bit dtype gives the same values without those passes.
        layer._set_dtype_policy(global_policy)  # pylint: disable=protected-access
