"""LAMB and layer-wise learning-rate decay: the update against NumPy, the factors against the formula,
training under the default and mirrored strategies, and resuming with the optimizer state."""
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from engine import optimization
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from engine.strategy import make_strategy
from engine.trainer import Trainer
from conftest import write_sst2_head
from engine_helpers import ToyTask
from tasks.encoders import bert
from tasks.classification.task import ClassificationConfig, ClassificationTask

B1, B2, EPS = 0.9, 0.999, 1e-6


def lamb_reference(weights, grads_per_step, *, lr, weight_decay, excluded):
    """LAMB in float64 NumPy, straight from the paper / Model Garden's lamb.py."""
    w, m, v = weights.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads_per_step, start=1):
        g = g.astype(np.float64)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        m_hat, v_hat = m / (1 - B1 ** t), v / (1 - B2 ** t)
        update = m_hat / (np.sqrt(v_hat) + EPS)
        ratio = 1.0
        if not excluded:  # excluded from weight decay: no decay and no trust ratio (Model Garden's default)
            update = update + weight_decay * w
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = w - lr * ratio * update
    return w


def make(config: OptimizerConfig):
    return optimization.make_optimizer(config, train_steps=10, loss_scale=False)


def constant_lr(**kwargs):
    return OptimizerConfig(learning_rate=0.05, warmup_steps=0, decay_steps=10 ** 6, end_learning_rate=0.05, **kwargs)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("num_steps", [1, 2])
def test_lamb_matches_numpy(weight_decay, num_steps):
    rng = np.random.default_rng(0)
    # name -> (initial value, excluded from decay and trust ratio)
    cases = {
        "dense/kernel": (rng.normal(size=(4, 3)), False),
        "dense/bias": (rng.normal(size=(3,)), True),
        "encoder/layer_norm/gamma": (1 + 0.1 * rng.normal(size=(3,)), True),
        "zero/kernel": (np.zeros((2, 3)), False),          # ||w|| = 0: trust ratio 1
        "no_gradient/kernel": (rng.normal(size=(3, 2)), False),  # g = 0: ||u|| = 0 without decay, ratio 1
    }
    variables = [tf.Variable(value.astype(np.float32), name=name) for name, (value, _) in cases.items()]
    grads = [[rng.normal(size=v.shape).astype(np.float32) * (0.0 if "no_gradient" in v.name else 1.0)
              for v in variables] for _ in range(num_steps)]
    optimizer = make(constant_lr(optimizer="lamb", weight_decay=weight_decay))
    assert isinstance(optimizer, optimization.LAMB)
    optimizer.build(variables)
    for step_grads in grads:
        optimizer.apply_gradients(zip([tf.constant(g) for g in step_grads], variables),
                                  skip_gradients_aggregation=True)
    for i, (name, (value, excluded)) in enumerate(cases.items()):
        expected = lamb_reference(value, [g[i] for g in grads], lr=0.05, weight_decay=weight_decay, excluded=excluded)
        np.testing.assert_allclose(variables[i].numpy(), expected, rtol=2e-5, atol=1e-6, err_msg=name)
    assert int(optimizer.iterations) == num_steps


