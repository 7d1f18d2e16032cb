"""Dense layers as engine/fusion.py runs them on the CPU: one 2-D MatMul + BiasAdd that oneDNN fuses, and in
training a bias gradient summed in float32.

Keras' EinsumDense runs BERT's Q/K/V, attention-output and FFN projections as an Einsum and a separate bias AddV2;
as a MatMul + BiasAdd on [rows, fan_in], grappler's oneDNN remapper fuses them into one `_MklFusedMatMul` (and the
FFN's GELU too, at inference). Autodiff's gradient of BiasAdd is TensorFlow's BiasAddGrad, which on the CPU sums
bfloat16 in bfloat16 (TF 2.20: 4096 rows of ones sum to 256), so in training the bias gradient is a matmul of ones
instead (matmul_bias_add, bias_gradient), and Keras' own Dense layers (heads, Model Garden's pooler), which have the
same BiasAddGrad, get it too (keras_call). Its own module: fusion.py decides which layers to rebind, this is what a
dense layer computes.
"""
from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
import tf_keras
from tf_keras.src.engine import base_layer_utils  # the call context: is this call training?

from engine import host
from engine import bias as bias_ops  # (layers have `bias` attributes and arguments)


def in_training() -> bool:
    """Whether the layer call in progress is a training call (Keras' call context; None counts as inference). The
    rewrites of engine/fusion.py ask the same."""
    return bool(base_layer_utils.call_context().training)


# EinsumDense equations that contract the input's trailing axes with the kernel's leading ones -> how many.
TRAILING_CONTRACTIONS = {"abc,cd->abd": 1, "abc,cde->abde": 1, "abcd,cde->abe": 2}


def operands(layer, inputs, kernel=None):
    """The EinsumDense's contraction as one 2-D MatMul: (inputs as [rows, fan_in], the kernel as [fan_in, units]
    (or `kernel`, already so), the output's shape)."""
    contracted = TRAILING_CONTRACTIONS[layer.equation]
    kernel = _kernel_matrix(layer) if kernel is None else kernel
    return (tf.reshape(inputs, [-1, kernel.shape[0]]), kernel,
            tf.concat([tf.shape(inputs)[:-contracted], layer.kernel.shape[contracted:]], 0))


def _kernel_matrix(layer) -> tf.Tensor:
    """The kernel as a 2-D [fan_in, units] matrix."""
    fan_in = int(np.prod(layer.kernel.shape[:TRAILING_CONTRACTIONS[layer.equation]]))
    return tf.reshape(layer.kernel, [fan_in, -1])


