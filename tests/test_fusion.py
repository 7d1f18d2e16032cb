"""engine/fusion.py: the XLA dropout is Bernoulli(1 - rate) inverted dropout with the mask reused by the gradient
and fresh on every call; fused activations equal the stock ones with their gradients; fusing touches only the model
it was applied to; and the fused model trains under the engine (mirrored + accumulation + XLA), traced once."""
import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from engine import dropout, fusion
from engine_helpers import ToyTask, run_training
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
    assert fusion.fuse_elementwise(tf_keras.Sequential([layer])) == {"dropout": 0, "activation": 1}
    y, grad = _value_and_grad(layer, x)
    np.testing.assert_allclose(y, expected_y, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_fused_activation_in_bf16_rounds_float32_math_once():
    layer = tf_keras.layers.Activation("gelu", dtype="mixed_bfloat16")
    x = tf.cast(tf.random.stateless_normal([64, 96], seed=[9, 10]) * 3, tf.bfloat16)
    stock = layer(x)
    fusion.fuse_elementwise(tf_keras.Sequential([layer]))
    y = layer(x)
    assert y.dtype == tf.bfloat16
    x64 = x.numpy().astype(np.float64)
    exact = 0.5 * x64 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    error = np.abs(y.numpy().astype(np.float64) - exact)
    # One rounding to bf16 (8 significant bits): within half a unit in the last place, plus float32 noise.
    assert np.all(error <= np.abs(exact) * 2.0 ** -8 + 1e-6)
    assert error.mean() <= np.abs(stock.numpy().astype(np.float64) - exact).mean()


def test_fused_encoder_under_mixed_bfloat16_is_bit_identical_without_the_float32_round_trip():
    """Model Garden pins GELU to float32 under mixed_bfloat16; fused, it takes bf16 and computes in float32 inside,
    which must give exactly the stock values and gradients."""
    config = bert.BertConfig(**{**bert.BertConfig.tiny().__dict__, "hidden_dropout_prob": 0.0,
                                    "attention_probs_dropout_prob": 0.0})
    ids = tf.reshape(tf.range(64) % 50 + 1, [4, 16])
    inputs = {"input_word_ids": ids, "input_mask": tf.ones_like(ids), "input_type_ids": tf.zeros_like(ids)}
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        stock, fused = bert.build_encoder(config), bert.build_encoder(config)
        stock(inputs), fused(inputs)
        fused.set_weights(stock.get_weights())
        activations = [layer for layer in fused.submodules if type(layer) is tf_keras.layers.Activation]
        assert {layer.compute_dtype for layer in activations} == {"float32"}  # Model Garden's choice
        assert fusion.fuse_elementwise(fused)["activation"] == len(activations) == config.num_hidden_layers
        assert {layer.compute_dtype for layer in activations} == {"bfloat16"}

        def output_and_grads(model):
            with tf.GradientTape() as tape:
                y = tf.cast(model(inputs, training=True)["sequence_output"], tf.float32)
                loss = tf.reduce_sum(y * y)
            grads = tape.gradient(loss, model.trainable_variables)
            return [y.numpy()] + [tf.convert_to_tensor(g).numpy() for g in grads if g is not None]

        for expected, got in zip(output_and_grads(stock), output_and_grads(fused)):
            np.testing.assert_array_equal(got, expected)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


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
    assert fusion.fuse_elementwise(fused) == {"dropout": 1 + 3 * config.num_hidden_layers,
                                              "activation": config.num_hidden_layers}
    rebound = [m for m in fused.submodules if "call" in vars(m)]
    assert len(rebound) == 1 + 4 * config.num_hidden_layers
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
    assert trainer.fused_layers == {"dropout": 2, "activation": 0}  # Dense(activation=...) is not a layer of its own
    losses = [h["loss"] for h in trainer.train_history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert trainer.train_loop_tracing_count == 1
