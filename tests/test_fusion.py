"""engine/fusion.py: the XLA dropout is Bernoulli(1 - rate) inverted dropout with the mask reused by the gradient
and fresh on every call, and our C++ forward (engine/dropout_kernel.cc) gives its bits outside XLA; fused
activations equal the stock ones with their gradients; the dense and attention rewrites give stock Keras' values
and gradients (training and inference, GELU fused at inference); the export-safe rewrite has no XLA kernel;
fusing touches only the model it was applied to; and the fused model trains under the engine (mirrored +
accumulation + XLA), traced once."""
import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import collections
import functools
import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import bert_numpy_reference as ref
import engine
from engine import attention, bias, dropout, fusion, host, layer_norm, native, unpadding
from engine import dense as dense_ops
from engine.config import RuntimeConfig
from engine_helpers import ToyTask, constant_shapes, graph_nodes, graph_op_types, run_training
from tasks.encoders import bert


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_keeps_one_minus_rate_scaled_and_gradient_uses_the_same_mask(dtype):
    rate = 0.1
    x = tf.cast(tf.random.stateless_uniform([1000, 1000], seed=[3, 4], minval=0.5, maxval=1.5), dtype)
    upstream = tf.random.stateless_normal([1000, 1000], seed=[5, 6])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = dropout.dropout(x, rate)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    grad = tape.gradient(loss, x)
    y, x, grad = (np.asarray(tf.cast(t, tf.float32)) for t in (y, x, grad))
    kept = y != 0
    # 1e6 Bernoulli(0.9) draws: standard deviation of the mean 3e-4.
    assert abs(kept.mean() - (1 - rate)) < 2e-3
    scale = np.float32(tf.cast(1 / (1 - rate), dtype).numpy())
    expected = np.asarray(tf.cast(tf.cast(x, dtype) * tf.cast(scale, dtype), tf.float32))
    np.testing.assert_array_equal(y[kept], expected[kept])
    expected_grad = np.asarray(tf.cast(tf.cast(upstream, dtype) * tf.cast(scale, dtype), tf.float32)) * kept
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("size", [1_000_001, 6])  # odd: the last Philox output's low half goes unused
def test_keep_mask_is_two_16_bit_uniforms_per_philox_output_the_same_in_xla_or_not(size):
    rate, key = 0.1, tf.constant([7, 11], tf.int64)
    # The expected mask from the raw 32-bit Philox outputs, split with NumPy.
    bits = tf.random.stateless_uniform([(size + 1) // 2], seed=key, dtype=tf.uint32, minval=None, maxval=None,
                                       alg="philox").numpy()
    uniforms = np.concatenate([bits >> 16, bits & 0xFFFF])[:size]
    expected = uniforms >= 6554  # rate 0.1 on a 1/65536 grid
    eager = dropout.keep_mask(tf.constant([size]), key, rate).numpy()
    compiled = tf.function(lambda: dropout.keep_mask(tf.constant([size]), key, rate), jit_compile=True)().numpy()
    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_array_equal(compiled, expected)
    if size > 1000:
        half = size // 2  # a unit of the first half and its partner in the second share one Philox output
        first, second = ~expected[:half], ~expected[half:2 * half]
        assert abs(first.mean() - rate) < 2e-3 and abs(second.mean() - rate) < 2e-3
        assert abs(np.mean(first & second) - rate ** 2) < 1e-3  # independent halves: P(both dropped) = rate^2


def test_the_dropout_kernel_is_built_in_this_environment():
    # `make setup` builds it; without it, training runs TensorFlow's ops for dropout (same values, slower).
    assert dropout.LIBRARY.load() is not None, "engine/dropout_kernel.cc did not build: run python -m engine.native"


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("shape", [[7], [2, 3, 167], [4, 12, 33, 33]])  # odd sizes: a half word goes unused
def test_the_dropout_kernel_equals_tensorflows_forward_bit_for_bit(dtype, shape):
    rate, key = 0.1, tf.constant([0x1234_5678_9ABC_DEF0, -11], tf.int64)
    values = tf.random.stateless_normal(shape, seed=[1, 2]) * 1e3
    # Values whose scaled product rounds differently in bf16, and infinities and NaNs that must pass through.
    flat = tf.tensor_scatter_nd_update(tf.reshape(values, [-1]), [[0], [1], [2], [3]],
                                       [np.inf, -np.inf, np.nan, 3.3895e38])
    x = tf.cast(tf.reshape(flat, shape), dtype)
    philox_key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=key)
    native_y, native_keep = dropout.LIBRARY.load().engine_keyed_dropout(
        x, philox_key, counter, threshold=round(rate * 65536), scale=1 / (1 - rate))
    for xla in (True, False):
        expected_y, expected_keep = dropout._kernels(rate, xla)[0](x, key)
        np.testing.assert_array_equal(native_keep.numpy(), expected_keep.numpy())
        # NaN where kept on both sides (assert_array_equal treats NaNs as equal)
        np.testing.assert_array_equal(tf.cast(native_y, tf.float64).numpy(), tf.cast(expected_y, tf.float64).numpy())


def test_dropout_runs_the_kernel_outside_xla_only_and_the_switch_turns_it_off(monkeypatch):
    key = tf.constant([5, 6], tf.int64)
    x = tf.random.stateless_normal([64, 33], seed=[3, 4])
    plain = tf.function(lambda x: dropout.dropout(x, 0.1, key))
    compiled = tf.function(lambda x: dropout.dropout(x, 0.1, key), jit_compile=True)
    assert "EngineKeyedDropout" in graph_op_types(plain, x)
    assert "EngineKeyedDropout" not in graph_op_types(compiled, x)  # XLA has no kernel for it: XLA's ops there
    np.testing.assert_array_equal(plain(x), compiled(x))
    monkeypatch.setenv(dropout.LIBRARY.switch, "0")
    off = tf.function(lambda x: dropout.dropout(x, 0.1, key))
    assert "EngineKeyedDropout" not in graph_op_types(off, x)
    np.testing.assert_array_equal(off(x), plain(x))


def test_a_fresh_mask_on_every_call_and_rate_zero_is_identity():
    x = tf.ones([100_000])
    first, second = (dropout.dropout(x, 0.5).numpy() != 0 for _ in range(2))
    # Independent masks agree on about half the elements; a reused mask would agree everywhere.
    assert 0.45 < np.mean(first == second) < 0.55
    np.testing.assert_array_equal(dropout.dropout(x, 0.0), x)
    with pytest.raises(ValueError, match="rate"):
        dropout.dropout(x, 1.0)