def test_layer_decay_factors_follow_the_formula_for_bert_encoder_v2():
    encoder = bert.build_encoder(bert.BertConfig.tiny())  # 2 layers
    encoder(bert.dummy_inputs())
    head = tf_keras.layers.Dense(2, name="logits")
    head(tf.zeros([1, 64]))  # built in its name scope: "logits/kernel:0"
    variables = encoder.trainable_variables + head.trainable_variables
    decay, num_layers = 0.5, 2

    def expected(name):
        for layer in range(num_layers):
            if f"/transformer/layer_{layer}/" in name:
                return decay ** (num_layers - layer)
        if any(part in name for part in ("word_embeddings", "position_embedding", "type_embeddings",
                                         "embeddings/layer_norm")):
            return decay ** (num_layers + 1)
        assert "pooler" in name or name.startswith("logits/"), name
        return 1.0

    for kind in ("adamw", "lamb"):
        optimizer = make(constant_lr(optimizer=kind, layer_decay=decay))
        optimizer.build(variables)
        factors = optimizer.learning_rate_multipliers
        assert factors == {v.name: expected(v.name) for v in variables}
        assert sorted(set(factors.values())) == [0.125, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("kind", ["adamw", "lamb"])
def test_layer_decay_scales_each_variables_update(kind):
    """The first update is linear in the learning rate (decay and trust ratio included), so with layer decay
    each variable moves by its factor times what it moves without."""
    encoder = bert.build_encoder(bert.BertConfig.tiny(vocab_size=50))
    encoder(bert.dummy_inputs())
    head = tf_keras.layers.Dense(2, name="logits")
    head(tf.zeros([1, 64]))  # built in its name scope: "logits/kernel:0"
    variables = encoder.trainable_variables + head.trainable_variables
    initial = [v.numpy() for v in variables]
    rng = np.random.default_rng(1)
    grads = [tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in variables]

    def deltas(layer_decay):
        for v, value in zip(variables, initial):
            v.assign(value)
        optimizer = make(constant_lr(optimizer=kind, weight_decay=0.1, layer_decay=layer_decay))
        optimizer.build(variables)
        optimizer.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
        return [v.numpy() - value for v, value in zip(variables, initial)], optimizer

    plain, _ = deltas(None)
    decayed, optimizer = deltas(0.8)
    factors = optimizer.learning_rate_multipliers
    assert min(factors.values()) == pytest.approx(0.8 ** 3)
    for v, a, b in zip(variables, plain, decayed):
        np.testing.assert_allclose(b, factors[v.name] * a, rtol=1e-4, atol=1e-8, err_msg=v.name)


def test_layer_decay_without_encoder_layers_is_a_clear_error():
    optimizer = make(constant_lr(layer_decay=0.9))
    with pytest.raises(ValueError, match=r"--layer_decay=0.9: no variable name matches"):
        optimizer.build([tf.Variable(tf.zeros([2]), name="dense/kernel")])


def test_optimizer_config_checks_values():
    with pytest.raises(ValueError, match="--optimizer='sgd'"):
        OptimizerConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="--layer_decay=1.5"):
        OptimizerConfig(layer_decay=1.5)


# ------------------------------------------------------------------------------------ in the Trainer

def train(model_dir, *, train_steps, strategy="default", precision="float32", grad_accum_steps=1,
          task_factory=lambda: ToyTask(shuffle=True), learning_rate=0.02, **optimizer_kwargs):
    config = TrainerConfig(model_dir=str(model_dir), train_steps=train_steps, global_batch_size=16,
                           grad_accum_steps=grad_accum_steps, steps_per_loop=1, eval_split="",
                           checkpoint_every_steps=1)
    runtime = RuntimeConfig(strategy=strategy, precision=precision)
    optimizer = OptimizerConfig(**{"optimizer": "lamb", **optimizer_kwargs}, learning_rate=learning_rate,
                                warmup_steps=0, decay_steps=10 ** 6, end_learning_rate=learning_rate, clip_norm=None)
    trainer = Trainer(task_factory(), config, optimizer, runtime, strategy=make_strategy(runtime))
    trainer.train()
    return [h["loss"] for h in trainer.train_history], [w.copy() for w in trainer.model.get_weights()], trainer