def call(layer, inputs):
    """A plain EinsumDense's call (is_plain): the MatMul + BiasAdd (biased_product), or at inference with a GELU
    fused into the MatMul (`_fused_activation`, set by engine/fusion.py); at inference in a serving export with
    held kernels (hold_kernels_in: graph constants in float32 or bfloat16), all of it in their dtype, the output
    cast back, in two halves of the output columns (_in_column_halves)."""
    training = in_training()
    held = getattr(layer, "_held_kernel", None) if not training else None
    if (held is not None and getattr(layer, "_held_bias", None) is not None
            and halves_run_side_by_side(held.shape[0], held.shape[1] // 2, held.dtype.itemsize)):
        return _in_column_halves(layer, inputs, held, layer._held_bias)
    if held is not None:
        held = tf.constant(held)  # a Const in the traced graph, which oneDNN may keep reordered (hold_kernels_in)
    rows, kernel, output_shape = operands(layer, inputs, held)  # (held: the float32 kernel is not even read)
    rows = rows if held is None else tf.cast(rows, held.dtype)
    activation = getattr(layer, "_fused_activation", None) if not training else None
    if layer.bias is not None and activation is None:
        outputs = biased_product(rows, kernel, tf.cast(layer.bias, rows.dtype), output_shape, training,
                                 native=training or getattr(layer, "_engine_native_at_inference", True),
                                 constant_kernel=held is not None)
    else:
        outputs = tf.matmul(rows, kernel)
        if layer.bias is not None:
            outputs = tf.nn.bias_add(outputs, tf.cast(tf.reshape(layer.bias, [-1]), outputs.dtype))
        if activation is not None:
            outputs = activation(outputs)  # e.g. tf.nn.gelu: oneDNN's remapper fuses it into the MatMul
        outputs = tf.reshape(outputs, output_shape)
    return outputs if held is None else tf.cast(outputs, inputs.dtype)


def hold_kernels_in(model: tf.Module, dtype) -> int:
    """For a serving export: each plain EinsumDense (BERT's Q/K/V, attention-output and FFN projections) gets a
    copy of its kernel in `dtype` (float32, or bfloat16), as the 2-D [fan_in, units] matrix that `call` multiplies
    in that dtype at inference, a constant of the traced graph; returns how many. Call after engine/fusion.py has
    rebound the layers to `call`; the model is for inference only from then on (training still reads the
    variables). In float32 too: as constants MiniLM's batch-1 p50 was 8.2-10.7 ms against 9.8-12.1 with the
    variables, per round 1.08-1.37x (the same at batch 32), for a SavedModel of 130 MB instead of 89 (a layer's
    constants are stored once per traced call, in both branches of a block's padding cond).

    Why copies and not a mixed_bfloat16 model: under a mixed policy the float32 variables are cast on every call,
    which at batch 1 costs more than the bf16 matmuls save (MiniLM on the Zen 4: p50 10.4 vs 9.1-10.0 ms). Why
    graph constants and not bf16 variables: oneDNN reorders a bf16 weight into its blocked layout on every call
    unless the weight is a constant, which it reorders once and keeps (TensorFlow's `is_filter_const`): MiniLM
    at batch 1 p50 6.3-7.1 ms against 8.4-9.1 with bf16 variables and 9.5-10.1 in float32 (bench/RESULTS.md,
    2026-12-05). LayerNorm, softmax, the attention products, the pooler and the head stay in the model's float32.
    tasks/serving.save writes only the variables the signature reads, so the float32 kernels stay out of the
    SavedModel."""
    count = 0
    for layer in model.submodules:
        if is_plain(layer):
            if not (isinstance(layer.call, functools.partial) and layer.call.func is call):
                raise ValueError(f"layer {layer.name}: hold_kernels_in needs engine/fusion.py's dense rewrite first")
            layer._held_kernel = tf.cast(_kernel_matrix(layer), dtype).numpy()  # a value, not a variable
            # The bias as a value too: the halves below add slices and shares of it as constants.
            layer._held_bias = None if layer.bias is None else tf.reshape(layer.bias, [-1]).numpy()
            count += 1
    return count


# Halves at inference with held kernels (_in_column_halves, held_ffn_in_halves): TensorFlow's oneDNN MatMul runs
# on one thread when its operands fit in the L2 cache (`ExecuteSingleThreadedGemm` in tensorflow/core/kernels/mkl:
# bytes per value x (m n + k (m + n)) below L2's size). With 2 MiB of L2 per core that is every MiniLM 384 x 384
# projection below ~500 token rows, so one sentence's forward kept one core busy (one
# intra-op thread gave the same batch-1 latency as two), while the FFN's [384, 1536] products ran two-threaded at
# ~0.3 ms each for 26 rows. Two halves of a product are one-thread ops that TensorFlow's executor runs side by
# side. Batch-1 p50 in-process against the export before (bench/RESULTS.md, 2026-12-06): the FFN in halves
# 1.07-1.12x, then the other projections in column halves 1.03-1.13x more; batch 32 the same; the bfloat16 export
# in column halves 1.08-1.10x. Halves of the attention heads were slower: their small score and context matmuls
# and softmaxes, ~40 us each, doubled. The float32 FFN in column halves (a concat between its two products, no
# sum) was 2-7 % slower than held_ffn_in_halves. Only where the halves run side by side (halves_run_side_by_side).
def halves_run_side_by_side(fan_in: int, units: int, itemsize: int, rows: int = 32) -> bool:
    """Whether two halves of a [rows, fan_in] x [fan_in, units] product, for a sentence of `rows` tokens, run side by
    side where this export will be served: a trace-time choice, so an export follows the machine that writes it.

    With oneDNN (host.serving_host_runs_onednn), where each half runs on one thread by TensorFlow's rule on this
    host's L2; where a half does not (the Zen 4's 1 MiB L2 and MiniLM's FFN halves), it runs on two threads as the
    whole did, and halving only adds ops: 4.75 against 3.95 ms for six FFNs at 25 rows on the Zen 4
    (bench/RESULTS.md, 2026-12-04/05). With Eigen's kernels (TensorFlow's default on CPUs without AVX-512 VNNI or
    AMX) always: on the AVX2-only Zen 3 (512 KiB L2, where the L2 rule halved only the 384 x 384 projections),
    an export with the FFN halved too answered one sentence 1.08-1.15x sooner (p50, five alternating runs; batch
    32 0.99-1.05x), one halving nothing 0.96x as soon (bench/RESULTS.md, 2026-12-07)."""
    if not host.serving_host_runs_onednn():
        return True
    return itemsize * (rows * units + fan_in * (rows + units)) < host.l2_cache_bytes()


def _in_column_halves(layer, inputs, kernel, bias):
    """The layer's product (+ bias, then its fused activation if any) as two halves of its output columns,
    concatenated: each output the same dot product as one MatMul's."""
    rows, _, output_shape = operands(layer, tf.cast(inputs, kernel.dtype), kernel)
    activation = getattr(layer, "_fused_activation", None) or (lambda x: x)
    width = kernel.shape[1] // 2
    halves = [activation(_constant_product(rows, kernel[:, columns], bias[columns]))
              for columns in (slice(0, width), slice(width, None))]
    return tf.cast(tf.reshape(tf.concat(halves, 1), output_shape), inputs.dtype)


def held_ffn_in_halves(intermediate, output, inputs):
    """At inference with float32 held kernels (a serving export): output(gelu(intermediate(inputs))) as two
    independent halves of the inner width, `gelu(x W1[:, h] + b1[h]) W2[h, :] + b2 / 2`, summed: the same sum as
    one product's, grouped otherwise. None where that does not apply (bfloat16 held kernels would round each half
    to bfloat16 before the sum)."""
    held = [(getattr(layer, "_held_kernel", None), getattr(layer, "_held_bias", None))
            for layer in (intermediate, output)]
    activation = getattr(intermediate, "_fused_activation", None)
    if (activation is None or any(kernel is None or bias is None or kernel.dtype != np.float32
                                  for kernel, bias in held) or held[0][0].shape[1] % 2):
        return None
    (kernel, bias), (output_kernel, output_bias) = held
    width = kernel.shape[1] // 2
    if not (halves_run_side_by_side(kernel.shape[0], width, 4)
            and halves_run_side_by_side(width, output_kernel.shape[1], 4)):
        return None
    rows = tf.reshape(tf.cast(inputs, tf.float32), [-1, kernel.shape[0]])
    halves = []
    for inner in (slice(0, width), slice(width, None)):
        hidden = activation(_constant_product(rows, kernel[:, inner], bias[inner]))  # MatMul + BiasAdd + GELU
        halves.append(_constant_product(hidden, output_kernel[inner], output_bias / 2))
    # A stack's sum, not an Add: grappler fuses an Add of a product into that product's MatMul, which then waits
    # for the other half instead of running beside it.
    summed = tf.reduce_sum(tf.stack(halves), 0)
    return tf.cast(tf.reshape(summed, tf.concat([tf.shape(inputs)[:-1], output_kernel.shape[1:]], 0)), inputs.dtype)


def _constant_product(rows, kernel, bias):
    # With a bias, which grappler fuses with the MatMul into oneDNN's inner product that keeps a constant weight
    # reordered; a MatMul alone runs as an sgemm that packs its weight on every call.
    return tf.nn.bias_add(tf.matmul(rows, tf.constant(kernel)), tf.constant(bias.astype(kernel.dtype)))


def biased_product(rows, kernel, bias, output_shape, training: bool, *, native: bool = True,
                   constant_kernel: bool = False):
    """rows @ kernel + bias, reshaped to output_shape (bias: its trailing shape, in rows' dtype): the MatMul +
    BiasAdd that oneDNN fuses, with matmul_bias_add's gradient in training; in bf16 on AMX CPUs the bias apart
    (bias_apart_from_matmul), added after the Reshape, which keeps grappler from fusing it into the MatMul, by our
    op (add_bias) unless `native` is False (an export-safe layer: a served graph's machine lacks our ops).
    A `constant_kernel` (hold_kernels_in) keeps the fused op: oneDNN reorders a constant weight once and then runs
    the fused inner product with AMX too (ONEDNN_VERBOSE on the AMX Xeon: `brgemm:avx10_1_512_amx`)."""
    if bias_apart_from_matmul(rows.dtype) and not constant_kernel:
        product = tf.reshape(tf.matmul(rows, kernel), output_shape)
        return add_bias(product, bias) if native else product + bias
    flat_bias = tf.reshape(bias, [-1])
    if training:
        return tf.reshape(matmul_bias_add(rows, kernel, flat_bias), output_shape)
    return tf.reshape(tf.nn.bias_add(tf.matmul(rows, kernel), flat_bias), output_shape)


@tf.custom_gradient
def matmul_bias_add(rows, kernel, bias):
    """rows @ kernel + bias, which grappler's oneDNN remapper fuses into one op, with autodiff's MatMul gradients
    but the bias gradient of bias_gradient instead of TensorFlow's BiasAddGrad: on the CPU that op sums bfloat16
    in bfloat16 (TensorFlow 2.20: 4096 rows of ones sum to 256), so in mixed_bfloat16 training every fused bias
    got a gradient off by up to tens of percent (bench/RESULTS.md, 2026-12-05). Stock Keras' EinsumDense adds its
    bias with AddV2, whose gradient (Sum) accumulates in float32."""
    def gradient(upstream):
        return (tf.matmul(upstream, kernel, transpose_b=True), tf.matmul(rows, upstream, transpose_a=True),
                bias_gradient(upstream, bias))
    return tf.nn.bias_add(tf.matmul(rows, kernel), bias), gradient


def bias_gradient(upstream, bias):
    """The gradient of a bias added to `upstream`'s rows: a [1, rows] x [rows, bias size] matmul of ones, which
    oneDNN accumulates in float32 and rounds once. Autodiff's is a Sum (AddV2's) or a BiasAddGrad, both in Eigen's
    portable code for bf16: on the AMX Xeon 2.5 ms for MiniLM's [32, 128, 1536] FFN gradient, against 0.85 ms for
    the matmul (bench/RESULTS.md, 2026-12-04); on the Zen 4 2.2-2.4 ms against 0.85."""
    size = int(np.prod(bias.shape))
    rows = tf.reshape(upstream, [-1, size])
    ones = tf.ones(tf.stack([1, tf.shape(rows)[0]]), upstream.dtype)
    return tf.reshape(tf.matmul(ones, rows), tf.shape(bias))


@tf.custom_gradient
def add_bias(outputs, bias):
    """outputs + bias in one pass (engine/bias.add), with bias_gradient's bias gradient."""
    added = bias_ops.add(outputs, bias)
    return (outputs + bias if added is None else added), lambda upstream: (upstream, bias_gradient(upstream, bias))


def keras_call(layer, inputs):
    # Keras' Dense in training as biased_product, for bias_gradient's bias gradient: its tf.nn.bias_add's autodiff
    # is BiasAddGrad, which sums bf16 in bf16 (matmul_bias_add): e.g. a token-level head (NER's emissions) summed
    # 4096 rows so.
    # The same values forward (Keras' tensordot is this reshape and MatMul). Keras' call elsewhere.
    if not in_training() or not isinstance(inputs, tf.Tensor) or inputs.shape.rank is None:
        return type(layer).call(layer, inputs)
    rows = tf.reshape(tf.cast(inputs, layer.compute_dtype), [-1, layer.kernel.shape[0]])
    kernel, bias = tf.convert_to_tensor(layer.kernel), tf.convert_to_tensor(layer.bias)  # in the compute dtype
    outputs = biased_product(rows, kernel, bias, tf.concat([tf.shape(inputs)[:-1], [layer.units]], 0), True)
    outputs.set_shape(inputs.shape[:-1].concatenate([layer.units]))
    return layer.activation(outputs) if layer.activation is not None else outputs


def is_plain_keras(layer) -> bool:
    """A built Keras Dense with a bias (keras_call)."""
    return type(layer) is tf_keras.layers.Dense and layer.use_bias and layer.built


def bias_apart_from_matmul(dtype) -> bool:
    """Whether a dense layer adds its bias as its own op instead of in grappler's fused MatMul+BiasAdd: in bfloat16
    on CPUs with AMX. There TensorFlow 2.20's oneDNN runs the fused op as a `gemm:jit` inner product without AMX,
    0.35-0.65x PyTorch's F.linear on MiniLM's shapes, while the plain MatMul runs the AMX `brg_matmul` kernel at
    0.63-0.91x (bench/matmul_kernels.py). With the bias apart, bf16 training on an AMX Xeon ran 1.01-1.05x faster
    at seq 128 and 1.03-1.10x on `make demo`'s short batches (bench/RESULTS.md, 2026-12-04). Not measured on CPUs
    with bf16 but no AMX (the Zen 4), which keep the fusion; float32 keeps it everywhere (same speed as PyTorch)."""
    return dtype == tf.bfloat16 and host.cpu_has_amx()


def is_plain(layer) -> bool:
    """An EinsumDense whose equation contracts the input's trailing axes, with no activation of its own."""
    if type(layer) is not tf_keras.layers.EinsumDense or layer.equation not in TRAILING_CONTRACTIONS:
        return False
    if layer.activation not in (None, tf_keras.activations.linear):
        return False
    free_dims = tuple(layer.kernel.shape[TRAILING_CONTRACTIONS[layer.equation]:])
    return layer.bias is None or tuple(layer.bias.shape) == free_dims