def test_fused_activation_equals_stock_with_gradient():
    layer = tf_keras.layers.Activation("gelu")
    x = tf.random.stateless_normal([64, 96], seed=[7, 8]) * 3
    expected_y, expected_grad = _value_and_grad(layer, x)
    assert fusion.fuse_elementwise(tf_keras.Sequential([layer])) == {
        "dropout": 0, "activation": 1, "dense": 0, "keras_dense": 0, "attention": 0, "layer_norm": 0,
        "embedding": 0, "block": 0}
    y, grad = _value_and_grad(layer, x)
    np.testing.assert_allclose(y, expected_y, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_fused_activation_in_bf16_rounds_float32_math_once():
    layer = tf_keras.layers.Activation("gelu", dtype="mixed_bfloat16")
    x = tf.cast(tf.random.stateless_normal([64, 96], seed=[9, 10]) * 3, tf.bfloat16)
    stock = layer(x)
    fusion.fuse_elementwise(tf_keras.Sequential([layer]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    grad = tape.gradient(y, x)  # upstream ones: the derivative, from the backward kernel
    assert y.dtype == tf.bfloat16 and grad.dtype == tf.bfloat16
    x64 = x.numpy().astype(np.float64)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    exact = x64 * cdf
    exact_grad = cdf + x64 * np.exp(-x64 * x64 / 2) / math.sqrt(2 * math.pi)
    error = np.abs(y.numpy().astype(np.float64) - exact)
    # One rounding to bf16 (8 significant bits): within half a unit in the last place, plus float32 noise.
    assert np.all(error <= np.abs(exact) * 2.0 ** -8 + 1e-6)
    assert error.mean() <= np.abs(stock.numpy().astype(np.float64) - exact).mean()
    assert np.all(np.abs(grad.numpy().astype(np.float64) - exact_grad) <= np.abs(exact_grad) * 2.0 ** -8 + 1e-6)


def test_fused_gelu_under_mixed_bfloat16_is_bit_identical_without_the_float32_round_trip():
    """Model Garden pins GELU to float32 under mixed_bfloat16; fused, it takes bf16 and computes in float32 inside,
    which must give exactly the stock values and gradients."""
    x = tf.random.stateless_normal([16, 24], seed=[1, 2])
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        def build():
            tf_keras.utils.set_random_seed(3)
            # Dense layers without biases, which fuse_elementwise leaves alone (a bias's gradient it changes).
            return tf_keras.Sequential([tf_keras.Input([24]), tf_keras.layers.Dense(32, use_bias=False),
                                        tf_keras.layers.Activation("gelu", dtype="float32"),
                                        tf_keras.layers.Dense(8, use_bias=False)])
        stock, fused = build(), build()
        activation = fused.layers[1]
        assert activation.compute_dtype == "float32"
        assert fusion.fuse_elementwise(fused)["activation"] == 1
        assert activation.compute_dtype == "bfloat16"

        def output_and_grads(model):
            with tf.GradientTape() as tape:
                y = tf.cast(model(x, training=True), tf.float32)
                loss = tf.reduce_sum(y * y)
            return [y.numpy()] + [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

        for expected, got in zip(output_and_grads(stock), output_and_grads(fused)):
            np.testing.assert_array_equal(got, expected)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def _encoder_pair(dropout_rate=0.0, output_range=None, nonzero_biases=False):
    config = bert.BertConfig(**{**bert.BertConfig.tiny().__dict__, "hidden_dropout_prob": dropout_rate,
                                    "attention_probs_dropout_prob": dropout_rate})
    ids = tf.reshape(tf.range(64) % 50 + 1, [4, 16])
    mask = tf.cast(tf.range(16)[None] < tf.constant([[16], [11], [5], [1]]), tf.int32)  # padded rows too
    inputs = {"input_word_ids": ids * mask, "input_mask": mask, "input_type_ids": tf.zeros_like(ids)}
    stock, fused = (bert.build_encoder(config, output_range=output_range) for _ in range(2))
    stock(inputs), fused(inputs)
    if nonzero_biases:  # the initializer's biases are zeros; this adds noise to every weight
        stock.set_weights([w + 0.1 * np.random.default_rng(i).standard_normal(w.shape).astype(w.dtype)
                           for i, w in enumerate(stock.get_weights())])
    fused.set_weights(stock.get_weights())
    return config, inputs, stock, fused


def _outputs_and_grads(model, inputs, training):
    @tf.function  # a graph, so grappler's oneDNN fusions run as they do in the Trainer and in serving
    def compute():
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=training)
            # Real positions only: at inference the fused blocks leave zeros at padding (_unpadded_block_call).
            mask = tf.cast(inputs["input_mask"], tf.float32)[:, :, None]
            y = tf.cast(outputs["sequence_output"], tf.float32) * mask
            loss = tf.reduce_sum(y * y) + tf.reduce_sum(tf.cast(outputs["pooled_output"], tf.float32))
        return [y] + [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
    return [t.numpy() for t in compute()]


@pytest.mark.parametrize("training", [True, False])
def test_dense_and_attention_rewrites_give_stock_keras_values_and_gradients(training):
    config, inputs, stock, fused = _encoder_pair()
    layers = config.num_hidden_layers
    assert fusion.fuse_elementwise(fused) == {"dropout": 0, "activation": layers, "dense": 6 * layers,
                                              "keras_dense": 1, "attention": layers, "layer_norm": 1 + 2 * layers,
                                              "embedding": 1, "block": layers}
    expected = _outputs_and_grads(stock, inputs, training)
    got = _outputs_and_grads(fused, inputs, training)
    assert len(got) == len(expected) == len(stock.trainable_variables) + 1
    for e, g in zip(expected, got):
        # Float32 rounding of other summation orders, relative to the tensor's scale: sums such as the [PAD]
        # embedding row's gradient cancel to near zero, and the key biases' gradients are zero in exact math
        # (softmax ignores a shift shared by all keys), so a per-element relative tolerance would not fit.
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=3e-5 * max(np.abs(e).max(), 1e-3))


def test_training_on_tokens_gives_stock_values_and_gradients_and_computes_fewer_rows():
    """skip_padding_in_training: rows of 16, 11, 5 and 1 tokens (33 of 64 positions) train as 48 rows (33 rounded up
    to a multiple of 16); values at real positions and every gradient are the stock encoder's."""
    config, inputs, stock, fused = _encoder_pair()
    assert fusion.fuse_elementwise(fused, skip_padding_in_training=True)["block"] == config.num_hidden_layers
    expected = _outputs_and_grads(stock, inputs, True)
    got = _outputs_and_grads(fused, inputs, True)
    assert len(got) == len(expected) == len(stock.trainable_variables) + 1
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=3e-5 * max(np.abs(e).max(), 1e-3))
    # The 64 - 48 positions that got no row hold zeros: the blocks ran on 48 rows, not 64.
    output = fused(inputs, training=True)["sequence_output"].numpy().reshape(64, -1)
    assert (np.abs(output).max(axis=1) == 0).sum() == 16
    # Without the option training keeps the stock block (nonzero everywhere).
    _, _, _, plain = _encoder_pair()
    fusion.fuse_elementwise(plain)
    assert np.abs(plain(inputs, training=True)["sequence_output"].numpy()).max(axis=-1).min() > 0


def test_training_on_tokens_moves_rows_by_gathers_both_ways():
    """Rows go between the padded layout and the token rows by gathers, forward and backward (unpadding.take_rows
    and spread_rows are each other's gradient): no zero-filled ScatterNd and no scatter-add per block, which took
    twice the time in make demo's step (bench/RESULTS.md). The values are checked by the test above."""
    config, inputs, _, fused = _encoder_pair()
    fusion.fuse_elementwise(fused, skip_padding_in_training=True)

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(fused(inputs, training=True)["sequence_output"]))
        return tape.gradient(loss, fused.trainable_variables)
    op_types = collections.Counter(op.type for op in gradients.get_concrete_function().graph.get_operations())
    assert op_types["ScatterNd"] == op_types["UnsortedSegmentSum"] == op_types["GatherNd"] == 0, op_types
    # Per block forward: x and the context to rows, Q, K, V and the output back; the same again backward.
    assert op_types["GatherV2"] >= 2 * 6 * config.num_hidden_layers


def test_blocks_on_tokens_take_a_batch_without_tokens():
    """All padding (a replica's share of the engine's padded last evaluation batch): no rows, zeros out, finite
    gradients, at inference and in training."""
    _, inputs, _, fused = _encoder_pair()
    fusion.fuse_elementwise(fused, skip_padding_in_training=True)
    empty = {**inputs, "input_mask": tf.zeros_like(inputs["input_mask"])}

    @tf.function
    def run(training):
        with tf.GradientTape() as tape:
            output = fused(empty, training=training)["sequence_output"]
            loss = tf.reduce_sum(tf.square(tf.cast(output, tf.float32)))
        return output, tape.gradient(loss, fused.trainable_variables[-6])  # a block's weight
    for training in (False, True):
        output, gradient = run(training)
        assert np.abs(output.numpy()).max() == 0 and np.isfinite(gradient.numpy()).all()


def test_training_rows_are_bucketed_four_per_doubling():
    rows = {t: int(unpadding.training_rows(tf.constant(t), tf.constant(4096))) for t in (1, 33, 100, 300, 1000, 4090)}
    assert rows == {1: 16, 33: 48, 100: 112, 300: 320, 1000: 1024, 4090: 4096}
    assert int(unpadding.training_rows(tf.constant(33), tf.constant(40))) == 40  # never more than the positions
    tokens = np.arange(256, 4096, dtype=np.int32)
    rows = unpadding.training_rows(tf.constant(tokens), tf.constant(1 << 20)).numpy()
    assert (rows >= tokens).all() and (rows <= 1.25 * tokens).all()
    assert len(set(rows)) == 17  # 256, 320, 384, 448, 512, 640, ..., 4096: four sizes per doubling


def test_training_on_tokens_with_dropout_is_keyed_and_finite():
    config, inputs, _, fused = _encoder_pair(dropout_rate=0.1)
    assert fusion.fuse_elementwise(fused, skip_padding_in_training=True)["dropout"] > 0

    @tf.function
    def forward(update):
        with dropout.keys(dropout.step_key(7, update, 0)):
            return fused(inputs, training=True)["sequence_output"]
    first, again, other = forward(tf.constant(1)), forward(tf.constant(1)), forward(tf.constant(2))
    np.testing.assert_array_equal(first.numpy(), again.numpy())  # the same update drops the same units
    assert np.isfinite(first.numpy()).all() and np.abs(first.numpy() - other.numpy()).max() > 0


def test_training_on_tokens_with_dropout_gives_the_gradient_of_its_own_forward():
    """With dropout on, the fused blocks' gradient (dropout, softmax + dropout and LayerNorm as our ops, on the
    token layout) against central finite differences of the same forward with the same keyed masks, along the
    gradient itself: a backward pass that used other masks than its forward, or none, would fall short of |g|.
    The masks of another update differ, so the check has teeth: at rate 0.2 another update's derivative is 4-10 %
    off |g| (six initializations tried), at 0.1 only 0.5-4 %, which left the 1 % bound to the initialization, and
    that (unseeded) to whichever tests ran before in the process. tf.random.set_seed alone did not fix it: tf_keras'
    unseeded initializers draw their seeds from Python's `random` (2.4 % for one of eight states); set_random_seed
    seeds that too (3.6 % here)."""
    tf_keras.utils.set_random_seed(0)  # the encoders' initial weights, whatever ran before in this process
    _, inputs, _, fused = _encoder_pair(dropout_rate=0.2)
    assert fusion.fuse_elementwise(fused, skip_padding_in_training=True)["dropout"] > 0
    variables = fused.trainable_variables

    @tf.function
    def loss_fn(update):
        with dropout.keys(dropout.step_key(7, update, 0)):
            outputs = fused(inputs, training=True)
        mask = tf.cast(inputs["input_mask"], tf.float32)[:, :, None]
        y = outputs["sequence_output"] * mask
        return tf.reduce_sum(y * y) / 100.0 + tf.reduce_sum(outputs["pooled_output"])

    @tf.function
    def gradients(update):
        with tf.GradientTape() as tape:
            loss = loss_fn(update)
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]

    grads = [g.numpy().astype(np.float64) for g in gradients(tf.constant(1))]
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    originals = [v.numpy() for v in variables]

    def along_gradient(update, eps=1e-3):  # (loss(w + eps g/|g|) - loss(w - eps g/|g|)) / (2 eps)
        values = []
        for sign in (1.0, -1.0):
            for v, w, g in zip(variables, originals, grads):
                v.assign((w + sign * eps * g / norm).astype(np.float32))
            values.append(float(loss_fn(tf.constant(update))))
        for v, w in zip(variables, originals):
            v.assign(w)
        return (values[0] - values[1]) / (2 * eps)

    assert norm > 1.0
    assert along_gradient(1) == pytest.approx(norm, rel=1e-3)
    assert abs(along_gradient(2) - norm) > 0.01 * norm  # another update's masks: not this gradient's function