def test_trainer_with_lamb_default_mirrored_and_resume(tmp_path):
    losses, weights, trainer = train(tmp_path / "plain", train_steps=6)
    assert isinstance(trainer.optimizer, optimization.LAMB)
    assert losses[-1] < losses[0]
    assert trainer.train_loop_tracing_count == 1
    # Two replicas x two micro-batches: the same global batch, so the same LAMB updates.
    mirrored_losses, mirrored_weights, _ = train(tmp_path / "mirrored", train_steps=6, strategy="mirrored",
                                                 grad_accum_steps=2)
    np.testing.assert_allclose(mirrored_losses, losses, atol=1e-5)
    for a, b in zip(weights, mirrored_weights):
        np.testing.assert_allclose(b, a, atol=1e-5)
    # Stop after 3 updates, resume to 6: the moments come back from the checkpoint (without them the
    # continuation would differ), and the run equals the uninterrupted one.
    first, _, first_trainer = train(tmp_path / "resumed", train_steps=3)
    saved = dict(tf.train.list_variables(first_trainer.saver.latest_checkpoint))
    moments = [name for name in saved if name.startswith("optimizer/_variables/")]  # m and v of each variable
    assert len(moments) == 2 * len(first_trainer.model.trainable_variables)
    second, resumed_weights, _ = train(tmp_path / "resumed", train_steps=6)
    np.testing.assert_allclose(first + second, losses, atol=1e-6)
    for a, b in zip(weights, resumed_weights):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_trainer_with_lamb_under_float16_loss_scaling(tmp_path):
    losses, _, trainer = train(tmp_path, train_steps=4, precision="mixed_float16")
    assert isinstance(trainer.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    assert isinstance(trainer.optimizer.inner_optimizer, optimization.LAMB)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.fixture(scope="module")
def sst2_train(tmp_path_factory):
    return write_sst2_head(tmp_path_factory.mktemp("sst2"), 64)


def test_layer_decay_on_a_bert_classifier_mirrored_equals_default(sst2_train, tmp_path, kind="adamw"):
    """Layer-wise rates on the real encoder's variables inside the Trainer: two replicas give the same updates.
    (AdamW: its layer-wise decoupled decay is our own code under merge_call; LAMB shares the factors and is
    checked under mirrored above.)"""
    encoder = dataclasses.replace(bert.BertConfig.tiny(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = ClassificationConfig(data_files={"train": sst2_train}, encoder=encoder, max_seq_length=32, dropout=0.0,
                                  vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"), group_by_length=0,
                                  shuffle_buffer=1)
    runs = [train(tmp_path / strategy, train_steps=2, strategy=strategy, optimizer=kind, layer_decay=0.5,
                  weight_decay=0.1, learning_rate=1e-3, task_factory=lambda: ClassificationTask(config))
            for strategy in ("default", "mirrored")]
    (losses, weights, trainer), (mirrored_losses, mirrored_weights, _) = runs
    factors = trainer.optimizer.learning_rate_multipliers
    assert sorted(set(factors.values())) == [0.125, 0.25, 0.5, 1.0]
    assert factors[next(n for n in factors if "word_embeddings" in n)] == 0.125
    assert factors[next(n for n in factors if n.startswith("logits/"))] == 1.0
    np.testing.assert_allclose(mirrored_losses, losses, atol=1e-5)
    for a, b in zip(weights, mirrored_weights):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_warmup_as_long_as_the_run_is_refused_not_trained_at_rate_zero():
    from engine.optimization import make_learning_rate  # noqa: PLC0415
    with pytest.raises(ValueError, match=r"--warmup_steps=100 is not below the 60 updates"):
        make_learning_rate(OptimizerConfig(learning_rate=1e-4, warmup_steps=100), 60)
    schedule = make_learning_rate(OptimizerConfig(learning_rate=1e-4, warmup_steps=10), 60)
    assert float(schedule(5)) == pytest.approx(1e-4 * 5 / 10 * 50 / 60, rel=1e-5)  # ramps towards the decayed value


def adamw_reference(weights, grads_per_step, *, learning_rates, weight_decay, decayed):
    """AdamW in float64 NumPy (Loshchilov & Hutter; tf_keras' epsilon-hat form): decoupled decay w -= lr wd w,
    then w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)."""
    w, m, v = weights.astype(np.float64), 0.0, 0.0
    for t, (g, lr) in enumerate(zip(grads_per_step, learning_rates), start=1):
        g = g.astype(np.float64)
        if decayed:
            w = w - lr * weight_decay * w
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        w = w - lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t) * m / (np.sqrt(v) + EPS)
    return w


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_adamw_matches_numpy_over_a_warmup_schedule(layer_decay):
    """The fused AdamW (one kernel per variable, scalars shared) against NumPy, over 4 updates whose learning
    rate warms up then decays, with decay exclusions and per-layer factors."""
    rng = np.random.default_rng(2)
    cases = {  # name -> (initial value, decayed, layer-decay factor at 0.5 with 2 layers)
        "transformer/layer_0/dense/kernel": (rng.normal(size=(4, 3)), True, 0.25),
        "transformer/layer_1/dense/bias": (rng.normal(size=(3,)), False, 0.5),
        "transformer/layer_1/layer_norm/gamma": (1 + 0.1 * rng.normal(size=(3,)), False, 0.5),
        "logits/kernel": (rng.normal(size=(3, 2)), True, 1.0),
    }
    variables = [tf.Variable(value.astype(np.float32), name=name) for name, (value, _, _) in cases.items()]
    grads = [[rng.normal(size=v.shape).astype(np.float32) for v in variables] for _ in range(4)]
    config = OptimizerConfig(learning_rate=0.1, warmup_steps=2, end_learning_rate=0.0, weight_decay=0.2,
                             layer_decay=layer_decay, beta_1=B1, beta_2=B2, epsilon=EPS)
    optimizer = optimization.make_optimizer(config, train_steps=5, loss_scale=False)
    optimizer.build(variables)
    learning_rates = []
    for step_grads in grads:
        learning_rates.append(optimization.current_learning_rate(optimizer))
        optimizer.apply_gradients(zip([tf.constant(g) for g in step_grads], variables),
                                  skip_gradients_aggregation=True)
    # Linear decay from 0.1 to 0 over 5 updates; the 2 warmup updates ramp towards its value at update 2.
    np.testing.assert_allclose(learning_rates, [0.0, 0.06 / 2, 0.1 * 3 / 5, 0.1 * 2 / 5], rtol=1e-6)
    for i, (name, (value, decayed, factor)) in enumerate(cases.items()):
        scale = factor if layer_decay else 1.0
        expected = adamw_reference(value, [g[i] for g in grads], learning_rates=[lr * scale for lr in learning_rates],
                                   weight_decay=0.2, decayed=decayed)
        np.testing.assert_allclose(variables[i].numpy(), expected, rtol=2e-5, atol=1e-6, err_msg=name)


def test_adamw_restores_a_stock_tf_keras_adamw_checkpoint(tmp_path):
    """Same slots and names as tf_keras.optimizers.AdamW: checkpoints written before the fused update resume,
    and the next update equals the stock optimizer's."""
    rng = np.random.default_rng(3)
    initial = rng.normal(size=(5, 4)).astype(np.float32)
    grads = [tf.constant(rng.normal(size=(5, 4)).astype(np.float32)) for _ in range(3)]

    def optimizer_and_variable(stock):
        variable = tf.Variable(initial, name="dense/kernel")
        options = dict(learning_rate=0.01, weight_decay=0.1, beta_1=B1, beta_2=B2, epsilon=EPS, jit_compile=False)
        optimizer = tf_keras.optimizers.AdamW(**options) if stock else optimization.FusedAdamW(**options)
        optimizer.build([variable])
        return optimizer, variable

    stock, stock_variable = optimizer_and_variable(stock=True)
    for g in grads[:2]:
        stock.apply_gradients([(g, stock_variable)])
    path = tf.train.Checkpoint(optimizer=stock, variable=stock_variable).write(str(tmp_path / "ckpt"))
    fused, fused_variable = optimizer_and_variable(stock=False)
    tf.train.Checkpoint(optimizer=fused, variable=fused_variable).read(path).assert_consumed()
    assert int(fused.iterations) == 2
    stock.apply_gradients([(grads[2], stock_variable)])
    fused.apply_gradients([(grads[2], fused_variable)])
    np.testing.assert_allclose(fused_variable.numpy(), stock_variable.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fused.variables[1].numpy(), stock.variables[1].numpy(), rtol=1e-5, atol=1e-7)


def test_adamw_applies_sparse_gradients_as_tf_keras_adamw_does():
    """An embedding-style IndexedSlices gradient, with a repeated row: the fused AdamW (which applies it dense)
    against tf_keras' own sparse path, over two updates."""
    rng = np.random.default_rng(4)
    initial = rng.normal(size=(6, 3)).astype(np.float32)
    slices = [tf.IndexedSlices(tf.constant(rng.normal(size=(3, 3)).astype(np.float32)), tf.constant(rows),
                               tf.constant([6, 3])) for rows in ([0, 2, 2], [5, 1, 0])]
    results = []
    for make_optimizer in (tf_keras.optimizers.AdamW, optimization.FusedAdamW):
        variable = tf.Variable(initial, name="embeddings")
        optimizer = make_optimizer(learning_rate=0.01, weight_decay=0.1, beta_1=B1, beta_2=B2, epsilon=EPS,
                                   jit_compile=False)
        for g in slices:
            optimizer.apply_gradients([(g, variable)])
        results.append(variable.numpy())
    assert not np.allclose(results[0], initial)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-7)


def test_fused_adamw_refuses_amsgrad():
    with pytest.raises(ValueError, match="no AMSGrad"):
        optimization.FusedAdamW(learning_rate=0.01, amsgrad=True)
