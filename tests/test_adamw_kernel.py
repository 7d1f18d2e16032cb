"""The one-pass AdamW kernel (engine/adamw_kernel): built here, equal bit for bit to TensorFlow's own kernels,
used by the training step with the clip folded in, checked against NumPy, and a clean fallback when unbuildable."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from engine import adamw_kernel, optimization
from engine.step import TrainStep, clip_scale
from engine_helpers import ToyTask, graph_op_types

B1, B2, EPS = 0.9, 0.999, 1e-6


def test_the_kernel_is_built_in_this_environment():
    # `make setup` builds it; if this fails, so does every speed figure in bench/RESULTS.md.
    assert adamw_kernel.load() is not None, "engine/adamw_kernel.cc did not build: run python -m engine.adamw_kernel"


def adamw_updates(*, use_kernel: bool, monkeypatch, gradient_scale, steps=3):
    """Three FusedAdamW updates of a decayed matrix, an excluded bias and a layer-scaled kernel."""
    if not use_kernel:
        monkeypatch.setattr(adamw_kernel, "load", lambda: None)
    rng = np.random.default_rng(5)
    variables = [tf.Variable(rng.normal(size=(257, 33)).astype(np.float32), name="encoder/layer_0/dense/kernel"),
                 tf.Variable(rng.normal(size=(33,)).astype(np.float32), name="encoder/layer_1/dense/bias"),
                 tf.Variable(rng.normal(size=(33, 5)).astype(np.float32), name="head/kernel")]
    grads = [[tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in variables] for _ in range(steps)]
    optimizer = optimization.FusedAdamW(learning_rate=0.01, weight_decay=0.1, beta_1=B1, beta_2=B2, epsilon=EPS,
                                        jit_compile=False)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.set_layer_decay(0.5, layer_pattern=r"layer_(\d+)/", embedding_pattern="embeddings")
    optimizer.build(variables)
    scale = None if gradient_scale is None else tf.constant(gradient_scale)

    @tf.function
    def update(g):
        extra = {} if scale is None else {"gradient_scale": scale}
        optimizer.apply_gradients(zip(g, variables), **extra)

    for g in grads:
        update(g)
    monkeypatch.undo()
    return [v.numpy() for v in variables + optimizer.variables[1:]], graph_op_types(update, grads[0])


@pytest.mark.parametrize("gradient_scale", [None, 0.37])
def test_the_kernel_equals_tensorflow_kernels_bit_for_bit(monkeypatch, gradient_scale):
    """TensorFlow's kernels are the independent computation here (and are checked against NumPy in
    test_large_batch): same variables, same m and v, every bit, with and without a clip factor."""
    fused, fused_ops = adamw_updates(use_kernel=True, monkeypatch=monkeypatch, gradient_scale=gradient_scale)
    stock, stock_ops = adamw_updates(use_kernel=False, monkeypatch=monkeypatch, gradient_scale=gradient_scale)
    assert "EngineFusedAdamW" in fused_ops and "ResourceApplyAdam" not in fused_ops
    assert "ResourceApplyAdam" in stock_ops and "EngineFusedAdamW" not in stock_ops
    assert len(fused) == 9  # 3 variables, then 3 m and 3 v
    for a, b in zip(fused, stock):
        assert not np.allclose(a, 0.0)
        np.testing.assert_array_equal(a, b)


def embedding_updates(*, use_kernel: bool, monkeypatch, index_dtype, steps=3):
    """Three FusedAdamW updates of a decayed [50, 7] table from IndexedSlices gradients with repeated indices."""
    if not use_kernel:
        monkeypatch.setattr(adamw_kernel, "load", lambda: None)
    rng = np.random.default_rng(7)
    table = tf.Variable(rng.normal(size=(50, 7)).astype(np.float32), name="word_embeddings/embeddings")
    indices = [[3, 17, 3, 0, 49, 17], [5, 5, 5, 20, 21, 0], [49, 8, 9, 10, 8, 1]][:steps]
    grads = [tf.IndexedSlices(tf.constant(rng.normal(size=(6, 7)).astype(np.float32)), tf.constant(i, index_dtype),
                              tf.constant([50, 7], index_dtype)) for i in indices]
    optimizer = optimization.FusedAdamW(learning_rate=0.01, weight_decay=0.1, beta_1=B1, beta_2=B2, epsilon=EPS,
                                        jit_compile=False)
    optimizer.build([table])
    scale = tf.constant(0.37)

    @tf.function
    def update(g):
        optimizer.apply_gradients([(g, table)], gradient_scale=scale)

    for g in grads:
        update(g)
    monkeypatch.undo()
    return [table.numpy()] + [s.numpy() for s in optimizer.variables[1:]], graph_op_types(update, grads[0])


@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64])
def test_the_rows_kernel_equals_tensorflow_kernels_on_the_densified_gradient(monkeypatch, index_dtype):
    """An embedding's gradient as rows (tf.IndexedSlices, indices repeated as a batch repeats tokens): every row
    of the table, m and v equals TensorFlow's kernels applied to the densified gradient, untouched rows (which
    still decay) included, bit for bit."""
    rows, rows_ops = embedding_updates(use_kernel=True, monkeypatch=monkeypatch, index_dtype=index_dtype)
    dense, dense_ops = embedding_updates(use_kernel=False, monkeypatch=monkeypatch, index_dtype=index_dtype)
    assert "EngineFusedAdamWRows" in rows_ops and "ResourceApplyAdam" not in rows_ops
    assert "ResourceApplyAdam" in dense_ops
    for a, b in zip(rows, dense):
        np.testing.assert_array_equal(a, b)
    table, m, v = rows
    # Rows 3 and 17 had a gradient in the first update only: their m and v decayed since, as dense AdamW's do.
    assert np.all(m[[3, 17]] != 0.0) and np.all(v[[3, 17]] != 0.0)
    assert np.all(m[[2, 30]] == 0.0)  # never a gradient


def test_the_rows_kernel_rejects_repeated_and_out_of_range_indices():
    module = adamw_kernel.load()
    variable, m, v = (tf.Variable(tf.zeros([4, 3])) for _ in range(3))
    one = tf.constant(1.0)
    scalars = dict(grad_scale=one, lr=one, beta1_power=one * 0.9, beta2_power=one * 0.999, beta1=one * 0.9,
                   beta2=one * 0.999, epsilon=one * 1e-6, decay=one * 0.0)
    for indices, message in (([1, 1], "index repeated: 1"), ([0, 4], "index out of range: 4")):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            adamw_kernel.apply_rows(module, variable=variable, m=m, v=v, rows=tf.ones([2, 3]),
                                    indices=tf.constant(indices), **scalars)
    with pytest.raises(tf.errors.InvalidArgumentError, match="do not match"):
        adamw_kernel.apply_rows(module, variable=variable, m=m, v=v, rows=tf.ones([2, 4]),
                                indices=tf.constant([0, 1]), **scalars)


class EmbeddingToyTask(ToyTask):
    """ToyTask's data as 4 token ids per example (a vocabulary of 40, tokens repeated) into an embedding."""

    def __init__(self):
        super().__init__()
        self.ids = np.random.default_rng(3).integers(0, 40, size=(len(self.y), 4)).astype(np.int32)

    def build_model(self):
        ids = tf_keras.Input(shape=(4,), dtype=tf.int32, name="x")
        hidden = tf_keras.layers.GlobalAveragePooling1D()(tf_keras.layers.Embedding(40, 8)(ids))
        logits = tf_keras.layers.Dense(self.classes, dtype="float32")(tf_keras.layers.Dense(16, "tanh")(hidden))
        return tf_keras.Model(ids, logits)