def test_skip_padding_in_training_without_fusion_says_so_and_trains_padded(capsys):
    # make demo's flagfile asks for it; on a GPU (fusion "auto" is off there) the run must still go ahead.
    trainer = run_training(DropoutToyTask, global_batch_size=16, train_steps=2,
                           runtime_options={"fuse_elementwise": False, "skip_padding_in_training": True})
    assert "--skip_padding_in_training is one of --fuse_elementwise's rewrites" in capsys.readouterr().out
    assert trainer.fused_layers == {"dropout": 2} and np.isfinite(trainer.train_history[-1]["loss"])


def test_skip_padding_in_training_refuses_static_shape_compilers():
    with pytest.raises(ValueError, match="skip_padding_in_training"):
        RuntimeConfig(skip_padding_in_training=True, jit_compile=True)
    with pytest.raises(ValueError, match="skip_padding_in_training"):
        RuntimeConfig(skip_padding_in_training=True, strategy="tpu")


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_inference_blocks_skip_padding_and_give_the_numpy_reference(policy):
    """Rows of 16, 11, 5 and 1 tokens (48 % padding): the blocks run on the 33 tokens, zeros at padding; a batch
    with no padding takes the stock block. Either way the float64 NumPy BERT's values at the real positions."""
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
        config, inputs, stock, fused = _encoder_pair()
        assert fusion.fuse_elementwise(fused)["block"] == config.num_hidden_layers
        full = {k: tf.ones_like(v) if k == "input_mask" else v for k, v in inputs.items()}
        full["input_word_ids"] = tf.reshape(tf.range(64) % 50 + 1, [4, 16])
        run = tf.function(lambda x: fused(x, training=False))
        # Both attend with our op on either layout (the next test), bf16 on bf16 operands.
        assert "EngineTokenAttention" in graph_op_types(run, inputs)
        for batch, padded in ((inputs, True), (full, False)):
            numpy_inputs = {k: v.numpy() for k, v in batch.items()}
            reference = ref.bert_forward(bert.hf_weights(fused), config.num_attention_heads, **numpy_inputs)
            outputs = run(batch)
            tolerance = 1e-4 if policy == "float32" else 0.1  # bf16 matmul inputs: 8 bits of mantissa
            seq_diff, pooled_diff = ref.max_abs_diffs(reference, outputs, numpy_inputs["input_mask"])
            assert seq_diff <= tolerance and pooled_diff <= tolerance, (seq_diff, pooled_diff)
            at_padding = np.asarray(outputs["sequence_output"], np.float32)[numpy_inputs["input_mask"] == 0]
            assert (np.abs(at_padding).max() == 0) if padded else at_padding.size == 0
        # The stock block gives nonzero values at padding: zeros there mean the padding was skipped.
        stock_padding = np.asarray(stock(inputs, training=False)["sequence_output"], np.float32)
        assert np.abs(stock_padding[inputs["input_mask"].numpy() == 0]).min() > 0
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_fused_inference_attends_with_our_op_in_both_layouts_but_not_in_training_exports_nor_switched_off(monkeypatch):
    """Blocks at inference in our process attend with EngineTokenAttention (tests/test_token_attention_kernel.py),
    on the token rows and in the padded layout alike; training, export-safe graphs and the switch keep TensorFlow's
    ops. (The values: test_inference_blocks_skip_padding_and_give_the_numpy_reference.)"""
    config, inputs, _, fused = _encoder_pair()
    _, _, _, safe = _encoder_pair()
    fusion.fuse_elementwise(fused)
    fusion.fuse_elementwise(safe, export_safe=True)

    def calls(model):  # per layer, once in each branch of the block's tf.cond (token rows or padded)
        graph_def = tf.function(lambda x: model(x, training=False)).get_concrete_function(inputs).graph.as_graph_def()
        return sum(n.op == "EngineTokenAttention" for n in graph_nodes(graph_def))
    assert calls(fused) == 2 * config.num_hidden_layers
    assert calls(safe) == 0
    assert "EngineTokenAttention" not in graph_op_types(tf.function(lambda x: fused(x, training=True)), inputs)
    monkeypatch.setenv(native.ATTENTION.switch, "0")
    assert calls(fused) == 0


@pytest.mark.parametrize("held", [None, tf.float32, tf.bfloat16])
def test_a_cls_only_last_block_skips_keys_and_values_at_inference_and_gives_the_numpy_reference(held):
    """output_range=1 ([CLS]-pooled classifiers): at inference the last block scores the inputs against Wk q and
    mixes them before Wv (engine/first_position.py), its key and value projections never called; the [CLS]
    vector and pooled output are the float64 NumPy BERT's, padded rows too, with the kernels as variables or
    held as a serving export's constants; nor in training."""
    # Nonzero biases: the key bias drops out of the softmax, the value bias not.
    config, inputs, stock, fused = _encoder_pair(output_range=1, nonzero_biases=True)
    fusion.fuse_elementwise(fused, export_safe=held is not None)
    if held is not None:
        dense_ops.hold_kernels_in(fused, held)
    last = fused.transformer_layers[-1]._attention_layer  # pylint: disable=protected-access
    calls = []
    for layer in (last._key_dense, last._value_dense):
        layer.call = functools.partial(lambda call, x: calls.append(1) or call(x), layer.call)
    numpy_inputs = {k: v.numpy() for k, v in inputs.items()}
    reference = ref.bert_forward(bert.hf_weights(stock), config.num_attention_heads, **numpy_inputs)
    outputs = tf.function(lambda x: fused(x, training=False))(inputs)
    assert not calls
    assert outputs["sequence_output"].shape[1] == 1
    tolerance = 1e-4 if held != tf.bfloat16 else 0.1  # bf16 products: 8 bits of mantissa
    for name in ("sequence_output", "pooled_output"):
        got = np.asarray(outputs[name], np.float32).reshape(4, -1)
        expected = reference[name][:, 0] if name == "sequence_output" else reference[name]
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0, err_msg=name)
    if held is None:
        fused(inputs, training=True)
        assert not calls


@pytest.mark.parametrize("dropout_rate", [0.0, 0.1])
def test_a_cls_only_last_block_trains_as_the_stock_block_with_the_same_dropout_masks(dropout_rate, monkeypatch):
    """In training the [CLS]-only block (engine/first_position.py) gives the stock block's outputs and gradients,
    with dropout on too: under the same update's keys both draw the same masks (the attention dropout on
    [batch, heads, 1, T] probabilities, whose dropped sum scales the value bias). The last key bias gets no
    gradient (the stock block's is rounding noise around zero). Another update's masks differ, so the
    comparison has teeth."""
    _, inputs, stock, fused = _encoder_pair(dropout_rate=dropout_rate, output_range=1, nonzero_biases=True)
    for model in (stock, fused):  # both rewritten; the stock one keeps Model Garden's output_range block
        fusion.fuse_elementwise(model)
    key_bias = fused.transformer_layers[-1]._attention_layer._key_dense.bias  # pylint: disable=protected-access

    def outputs_and_grads(model, update):
        @tf.function
        def compute():
            with dropout.keys(dropout.step_key(3, update, 0)), tf.GradientTape() as tape:
                outputs = model(inputs, training=True)
                loss = tf.reduce_sum(outputs["sequence_output"] ** 2) + tf.reduce_sum(outputs["pooled_output"])
            grads = tape.gradient(loss, model.trainable_variables)
            return [outputs["sequence_output"], outputs["pooled_output"]] + [
                tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                for v, g in zip(model.trainable_variables, grads)]
        return [t.numpy() for t in compute()]

    with monkeypatch.context() as patch:
        patch.setattr(fusion.first_position, "applies", lambda block: False)
        expected = outputs_and_grads(stock, 1)
    got = outputs_and_grads(fused, 1)
    assert np.abs(got[2 + [v.ref() for v in fused.trainable_variables].index(key_bias.ref())]).max() == 0
    # Key biases' gradients are zero in exact math in every layer (softmax ignores a shift shared by all keys):
    # rounding noise on both sides, far below their kernels' gradients; every other tensor as the stock block's.
    key_biases = [2 + i for i, v in enumerate(fused.trainable_variables) if "/key/bias" in v.name]
    for i, (e, g) in enumerate(zip(expected, got)):
        if i in key_biases:  # the kernel's gradient comes right before its bias's
            assert max(np.abs(e).max(), np.abs(g).max()) < 1e-4 * np.abs(expected[i - 1]).max(), i
        else:
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=3e-5 * max(np.abs(e).max(), 1e-3), err_msg=str(i))
    if dropout_rate:
        other = outputs_and_grads(fused, 2)
        assert np.abs(other[1] - got[1]).max() > 1e-3


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layer_norm_matches_float64_at_inference_and_in_training(policy, monkeypatch):
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
        # As Model Garden builds it: float32 under any policy, BERT's epsilon (too small for Keras' fused path).
        layer = tf_keras.layers.LayerNormalization(axis=-1, epsilon=1e-12, dtype="float32")
        x = tf.random.stateless_normal([3, 5, 16], seed=[5, 6]) * 3.0 + 1.0
        compute_dtype = tf_keras.mixed_precision.global_policy().compute_dtype
        x = tf.cast(x, compute_dtype)  # what the previous layer hands over
        layer(x)
        layer.set_weights([np.linspace(0.5, 1.5, 16), np.linspace(-0.2, 0.2, 16)])
        stock = layer(x, training=False).numpy()
        stock_training = tf.cast(tf.function(lambda t: layer(t, training=True))(x), tf.float64).numpy()
        assert fusion.fuse_elementwise(tf_keras.Sequential([layer]))["layer_norm"] == 1
        rows = tf.cast(x, tf.float32).numpy().astype(np.float64)
        mean, variance = rows.mean(-1, keepdims=True), rows.var(-1, keepdims=True)
        expected = (rows - mean) / np.sqrt(variance + 1e-12) * layer.gamma.numpy() + layer.beta.numpy()

        def ops(training):
            graph = tf.function(lambda t: layer(t, training=training)).get_concrete_function(x).graph
            return {op.type for op in graph.get_operations()}
        got = tf.function(lambda t: layer(t, training=False))(x).numpy()
        assert got.dtype == stock.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
        np.testing.assert_allclose(got, stock, rtol=0, atol=2e-6)
        assert "SquaredDifference" not in ops(training=False) and "EngineLayerNorm" in ops(training=True)

        # Training: our C++ op (engine/layer_norm_kernel.cc), or with it switched off Keras' forward ops (the same
        # bits as the stock layer) and a closed-form gradient; both within float32 rounding of autodiff through a
        # float64 Keras layer.
        reference = tf_keras.layers.LayerNormalization(axis=-1, epsilon=1e-12, dtype="float64")
        reference(rows)
        reference.set_weights([w.astype(np.float64) for w in layer.get_weights()])
        upstream = tf.random.stateless_normal(x.shape, seed=[7, 8])

        def value_and_gradients(norm, inputs):
            @tf.function
            def compute(inputs):
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    y = norm(inputs, training=True)
                    loss = tf.reduce_sum(tf.cast(y, tf.float64) * tf.cast(upstream, tf.float64))
                return [y] + tape.gradient(loss, [inputs, norm.gamma, norm.beta])
            return [tf.cast(t, tf.float64).numpy() for t in compute(inputs)]
        expected = value_and_gradients(reference, tf.constant(rows))
        native = value_and_gradients(layer, x)
        monkeypatch.setenv(layer_norm.LIBRARY.switch, "0")
        assert "EngineLayerNorm" not in ops(training=True)
        keras_forward = value_and_gradients(layer, x)
        np.testing.assert_array_equal(keras_forward[0], stock_training)
        # x's gradient reaches x in its own dtype: bf16 under the mixed policy
        input_tolerance = 2e-6 if policy == "float32" else 2.0 ** -8
        for got in (native, keras_forward):
            np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=2e-6)
            for g, e, rtol in zip(got[1:], expected[1:], (input_tolerance, 1e-5, 1e-5)):
                np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e).max())
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_inference_applies_gelu_inside_the_ffn_dense_and_training_in_its_own_layer():
    _, inputs, stock, fused = _encoder_pair()
    fusion.fuse_elementwise(fused)
    block = fused.transformer_layers[0]
    hidden = tf.random.stateless_normal([2, 5, 64], seed=[4, 5])
    # The FFN dense alone: pre-activation while training, GELU applied at inference.
    seen = {}
    for training in (True, False):
        def probe(x, training=training):
            seen[training] = block._intermediate_dense(x)
            return seen[training]
        tf_keras.layers.Lambda(probe)(hidden, training=training)
    stock_block = stock.transformer_layers[0]
    pre = stock_block._intermediate_dense(hidden)
    np.testing.assert_allclose(seen[True], pre, atol=1e-6)
    np.testing.assert_allclose(seen[False], tf.nn.gelu(pre, approximate=False), atol=1e-6)
    # ... so the whole encoder agrees with stock either way (tested above) and export-safe too:
    safe = _encoder_pair()[3]
    safe.set_weights(stock.get_weights())
    assert fusion.fuse_elementwise(safe, export_safe=True) == {"dropout": 0, "activation": 0, "dense": 12,
                                                               "keras_dense": 0, "attention": 2, "layer_norm": 5,
                                                               "embedding": 0, "block": 2}
    real = inputs["input_mask"].numpy() == 1  # at inference the blocks leave zeros at padding
    for training in (True, False):
        np.testing.assert_allclose(safe(inputs, training=training)["sequence_output"].numpy()[real],
                                   stock(inputs, training=training)["sequence_output"].numpy()[real], atol=1e-5)