def test_training_step_updates_the_embedding_from_rows_against_numpy():
    """TrainStep keeps the embedding's gradient as rows into FusedAdamW's rows kernel (no dense [vocab, width]
    gradient), with the clip active; the update against float64 NumPy from TensorFlow's dense gradients."""
    task = EmbeddingToyTask()
    features = {"x": tf.constant(task.ids[:16]), "w": tf.constant(task.w[:16])}
    y = tf.constant(task.y[:16])
    tf_keras.utils.set_random_seed(0)
    model = task.build_model()
    initial = [w.copy() for w in model.get_weights()]
    optimizer = optimization.FusedAdamW(learning_rate=0.01, weight_decay=0.1, beta_1=B1, beta_2=B2, epsilon=EPS,
                                        jit_compile=False)
    optimizer.build(model.trainable_variables)
    step = TrainStep(task=task, model=model, optimizer=optimizer, grad_accum_steps=1, clip_norm=0.05,
                     jit_compile=False)
    run = tf.function(step)
    _, grad_norm, applied, _ = run(features, y)
    assert bool(applied)
    assert {"EngineFusedAdamWRows", "EngineFusedAdamW"} <= graph_op_types(run, features, y)
    updated = model.get_weights()

    model.set_weights(initial)
    with tf.GradientTape() as tape:
        per_example = task.per_example_loss(features, y, model(features["x"]))
        loss = tf.reduce_sum(per_example * features["w"]) / tf.reduce_sum(features["w"])
    grads = [tf.convert_to_tensor(g).numpy().astype(np.float64)
             for g in tape.gradient(loss, model.trainable_variables)]
    norm = np.sqrt(sum(np.sum(g * g) for g in grads))
    np.testing.assert_allclose(float(grad_norm), norm, rtol=1e-5)
    assert norm > 0.05, "the clip must be active for this test to mean anything"
    assert np.count_nonzero(np.abs(grads[0]).sum(axis=1)) < 40, "some rows must have no gradient"
    lr, wd, alpha = 0.01, 0.1, 0.01 * np.sqrt(1 - B2) / (1 - B1)
    for variable, g, w0, w1 in zip(model.trainable_variables, grads, initial, updated):
        g = g * 0.05 / norm
        w = w0.astype(np.float64) - lr * wd * w0  # no exclusions: every variable decays, untouched rows too
        m, v = (1 - B1) * g, (1 - B2) * g * g
        np.testing.assert_allclose(w1, w - alpha * m / (np.sqrt(v) + EPS), rtol=1e-5, atol=1e-7, err_msg=variable.name)