def _bf16_as_float64(value):
    """`value` rounded to bfloat16 as mixed precision casts it, as float64 for a reference computation."""
    return tf.cast(tf.cast(value, tf.bfloat16), tf.float64).numpy()


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_dense_keeps_its_bias_out_of_the_matmul_on_amx_cpus_only_and_sums_its_gradient_in_float32(
        monkeypatch, amx):
    # On AMX CPUs TensorFlow's fused bf16 MatMul+BiasAdd has no AMX kernel (dense_ops.bias_apart_from_matmul): the
    # bias is added after the output's Reshape, where grappler cannot fuse it. Values stay within bf16's roundings
    # of a float64 computation either way (stock Keras is not the reference: on CPUs without native bf16, such as
    # AVX2-only ones, TensorFlow's bf16 Einsum is several bf16 ulps off while its MatMul rounds once).
    on_amx = host.cpu_has_amx()
    monkeypatch.setattr(host, "cpu_has_amx", lambda: amx)
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        # 512 rows: enough that a sum in bf16 (BiasAddGrad's) misses the exact one by far more than a rounding.
        for equation, shape, output in (("abc,cd->abd", [8, 64, 64], [32]), ("abc,cde->abde", [8, 64, 64], [4, 8]),
                                        ("abcd,cde->abe", [8, 64, 4, 8], [64])):
            bias_axes = equation.split("->")[1][-len(output):]
            stock, fused = (tf_keras.layers.EinsumDense(equation, output_shape=[None] + output, bias_axes=bias_axes)
                            for _ in range(2))
            x = tf.random.stateless_normal(shape, seed=[1, 2])
            stock(x), fused(x)
            stock.set_weights([w + 0.1 for w in fused.get_weights()])  # a bias that is not zero
            fused.set_weights(stock.get_weights())
            assert fusion.fuse_elementwise(tf_keras.Sequential([fused]))["dense"] == 1

            def value_and_grads(layer):
                @tf.function  # a graph, as the Trainer runs it (grappler and oneDNN's rewrites)
                def compute():
                    with tf.GradientTape() as tape:
                        y = tf.cast(layer(x, training=True), tf.float32)
                        loss = tf.reduce_sum(y * y)
                    return [y] + tape.gradient(loss, layer.trainable_variables)
                return [t.numpy() for t in compute()], compute.get_concrete_function().graph
            got, graph = value_and_grads(fused)
            kernel, bias_value = (_bf16_as_float64(v) for v in stock.weights)
            operands, outputs = equation.split("->")
            inputs, kernel_axes = operands.split(",")
            product = np.einsum(equation, _bf16_as_float64(x), kernel)
            reference = product + bias_value
            # The product rounded to bf16 and the bias added in bf16 (AMX), or the sum rounded once: each rounding is
            # within one bf16 ulp, 2^-7 of its value (oneDNN rounds to nearest, half that; TensorFlow's bf16 MatMul
            # on AVX2-only CPUs truncates), and float32 accumulation adds far less.
            bound = 2.0 ** -7 * (np.abs(product) + np.abs(reference)) + 1e-6 * np.abs(reference).max()
            assert np.all(np.abs(got[0] - reference) <= bound), np.abs(got[0] - reference).max()
            # The kernel's gradient: the inputs against the bf16 upstream gradient bf16(2 y), rounded once to bf16.
            upstream = _bf16_as_float64(2 * got[0])
            kernel_gradient = np.einsum(f"{inputs},{outputs}->{kernel_axes}", _bf16_as_float64(x), upstream)
            np.testing.assert_allclose(got[1], kernel_gradient, rtol=2.0 ** -7,
                                       atol=2.0 ** -7 * np.abs(kernel_gradient).max())
            # The bias gradient is a matmul of ones and the bf16 upstream gradient (dense_ops.bias_gradient),
            # accumulated in float32: within one bf16 ulp (a rounding or, on AVX2, a truncation) of the exact sum of
            # bf16(2 y) over the rows. (TensorFlow's BiasAddGrad, the fused MatMul+BiasAdd's autodiff, sums bf16 in
            # bf16.)
            exact = upstream.reshape([-1] + list(got[2].shape)).sum(axis=0)
            np.testing.assert_allclose(got[2], exact, rtol=2.0 ** -7, atol=1e-6 * np.abs(exact).max())
            ones_matmuls = [op for op in graph.get_operations()
                            if op.type == "MatMul" and op.inputs[0].op.type == "Fill"]
            assert len(ones_matmuls) == 1, [op.name for op in graph.get_operations() if op.type == "MatMul"]
            assert "BiasAddGrad" not in {op.type for op in graph.get_operations()}
            if amx:
                if on_amx:  # as stock Keras, which adds the bias to the rounded bf16 product: the same bits
                    np.testing.assert_array_equal(got[0], value_and_grads(stock)[0][0])
                assert "EngineBiasAdd" in {op.type for op in graph.get_operations()}  # engine/bias.add
            matmul = next(op for op in graph.get_operations() if op.type == "MatMul")
            consumers = [c.type for c in matmul.outputs[0].consumers()]
            assert consumers == (["Reshape"] if amx else ["BiasAdd"]), (equation, consumers)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    # In float32 the fused op runs oneDNN's usual kernel at PyTorch's speed: the bias stays fused everywhere.
    assert not dense_ops.bias_apart_from_matmul(tf.float32)


@pytest.mark.parametrize("shape, activation", [([8, 64, 64], None), ([512, 64], "tanh")])
def test_bf16_keras_dense_sums_its_bias_gradient_in_float32(shape, activation):
    # A token-level head (NER's emissions: [batch, seq, hidden]) and a pooler-like one ([rows, hidden], tanh).
    # Stock Keras' Dense adds its bias with tf.nn.bias_add, whose gradient (BiasAddGrad) sums bf16 in bf16.
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        stock, fused = (tf_keras.layers.Dense(5, activation=activation) for _ in range(2))
        x = tf.random.stateless_normal(shape, seed=[3, 4])
        stock(x), fused(x)
        stock.set_weights([w + 0.1 for w in fused.get_weights()])
        fused.set_weights(stock.get_weights())
        assert fusion.fuse_elementwise(tf_keras.Sequential([fused]))["keras_dense"] == 1

        def value_and_grads(layer, training=True):
            @tf.function
            def compute():
                with tf.GradientTape() as tape:
                    y = tf.cast(layer(x, training=training), tf.float32)
                    loss = tf.reduce_sum(y)  # upstream: ones, whose bf16 sum over the rows stalls at 256
                return [y] + tape.gradient(loss, layer.trainable_variables)
            return [t.numpy() for t in compute()]
        expected, got = value_and_grads(stock), value_and_grads(fused)
        np.testing.assert_array_equal(value_and_grads(fused, training=False)[0], expected[0])  # stock at inference
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-2, atol=1e-2 * np.abs(expected[1]).max())
        # The bias gradient, exactly: d loss / d y = 1 before the activation, its derivative after.
        pre = tf.cast(tf.cast(got[0], tf.bfloat16), tf.float64).numpy()  # y as the activation's bf16 output
        upstream = np.ones_like(pre) if activation is None else tf.cast(tf.cast(1 - pre ** 2, tf.bfloat16),
                                                                         tf.float64).numpy()
        exact = upstream.reshape(-1, 5).sum(axis=0)
        np.testing.assert_allclose(got[2], exact, rtol=2.0 ** -7)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_attention_transposes_run_on_integer_bits_at_inference_only():
    config, inputs, _, fused = _encoder_pair()
    fusion.fuse_elementwise(fused, export_safe=True)

    def transposes(training):
        graph_def = tf.function(lambda x: fused(x, training=training)).get_concrete_function(inputs).graph.as_graph_def()
        # At inference each block's two paths (padding skipped or not) are functions of a tf.cond.
        return sorted(tf.dtypes.as_dtype(n.attr["T"].type).name for n in graph_nodes(graph_def)
                      if n.op == "Transpose")
    # Per layer: query, key and value to heads-first, and the context back (in each of the two paths).
    assert transposes(training=False) == ["int32"] * 2 * 4 * config.num_hidden_layers
    assert transposes(training=True) == ["float32"] * 4 * config.num_hidden_layers


def _batch_of_lengths(tokens: list, length: int) -> dict:
    """Encoder inputs of len(tokens) rows padded to `length`, row i with tokens[i] real word-pieces."""
    mask = tf.cast(tf.range(length)[None] < tf.constant(tokens)[:, None], tf.int32)
    ids = tf.reshape(tf.range(len(tokens) * length) % 50 + 1, [len(tokens), length]) * mask
    return {"input_word_ids": ids, "input_mask": mask, "input_type_ids": tf.zeros_like(ids)}


def _assert_numpy_reference(config, model, inputs, outputs, tolerance=1e-4):
    """`outputs` (of `model` on `inputs`) are the float64 NumPy BERT's on the model's weights, padding masked."""
    numpy_inputs = {k: v.numpy() for k, v in inputs.items()}
    reference = ref.bert_forward(bert.hf_weights(model), config.num_attention_heads, **numpy_inputs)
    seq_diff, pooled_diff = ref.max_abs_diffs(reference, outputs, numpy_inputs["input_mask"])
    assert seq_diff <= tolerance and pooled_diff <= tolerance, (numpy_inputs["input_mask"].sum(1), seq_diff,
                                                                pooled_diff)


def test_short_sentences_attend_in_eigens_kernels_at_inference_and_all_give_the_numpy_reference(monkeypatch):
    """At inference in float32, attention with at most EIGEN_SCORES_UP_TO score elements per head (batch x
    queries x keys) takes BatchMatMulV3, which TensorFlow's oneDNN rewrite leaves to Eigen, and a softmax of Eigen
    ops; larger attention the oneDNN products. Both give the float64 NumPy BERT's values, padding masked. (An
    export for a oneDNN serving host: one for an Eigen host takes neither, see the next test.)"""
    config, _, _, fused = _encoder_pair()
    monkeypatch.setattr(host, "serving_host_runs_onednn", lambda: True)
    fusion.fuse_elementwise(fused, export_safe=True)
    eigen_products = []
    batch_matmul_v3 = tf.raw_ops.BatchMatMulV3
    monkeypatch.setattr(tf.raw_ops, "BatchMatMulV3", lambda **kw: eigen_products.append(1) or batch_matmul_v3(**kw))
    limit = attention.EIGEN_SCORES_UP_TO
    side = math.isqrt(limit)
    assert side * side == limit  # so that [1, side] is the largest one-sentence batch on the Eigen side
    cases = [([11], 16), ([16, 5], 16), ([side], side), ([side + 1], side + 1), ([16, 11, 5, 1], 16)]
    for tokens, length in cases:  # tokens per row, padded length
        inputs = _batch_of_lengths(tokens, length)
        eigen_products.clear()
        outputs = fused(inputs, training=False)  # eagerly: each tf.cond runs only the branch it takes
        small = len(tokens) * length * length <= limit
        assert len(eigen_products) == (2 * config.num_hidden_layers if small else 0), (tokens, length)
        _assert_numpy_reference(config, fused, inputs, outputs)
    # Training keeps the oneDNN products (and on the CPU our softmax-dropout op).
    eigen_products.clear()
    fused(inputs, training=True)
    assert not eigen_products