def test_clipped_training_step_against_numpy():
    """One TrainStep update with the clip active (folded into the kernel) against clip + AdamW in float64 NumPy;
    and the engine's explicit clip (the path without the kernel) gives the same bits."""
    task = ToyTask()
    x, y = tf.constant(task.x[:16]), tf.constant(task.y[:16])
    features = {"x": x, "w": tf.constant(task.w[:16])}

    def one_update(fold):
        tf_keras.utils.set_random_seed(0)
        model = task.build_model()
        initial = [w.copy() for w in model.get_weights()]
        optimizer = optimization.FusedAdamW(learning_rate=0.01, weight_decay=0.1, beta_1=B1, beta_2=B2, epsilon=EPS,
                                            jit_compile=False)
        optimizer.exclude_from_weight_decay(var_names=["bias"])
        optimizer.build(model.trainable_variables)
        step = TrainStep(task=task, model=model, optimizer=optimizer, grad_accum_steps=1, clip_norm=0.05,
                         jit_compile=False)
        step._fold_clip = fold
        run = tf.function(step)
        _, grad_norm, applied, _ = run(features, y)
        assert bool(applied)
        ops = graph_op_types(run, features, y)
        return initial, float(grad_norm), [w.copy() for w in model.get_weights()], model, ops

    initial, grad_norm, folded, model, ops = one_update(fold=True)
    assert "EngineFusedAdamW" in ops
    _, _, explicit, _, _ = one_update(fold=False)
    for a, b in zip(folded, explicit):
        np.testing.assert_array_equal(a, b)

    # The reference: the gradients at the initial weights (taken here by TensorFlow), then everything else in NumPy.
    model.set_weights(initial)
    with tf.GradientTape() as tape:
        per_example = task.per_example_loss(features, y, model(features["x"]))
        loss = tf.reduce_sum(per_example * features["w"]) / tf.reduce_sum(features["w"])
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]
    norm = np.sqrt(sum(np.sum(g * g) for g in grads))
    np.testing.assert_allclose(grad_norm, norm, rtol=1e-5)
    assert norm > 0.05, "the clip must be active for this test to mean anything"
    lr, wd, alpha = 0.01, 0.1, 0.01 * np.sqrt(1 - B2) / (1 - B1)
    for variable, g, w0, w1 in zip(model.trainable_variables, grads, initial, folded):
        g = g * 0.05 / norm
        w = w0.astype(np.float64)
        if "bias" not in variable.name:
            w = w - lr * wd * w
        m, v = (1 - B1) * g, (1 - B2) * g * g
        np.testing.assert_allclose(w1, w - alpha * m / (np.sqrt(v) + EPS), rtol=1e-5, atol=1e-7, err_msg=variable.name)