def test_an_eigen_hosts_export_attends_to_batches_in_query_chunks_and_gives_the_numpy_reference(monkeypatch):
    """An export for a serving host whose TensorFlow runs Eigen's kernels: a batch whose per-head products cost
    more than BATCH_MATMUL_SHARDS_UP_TO multiply-adds attends with its query rows in chunks (attention.py), the
    last chunk padded, each half of the heads apart; one sentence and cheaper products as Keras does. All give the
    float64 NumPy BERT's values, padding masked."""
    config, _, _, fused = _encoder_pair()
    monkeypatch.setattr(host, "serving_host_runs_onednn", lambda: False)
    fusion.fuse_elementwise(fused, export_safe=True)
    chunked = []
    in_query_chunks = attention._in_query_chunks
    monkeypatch.setattr(attention, "_in_query_chunks", lambda *a: chunked.append(a[0].shape) or in_query_chunks(*a))
    head_dim = config.hidden_size // config.num_attention_heads
    limit = attention.BATCH_MATMUL_SHARDS_UP_TO
    above = next(n for n in range(1, 128) if n * head_dim * n > limit)  # the shortest padded length chunked
    assert (limit // (head_dim * above)) < above and above % (limit // (head_dim * above)) != 0  # a padded chunk
    cases = [([above, 9, 1], above), ([30, 17], 30), ([above - 1, 5], above - 1), ([40], 40)]
    for tokens, length in cases:  # tokens per row, padded length
        inputs = _batch_of_lengths(tokens, length)
        chunked.clear()
        outputs = fused(inputs, training=False)  # eagerly: each tf.cond runs only the branch it takes
        expected = len(tokens) > 1 and length * head_dim * length > limit
        assert len(chunked) == (2 * config.num_hidden_layers if expected else 0), (tokens, length)
        assert all(shape[1] == config.num_attention_heads // 2 for shape in chunked), chunked
        _assert_numpy_reference(config, fused, inputs, outputs)


def test_export_safe_graph_has_no_xla_kernel_nor_op_of_ours(monkeypatch):
    _, inputs, _, fused = _encoder_pair()
    _, _, _, safe = _encoder_pair()
    monkeypatch.setenv(bias.LIBRARY.switch, "0")  # so that training runs the XLA GELU kernels

    def xla_functions(model, training):
        graph = tf.function(lambda x: model(x, training=training)).get_concrete_function(inputs).graph
        library = graph.as_graph_def().library.function
        return [f.signature.name for f in library if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b]

    fusion.fuse_elementwise(fused)
    fusion.fuse_elementwise(safe, export_safe=True)
    assert xla_functions(fused, training=True)  # the GELU kernels: the check can see them
    assert not xla_functions(safe, training=True) and not xla_functions(safe, training=False)
    # Nor any op of our C++ libraries, which a served graph's machine lacks; in our own process, inference runs the
    # LayerNorms (the embeddings' alone, the blocks' with their residual adds, in both branches of the padding
    # cond) and the blocks' attention as our ops.
    def ours(model):
        types = graph_op_types(tf.function(lambda x: model(x, training=False)), inputs)
        return sorted(t for t in types if t.startswith("Engine"))
    assert ours(safe) == []
    assert ours(fused) == ["EngineAddLayerNorm", "EngineLayerNorm", "EngineTokenAttention"]


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "held bf16 kernels"])
def test_export_safe_bf16_dense_on_amx_cpus_has_no_op_of_ours(monkeypatch, policy):
    """On AMX CPUs a bf16 dense adds its bias apart from the MatMul, by our C++ op (engine/bias.py); an export-safe
    graph must still be standard ops only. It was not: launch.export --serving_precision=bfloat16 on the AMX Xeon
    wrote EngineBiasAdd into the SavedModel, which then did not load in a process without our library ("Op type
    not registered 'EngineBiasAdd'"). Held (constant) kernels keep the fused bias; any other export-safe bf16 dense
    adds it with AddV2. The process's own inference keeps our op. AMX is patched in, so any CPU runs this."""
    monkeypatch.setattr(host, "cpu_has_amx", lambda: True)
    if policy == "mixed_bfloat16":
        tf_keras.mixed_precision.set_global_policy(policy)
    try:
        _, inputs, _, safe = _encoder_pair()
        _, _, _, native = _encoder_pair()
        fusion.fuse_elementwise(safe, export_safe=True)
        fusion.fuse_elementwise(native)
        if policy != "mixed_bfloat16":
            dense_ops.hold_kernels_in(safe, tf.bfloat16)
            dense_ops.hold_kernels_in(native, tf.bfloat16)
        def op_types(model):
            return graph_op_types(tf.function(lambda x: model(x, training=False)), inputs)
        assert not [t for t in op_types(safe) if t.startswith("Engine")]
        if policy == "mixed_bfloat16":  # the bias apart, by our op, where the graph need not be portable
            assert "EngineBiasAdd" in op_types(native)
        else:  # held kernels: the fused bias, ours or not
            assert "EngineBiasAdd" not in op_types(native)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_kernels_held_in_bf16_give_the_numpy_reference_as_graph_constants():
    """launch.export --serving_precision=bfloat16: the blocks' dense layers multiply bf16 copies of their kernels at
    inference (within bf16 rounding of the float64 NumPy BERT, and not float32's values), as constants of the graph
    in halves of their columns (oneDNN keeps a constant weight reordered), the float32 kernels unread (so
    tasks/serving.save leaves them out); training still reads the float32 kernels."""
    config, inputs, _, model = _encoder_pair()
    fusion.fuse_elementwise(model, export_safe=True)
    numpy_inputs = {k: v.numpy() for k, v in inputs.items()}
    reference = ref.bert_forward(bert.hf_weights(model), config.num_attention_heads, **numpy_inputs)
    before = tf.function(lambda x: model(x, training=False))(inputs)
    with pytest.raises(ValueError, match="needs engine/fusion.py's dense rewrite first"):
        dense_ops.hold_kernels_in(_encoder_pair()[3], tf.bfloat16)
    assert dense_ops.hold_kernels_in(model, tf.bfloat16) == 6 * config.num_hidden_layers
    infer = tf.function(lambda x: model(x, training=False)).get_concrete_function(inputs)
    seq_diff, pooled_diff = ref.max_abs_diffs(reference, infer(inputs), numpy_inputs["input_mask"])
    float32_diffs = ref.max_abs_diffs(reference, before, numpy_inputs["input_mask"])
    # bf16 products round to 8 bits: over 20x float32's distance (tiny init weights keep both small), under 0.1.
    assert 20 * max(float32_diffs) <= max(seq_diff, pooled_diff) <= 0.1, (float32_diffs, seq_diff, pooled_diff)
    dense_layers = [layer for layer in model.submodules if dense_ops.is_plain(layer)]
    kernel_shapes = collections.Counter((rows, columns // 2) for layer in dense_layers  # halves of their columns
                                        for rows, columns in [layer._held_kernel.shape])
    constants = collections.Counter(constant_shapes(infer.graph.as_graph_def(), tf.bfloat16))
    assert all(constants[shape] >= count for shape, count in kernel_shapes.items()), (kernel_shapes, constants)
    read = {variable.ref() for variable in infer.variables}
    assert not any(layer.kernel.ref() in read for layer in dense_layers)
    trained = tf.function(lambda x: model(x, training=True)).get_concrete_function(inputs)
    read = {variable.ref() for variable in trained.variables}
    assert all(layer.kernel.ref() in read for layer in dense_layers)
    assert not constant_shapes(trained.graph.as_graph_def(), tf.bfloat16)


def test_kernels_held_in_float32_run_in_two_halves_and_give_the_numpy_reference(monkeypatch):
    """launch.export's float32 export: each block's FFN as two independent halves of its inner width, the other
    projections in halves of their output columns (their kernels as graph constants), with the float64 NumPy
    BERT's values for one unpadded sentence (the padded-layout branch, as served at batch 1) and for a padded
    batch (the blocks on the tokens); whole products where halves would not run on one thread each."""
    config = bert.BertConfig(**{**bert.BertConfig.tiny().__dict__, "intermediate_size": 192})
    model = bert.build_encoder(config)
    _, inputs, _, _ = _encoder_pair()
    one = {k: v[:1] for k, v in inputs.items()}  # 16 tokens, no padding
    model(inputs)
    rng = np.random.default_rng(0)
    for variable in model.variables:  # biases are initialised to zeros, which would hide a bias added twice
        if "bias" in variable.name:
            variable.assign(rng.normal(0, 0.1, variable.shape))
    fusion.fuse_elementwise(model, export_safe=True)
    assert dense_ops.hold_kernels_in(model, tf.float32) == 6 * config.num_hidden_layers
    monkeypatch.setattr(host, "serving_host_runs_onednn", lambda: True)  # halves by the L2 rule
    for l2 in (2 << 20, 16 << 10):  # the AMX Xeon's L2; a tiny one, where no half runs alone: whole products
        monkeypatch.setattr(host, "l2_cache_bytes", lambda l2=l2: l2)
        for batch in (one, inputs):
            infer = tf.function(lambda x: model(x, training=False)).get_concrete_function(batch)
            numpy_inputs = {k: v.numpy() for k, v in batch.items()}
            reference = ref.bert_forward(bert.hf_weights(model), config.num_attention_heads, **numpy_inputs)
            seq_diff, pooled_diff = ref.max_abs_diffs(reference, infer(batch), numpy_inputs["input_mask"])
            assert seq_diff <= 1e-5 and pooled_diff <= 1e-5, (l2, seq_diff, pooled_diff)
        constants = collections.Counter(constant_shapes(infer.graph.as_graph_def(), tf.float32))
        halves, wholes = ((64, 96), (96, 64), (64, 32)), ((64, 192), (192, 64), (64, 64))  # W1, W2, Q/K/V/output
        if l2 > 16 << 10:
            assert all(constants[shape] >= 2 * config.num_hidden_layers for shape in halves), constants
            assert not any(constants[shape] for shape in wholes), constants
        else:
            assert all(constants[shape] >= config.num_hidden_layers for shape in wholes), constants
            assert not any(constants[shape] for shape in halves), constants


def test_layer_norm_parameters_held_as_constants_give_the_numpy_reference():
    """launch.export: every LayerNorm's gamma and beta as graph constants (fewer nodes per served call), with the
    float64 NumPy BERT's values for a padded batch (both branches of the blocks' padding cond) and one unpadded
    sentence; gamma and beta drawn at random so that a swapped or dropped one shows. The variables are unread at
    inference, and read in training."""
    config, inputs, _, model = _encoder_pair()
    rng = np.random.default_rng(1)
    norms = [layer for layer in model.submodules if isinstance(layer, tf_keras.layers.LayerNormalization)]
    for layer in norms:
        layer.gamma.assign(rng.normal(1, 0.3, layer.gamma.shape))
        layer.beta.assign(rng.normal(0, 0.3, layer.beta.shape))
    fusion.fuse_elementwise(model, export_safe=True)
    assert fusion.hold_layer_norm_parameters(model) == len(norms) == 2 * config.num_hidden_layers + 1
    for batch in (inputs, {k: v[:1] for k, v in inputs.items()}):
        infer = tf.function(lambda x: model(x, training=False)).get_concrete_function(batch)
        numpy_inputs = {k: v.numpy() for k, v in batch.items()}
        reference = ref.bert_forward(bert.hf_weights(model), config.num_attention_heads, **numpy_inputs)
        seq_diff, pooled_diff = ref.max_abs_diffs(reference, infer(batch), numpy_inputs["input_mask"])
        assert seq_diff <= 1e-5 and pooled_diff <= 1e-5, (seq_diff, pooled_diff)
        read = {variable.ref() for variable in infer.variables}
        assert not any(layer.gamma.ref() in read or layer.beta.ref() in read for layer in norms)
    trained = tf.function(lambda x: model(x, training=True)).get_concrete_function(inputs)
    read = {variable.ref() for variable in trained.variables}
    assert all(layer.gamma.ref() in read and layer.beta.ref() in read for layer in norms)


def test_halves_with_onednn_only_where_each_half_runs_on_one_thread_and_always_with_eigen(monkeypatch):
    """TensorFlow's oneDNN runs a MatMul on one thread when bytes x (m n + k (m + n)) fit in L2: at 32 rows,
    MiniLM's projections' column halves do at 1 MiB (the Zen 4) and 2 MiB (the AMX Xeon), its FFN halves at 2 MiB
    only (in bfloat16 at both). A host serving with Eigen's kernels gets halves whatever its L2."""
    halves = lambda: (dense_ops.halves_run_side_by_side(384, 192, 4), dense_ops.halves_run_side_by_side(384, 768, 2),
                      dense_ops.halves_run_side_by_side(384, 768, 4), dense_ops.halves_run_side_by_side(768, 384, 4))
    for onednn, l2, expected in ((True, 1 << 20, (True, True, False, False)), (True, 2 << 20, (True,) * 4),
                                 (False, 512 << 10, (True,) * 4), (False, 16 << 10, (True,) * 4)):
        monkeypatch.setattr(host, "serving_host_runs_onednn", lambda onednn=onednn: onednn)
        monkeypatch.setattr(host, "l2_cache_bytes", lambda l2=l2: l2)
        assert halves() == expected, (onednn, l2)


@pytest.mark.parametrize("flags, setting, expected", [
    ({"avx2", "fma"}, None, False),  # the Zen 3: Eigen by default
    ({"avx2", "avx512f", "avx512_vnni"}, None, True), ({"avx2", "avx_vnni"}, None, True),
    ({"avx512f", "amx_tile", "amx_bf16"}, None, True),
    ({"avx2", "fma"}, "1", True), ({"avx512_vnni"}, "0", False), ({"avx512_vnni"}, "false", False)])
def test_an_export_is_served_with_onednn_as_the_user_set_it_else_as_tensorflow_defaults_on_this_cpu(
        flags, setting, expected, monkeypatch):
    monkeypatch.setattr(host, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(engine, "ONEDNN_OPTS_DEFAULTED", setting is None)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1" if setting is None else setting)  # as engine/__init__ sets it
    assert host.serving_host_runs_onednn() is expected


@pytest.mark.parametrize("flags, cores, user_setting, expected", [
    ({"avx2", "fma"}, 2, None, "1"),  # the Zen 3: Eigen, every product in halves, one core each
    ({"avx2", "fma"}, 16, None, "8"), ({"avx2", "fma"}, 1, None, "1"),
    ({"avx2", "fma"}, 2, "2", "2"),  # the user's setting wins
    ({"avx512f", "avx512_vnni"}, 2, None, None),  # oneDNN: TensorFlow's default pools
    ({"avx512f", "avx512_vnni"}, 2, "3", "3")])
def test_an_eigen_host_serves_with_half_the_cores_as_intra_op_threads_unless_the_user_set_them(
        flags, cores, user_setting, expected, monkeypatch):
    from launch import export as export_launcher
    monkeypatch.setattr(host, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(host, "usable_cores", lambda: cores)
    monkeypatch.setattr(engine, "ONEDNN_OPTS_DEFAULTED", True)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")  # as engine/__init__ sets it
    if user_setting is None:
        monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    else:
        monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", user_setting)
    environment = host.serving_host_environment()
    assert environment.get("TF_NUM_INTRAOP_THREADS") == expected
    assert "TF_ENABLE_ONEDNN_OPTS" not in environment  # the host keeps TensorFlow's default
    advice = export_launcher.serving_advice()
    if "avx512_vnni" in flags:
        assert advice is None
    else:
        advised = max(1, cores // 2)
        assert f"TF_NUM_INTRAOP_THREADS={advised} " in advice and f"parallelism={advised};" in advice, advice


def _value_and_grad(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * y)
    return y.numpy(), tape.gradient(loss, x).numpy()


def test_fuse_elementwise_changes_only_the_given_model_in_training_mode():
    config = bert.BertConfig(**{**bert.BertConfig.tiny().__dict__, "hidden_dropout_prob": 0.1,
                                    "attention_probs_dropout_prob": 0.1})
    fused, stock = bert.build_encoder(config), bert.build_encoder(config)
    ids = tf.reshape(tf.range(64) % 50 + 1, [4, 16])
    inputs = {"input_word_ids": ids, "input_mask": tf.ones_like(ids), "input_type_ids": tf.zeros_like(ids)}
    fused(inputs), stock(inputs)
    stock.set_weights(fused.get_weights())
    # Embedding dropout, then per Transformer block attention-probability, attention-output and FFN-output
    # dropout (the blocks' inner FFN dropout has rate 0 and is left alone) and the FFN's GELU.
    layers = config.num_hidden_layers
    assert fusion.fuse_elementwise(fused) == {"dropout": 1 + 3 * layers, "activation": layers,
                                              "dense": 6 * layers, "keras_dense": 1, "attention": layers,
                                              "layer_norm": 1 + 2 * layers, "embedding": 1, "block": layers}
    rebound = [m for m in fused.submodules if "call" in vars(m) or "_compute_attention" in vars(m)]
    assert len(rebound) == (1 + 3 * layers) + layers + 6 * layers + 1 + layers + (1 + 2 * layers) + 1 + layers
    assert not any("call" in vars(m) for m in stock.submodules)
    # Evaluation: dropout is the identity, so fused and stock agree.
    np.testing.assert_allclose(fused(inputs, training=False)["sequence_output"],
                               stock(inputs, training=False)["sequence_output"], atol=1e-5)
    # Training: a different random mask each call.
    a, b = (fused(inputs, training=True)["sequence_output"].numpy() for _ in range(2))
    assert np.abs(a - b).max() > 1e-3


class DropoutToyTask(ToyTask):
    def build_model(self):
        inputs = tf_keras.Input([self.x.shape[1]], name="x")
        hidden = tf_keras.layers.Dropout(0.2)(tf_keras.layers.Dense(16, activation="gelu")(inputs))
        logits = tf_keras.layers.Dense(self.classes, dtype="float32")(tf_keras.layers.Dropout(0.2)(hidden))
        return tf_keras.Model(inputs, logits)


@pytest.mark.parametrize("strategy, jit_compile", [("default", False), ("mirrored", True)])
def test_trains_under_the_engine_traced_once(tmp_path, strategy, jit_compile):
    trainer = run_training(DropoutToyTask, global_batch_size=16, grad_accum_steps=2, strategy=strategy,
                           jit_compile=jit_compile, train_steps=30, steps_per_loop=10, model_dir=str(tmp_path))
    # Dense(activation=...) is not an Activation layer; Keras' Dense layers keep their call except for the bias
    # gradient in training.
    assert trainer.fused_layers == {"dropout": 2, "activation": 0, "dense": 0, "keras_dense": 2, "attention": 0,
                                   "layer_norm": 0, "embedding": 0, "block": 0}
    losses = [h["loss"] for h in trainer.train_history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert trainer.train_loop_tracing_count == 1