def test_clip_scale_is_clip_by_global_norms_factor():
    grads = [tf.constant([[3.0, 4.0]]), tf.constant([12.0])]
    norm = tf.linalg.global_norm(grads)
    for clip in (1.0, 5.0, 13.0, 100.0, 0.3):
        clipped, _ = tf.clip_by_global_norm(grads, clip, use_norm=norm)
        for g, c in zip(grads, clipped):
            np.testing.assert_array_equal((g * clip_scale(norm, clip)).numpy(), c.numpy())
    assert np.isnan(clip_scale(tf.constant(np.inf), 1.0).numpy())


def test_the_kernel_rejects_mismatched_shapes():
    module = adamw_kernel.load()
    variable, m, v = (tf.Variable(tf.zeros([4, 3])) for _ in range(3))
    one = tf.constant(1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="differ in shape"):
        adamw_kernel.apply(module, variable=variable, m=m, v=v, grad=tf.zeros([3, 4]), grad_scale=one, lr=one,
                           beta1_power=one * 0.9, beta2_power=one * 0.999, beta1=one * 0.9, beta2=one * 0.999,
                           epsilon=one * 1e-6, decay=one * 0.0)


def test_without_a_compiler_training_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(adamw_kernel.LIBRARY, "library_path", lambda: str(tmp_path / "adamw_kernel-test.so"))
    monkeypatch.setattr(adamw_kernel.LIBRARY, "_loaded", {})
    with pytest.raises(adamw_kernel.BuildError, match="no-such-compiler"):
        adamw_kernel.LIBRARY.build()
    assert not list(tmp_path.iterdir())  # no half-written library left behind
    assert adamw_kernel.load() is None and adamw_kernel.load() is None
    warnings = [r.getMessage() for r in caplog.records if "Fused AdamW kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "same results, slower" in warnings[0]


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(adamw_kernel.ENV_SWITCH, "0")
    assert adamw_kernel.load() is None
    monkeypatch.setenv(adamw_kernel.ENV_SWITCH, "1")
    assert adamw_kernel.load() is not None


@pytest.mark.parametrize("use_kernel", [True, False])
def test_epsilon_after_bias_correction_is_pytorchs_adamw_against_numpy(monkeypatch, use_kernel):
    """--epsilon_after_bias_correction against PyTorch's documented AdamW (torch.optim.AdamW's algorithm) in
    float64 NumPy: w -= lr wd w; m, v as Adam's; w -= lr m^ / (sqrt(v^) + eps), m^ = m / (1 - b1^t),
    v^ = v / (1 - b2^t). Gradients span 1e-7..1e-2, so eps matters; the default (tf_keras') placement misses."""
    from engine.config import OptimizerConfig  # noqa: PLC0415
    if not use_kernel:
        monkeypatch.setattr(adamw_kernel, "load", lambda: None)
    rng = np.random.default_rng(11)
    w0 = rng.normal(size=(64, 48)).astype(np.float32)
    grads = [(rng.normal(size=w0.shape) * 10.0 ** rng.uniform(-7, -2, size=w0.shape)).astype(np.float32)
             for _ in range(4)]
    lr, wd = 0.01, 0.1

    def run(after: bool) -> np.ndarray:
        config = OptimizerConfig(learning_rate=lr, warmup_steps=0, decay_steps=10 ** 12, weight_decay=wd,
                                 epsilon_after_bias_correction=after)
        optimizer = optimization.make_optimizer(config, train_steps=10, loss_scale=False)
        variable = tf.Variable(w0, name="encoder/dense/kernel")
        optimizer.build([variable])
        update = tf.function(lambda g: optimizer.apply_gradients([(g, variable)]))
        for g in grads:
            update(tf.constant(g))
        ops = graph_op_types(update, tf.constant(grads[0]))
        assert ("EngineFusedAdamW" in ops) == use_kernel
        return variable.numpy()

    w, m, v = w0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        w = w - lr * wd * w
        m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
        w = w - lr * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
    np.testing.assert_allclose(run(True), w, rtol=1e-5, atol=1e-6)
    assert np.abs(run(False) - w).max() > 1e-3, "the default must differ, or this test checks nothing"
