"""Engine correctness against independent computations: one big batch, one device, one process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from engine import checkpoints
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from engine.trainer import NonFiniteError, Trainer
from engine_helpers import ToyTask, one_update_weights, run_training

HERE = os.path.dirname(os.path.abspath(__file__))


def assert_same(reference, other, atol=1e-5):
    (ref_losses, ref_weights), (losses, weights) = reference, other
    np.testing.assert_allclose(losses, ref_losses, atol=atol)
    for a, b in zip(ref_weights, weights):
        np.testing.assert_allclose(b, a, atol=atol)


@pytest.fixture(scope="module")
def plain_run():
    return one_update_weights(ToyTask, global_batch_size=32, train_steps=2)


def test_accumulation_equals_one_big_batch(plain_run):
    accumulated = one_update_weights(ToyTask, global_batch_size=32, grad_accum_steps=4, train_steps=2)
    assert_same(plain_run, accumulated)


def test_mirrored_two_replicas_equals_one_device(plain_run):
    mirrored = one_update_weights(ToyTask, global_batch_size=32, strategy="mirrored", train_steps=2)
    assert_same(plain_run, mirrored)


def test_mirrored_accumulation_and_xla_equal_plain(plain_run):
    combined = one_update_weights(ToyTask, global_batch_size=32, strategy="mirrored", grad_accum_steps=2,
                                  train_steps=2, jit_compile=True)
    assert_same(plain_run, combined)


def test_update_matches_numpy_reference():
    """The first update of plain AdamW on the weighted mean loss, computed independently with tf.GradientTape."""
    task = ToyTask()
    trainer = run_training(lambda: task, global_batch_size=32, train_steps=1, learning_rate=1e-2)
    # Re-create the initial weights with the same seed and compute the update by hand.
    tf_keras.utils.set_random_seed(0)
    model = ToyTask().build_model()
    x, y, w = task.x[:32], task.y[:32], task.w[:32]
    with tf.GradientTape() as tape:
        logits = model(x)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        loss = tf.reduce_sum(per_example * w) / np.sum(w)
    grads = tape.gradient(loss, model.trainable_variables)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.01
    for var, g, trained in zip(model.trainable_variables, grads, trainer.model.trainable_variables):
        g = g.numpy()
        m, v = (1 - b1) * g, (1 - b2) * g * g
        # Keras' Adam step 1: lr * sqrt(1 - b2) / (1 - b1) * m / (sqrt(v) + eps); decoupled decay, none on biases.
        alpha = lr * np.sqrt(1 - b2) / (1 - b1)
        decay = 0.0 if "bias" in var.name else wd
        expected = var.numpy() * (1 - lr * decay) - alpha * m / (np.sqrt(v) + eps)
        np.testing.assert_allclose(trained.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(trainer.train_history[0]["loss"], float(loss), atol=1e-6)


def test_train_loop_traces_once(tmp_path):
    trainer = run_training(ToyTask, global_batch_size=16, train_steps=7, steps_per_loop=2, model_dir=str(tmp_path))
    assert [h["step"] for h in trainer.train_history] == [2, 4, 6, 7]
    assert trainer.train_loop_tracing_count == 1


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_resume_in_new_process_continues_exactly(tmp_path, strategy):
    def run(model_dir, steps, out):
        subprocess.run([sys.executable, os.path.join(HERE, "resume_worker.py"), str(model_dir), str(steps), strategy,
                        str(out)], check=True, capture_output=True, timeout=300)
        return np.load(out)

    straight = run(tmp_path / "straight", 6, tmp_path / "straight.npz")
    first = run(tmp_path / "resumed", 3, tmp_path / "first.npz")
    second = run(tmp_path / "resumed", 6, tmp_path / "second.npz")
    np.testing.assert_allclose(np.concatenate([first["losses"], second["losses"]]), straight["losses"], atol=1e-6)
    for key in straight.files:
        if key.startswith("arr_"):
            np.testing.assert_allclose(second[key], straight[key], atol=1e-6)


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_weight_average_matches_numpy_and_is_what_checkpoints_hold(tmp_path, strategy):
    """One update per Trainer, each resuming the last: the raw weights after every update give the average."""
    decay, steps = 0.9, 4
    raw = []
    for n in range(1, steps + 1):
        trainer = run_training(ToyTask, global_batch_size=16, train_steps=n, strategy=strategy, ema_decay=decay,
                               model_dir=str(tmp_path), learning_rate=0.1)
        if n == 1:
            # The initial weights: the same seed builds the same model.
            raw.append([np.array(w) for w in Trainer(ToyTask(), trainer.config).model.get_weights()])
        raw.append([np.array(w) for w in trainer.model.get_weights()])
    average = raw[0]
    for n in range(1, steps + 1):
        d = min(decay, (1 + n) / (10 + n))
        average = [d * a + (1 - d) * w for a, w in zip(average, raw[n])]
    with trainer.averaged_weights():
        in_memory = [np.array(w) for w in trainer.model.get_weights()]
    reader = tf.train.load_checkpoint(str(tmp_path))
    saved = [reader.get_tensor(f"model/layer_with_weights-{i // 2}/{'kernel' if i % 2 == 0 else 'bias'}"
                               "/.ATTRIBUTES/VARIABLE_VALUE") for i in range(len(average))]
    for expected, got_memory, got_saved, last_raw in zip(average, in_memory, saved, raw[-1]):
        np.testing.assert_allclose(got_memory, expected, atol=1e-6)
        np.testing.assert_allclose(got_saved, expected, atol=1e-6)
        assert np.abs(expected - last_raw).max() > 1e-3  # the average is not just the last weights
    # Training goes on from the raw weights; evaluation (here of a restored model) uses the averages.
    np.testing.assert_allclose(trainer.model.get_weights()[0], raw[-1][0], atol=1e-7)
    fresh = Trainer(ToyTask(), trainer.config, optimizer_config=OptimizerConfig(ema_decay=decay))
    fresh.restore()
    logits = fresh.model(ToyTask().x).numpy()
    np.testing.assert_allclose(fresh.evaluate()["host_accuracy"], np.mean(logits.argmax(-1) == ToyTask().y))
    np.testing.assert_allclose(fresh.model.get_weights()[0], average[0], atol=1e-6)


class NanGradientTask(ToyTask):
    """A finite loss whose gradient is NaN: d sqrt(|u|)/du at u = o - o = 0 is inf, times 0."""

    def per_example_loss(self, features, labels, outputs):
        zero = outputs[:, 0] - outputs[:, 0]
        return super().per_example_loss(features, labels, outputs) + tf.sqrt(tf.abs(zero))


def test_updates_with_a_finite_loss_and_nonfinite_gradients_are_skipped(tmp_path):
    trainer = run_training(NanGradientTask, global_batch_size=16, train_steps=2, steps_per_loop=1,
                           model_dir=str(tmp_path / "nan_gradient"))
    assert [h["skipped_updates"] for h in trainer.train_history] == [1, 1]
    initial = Trainer(NanGradientTask(), trainer.config).model.get_weights()  # the same seed, the same weights
    for got, want in zip(trainer.model.get_weights(), initial):
        np.testing.assert_array_equal(got, want)


def test_nonfinite_skip_policy_counts_and_keeps_weights(tmp_path):
    # Batches from step 3 on contain NaN inputs: those updates are skipped and counted.
    trainer = run_training(lambda: ToyTask(nan_from_step=2), global_batch_size=16, train_steps=4,
                           steps_per_loop=1, model_dir=str(tmp_path / "four"))
    assert [h["skipped_updates"] for h in trainer.train_history] == [0, 0, 1, 1]
    # The skipped updates left the weights exactly where the first two put them.
    two_steps = run_training(lambda: ToyTask(nan_from_step=2), global_batch_size=16, train_steps=2,
                             steps_per_loop=1, model_dir=str(tmp_path / "two"))
    for got, want in zip(trainer.model.get_weights(), two_steps.model.get_weights()):
        np.testing.assert_array_equal(got, want)


class HugeInputToyTask(ToyTask):
    """Inputs 1e3 times larger: gradients of ~1e3, which overflow float16 once multiplied by the initial loss
    scale (2**15); the LossScaleOptimizer must skip and halve the scale until they fit."""

    def __init__(self):
        super().__init__()
        self.x = self.x * 1e3


def test_fp16_loss_scale_overflow_is_skipped_and_lowers_the_scale_even_under_raise_policy(tmp_path):
    try:
        trainer = run_training(HugeInputToyTask, global_batch_size=16, train_steps=3, steps_per_loop=1,
                               precision="mixed_float16", nonfinite_policy="raise", model_dir=str(tmp_path))
        initial = [np.array(w) for w in Trainer(HugeInputToyTask(), trainer.config).model.get_weights()]
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    history = trainer.train_history
    assert [h["skipped_updates"] for h in history] == [1, 1, 1]
    assert [h["loss_scale_overflows"] for h in history] == [1, 1, 1]
    assert [h["loss_scale"] for h in history] == [2.0 ** 14, 2.0 ** 13, 2.0 ** 12]
    for got, want in zip(trainer.model.get_weights(), initial):  # nothing applied
        np.testing.assert_array_equal(got, want)


def test_fp16_nonfinite_loss_still_stops_under_raise_policy(tmp_path):
    try:
        with pytest.raises(NonFiniteError, match="at step 3"):
            run_training(lambda: ToyTask(nan_from_step=2), global_batch_size=16, train_steps=4, steps_per_loop=4,
                         precision="mixed_float16", nonfinite_policy="raise", model_dir=str(tmp_path))
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_nonfinite_raise_policy_names_step_and_keeps_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match="at step 3"):
        run_training(lambda: ToyTask(nan_from_step=2), global_batch_size=16, train_steps=4, steps_per_loop=4,
                     checkpoint_every_steps=1, nonfinite_policy="raise", model_dir=str(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def test_bad_batch_geometry_names_flags_and_keeps_model_dir(tmp_path):
    run_training(ToyTask, global_batch_size=16, train_steps=1, model_dir=str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"--global_batch_size=18.*--grad_accum_steps=4"):
        TrainerConfig(model_dir=str(tmp_path), train_steps=2, global_batch_size=18, grad_accum_steps=4)
    with pytest.raises(ValueError, match=r"--global_batch_size=12 must be divisible by replicas \(2\) x "
                                         r"--grad_accum_steps=4"):
        run_training(ToyTask, global_batch_size=12, grad_accum_steps=4, strategy="mirrored", train_steps=2,
                     model_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


def test_corrupt_checkpoint_is_a_clear_error_and_left_untouched(tmp_path):
    run_training(ToyTask, global_batch_size=16, train_steps=1, model_dir=str(tmp_path))
    data_file = [f for f in os.listdir(tmp_path) if ".data-" in f][0]
    with open(tmp_path / data_file, "r+b") as f:
        f.truncate(10)
    with pytest.raises(checkpoints.CheckpointError, match="ckpt-1"):
        run_training(ToyTask, global_batch_size=16, train_steps=2, model_dir=str(tmp_path))
    assert os.path.getsize(tmp_path / data_file) == 10


def test_padded_evaluation_is_exact_on_partial_last_batch(tmp_path):
    """96 examples, eval batch 64 on 2 replicas: the padded last batch must not change any metric."""
    task = ToyTask()
    config = TrainerConfig(model_dir=str(tmp_path), train_steps=1, global_batch_size=16, eval_batch_size=64)
    trainer = Trainer(task, config, runtime=RuntimeConfig(strategy="mirrored"))
    results = trainer.evaluate()
    logits = trainer.model(task.x).numpy()
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=task.y, logits=logits).numpy()
    assert results["num_examples"] == 96
    np.testing.assert_allclose(results["loss"], np.sum(per_example * task.w) / np.sum(task.w), rtol=1e-5)
    np.testing.assert_allclose(results["accuracy"], np.mean(logits.argmax(-1) == task.y), atol=1e-7)
    assert results["accuracy"] == pytest.approx(results["host_accuracy"])


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains(tmp_path, precision):
    try:
        # With a weight average too: under fp16 the LossScaleOptimizer's own skipping must leave it consistent.
        trainer = run_training(ToyTask, global_batch_size=16, train_steps=6, steps_per_loop=3, precision=precision,
                               model_dir=str(tmp_path), ema_decay=0.99)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    losses = [h["loss"] for h in trainer.train_history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    if precision == "mixed_float16":
        # No overflow on this small model: the dynamic scale stays at its initial 2**15 and nothing is skipped.
        assert [h["loss_scale"] for h in trainer.train_history] == [2.0 ** 15] * 2
        assert sum(h["skipped_updates"] for h in trainer.train_history) == 0
    with trainer.averaged_weights():
        averaged = [np.array(w) for w in trainer.model.get_weights()]
    assert all(np.isfinite(w).all() for w in averaged)
    assert any(np.abs(a - w).max() > 0 for a, w in zip(averaged, trainer.model.get_weights()))


def test_best_checkpoint_and_early_stopping(tmp_path):
    trainer = run_training(ToyTask, global_batch_size=16, train_steps=50, steps_per_loop=1, eval_every_steps=1,
                           eval_split="validation", best_metric="loss", best_metric_mode="min",
                           early_stopping_patience=2, learning_rate=1.0, model_dir=str(tmp_path))
    best = json.load(open(tmp_path / "best" / "best_metrics.json"))
    assert trainer.global_step.numpy() < 50  # lr 1.0 diverges, so patience ends the run
    assert tf.train.latest_checkpoint(str(tmp_path / "best")).endswith(f"ckpt-{best['step']}")


def test_tensorboard_events_have_train_and_eval_scalars(tmp_path):
    run_training(ToyTask, global_batch_size=16, train_steps=4, steps_per_loop=2, eval_every_steps=2,
                 eval_split="validation", precision="mixed_float16", model_dir=str(tmp_path))
    tf_keras.mixed_precision.set_global_policy("float32")

    def tags(phase):
        found = set()
        for name in os.listdir(tmp_path / phase):
            for event in tf.compat.v1.train.summary_iterator(str(tmp_path / phase / name)):
                found.update(value.tag for value in event.summary.value)
        return found

    assert {"loss", "learning_rate", "grad_norm", "loss_scale", "examples/sec", "steps/sec", "skipped_updates",
            "compile_seconds", "parameters", "config"} <= tags("train")
    assert {"loss", "accuracy", "host_accuracy"} <= tags("eval")


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    worker = subprocess.Popen([sys.executable, os.path.join(HERE, "resume_worker.py"), str(tmp_path), "100000",
                               "default", str(tmp_path / "out.npz")], stdout=subprocess.PIPE, text=True)
    for line in worker.stdout:
        if line.startswith("train | step: 3 "):
            break
    worker.terminate()  # SIGTERM, as a preemption or `kill` sends
    output = worker.stdout.read()
    assert worker.wait(timeout=120) == 0
    assert "SIGTERM: saved" in output
    step = int(tf.train.latest_checkpoint(str(tmp_path)).rsplit("-", 1)[1])
    assert 3 <= step < 100000


def test_bf16_on_cpu_without_native_support_warns_with_measured_cost(monkeypatch):
    from absl import logging as absl_logging
    from engine import precision
    messages = []
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(absl_logging, "warning", lambda fmt, *args: messages.append(fmt % args))
    assert precision.resolve_precision("auto") == "float32"
    assert precision.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert len(messages) == 1 and "GFLOP/s bf16" in messages[0] and "no native bf16" in messages[0]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto") == "mixed_bfloat16"


def test_input_pipelines_run_without_tf_data_autotuning(monkeypatch):
    """The Trainer's training and evaluation iterators come from datasets with tf.data's model-based autotuning off
    (inputs.without_autotune), and so do a MirroredStrategy's per-device datasets: its per-iterator thread made
    deleting an iterator wait for up to 60 s, which stalled the test suite for minutes when garbage collection
    freed old trainers (bench/RESULTS.md, 2026-12-05)."""
    from engine import inputs  # noqa: PLC0415
    made = []
    without_autotune = inputs.without_autotune
    monkeypatch.setattr(inputs, "without_autotune", lambda dataset: made.append(without_autotune(dataset)) or made[-1])
    for strategy in ("default", "mirrored"):
        made.clear()
        trainer = run_training(lambda: ToyTask(), global_batch_size=8, strategy=strategy, train_steps=2,
                               eval_split="validation")
        assert trainer.evaluate()["loss"] > 0
        assert len(made) == 2  # training, evaluation (one input pipeline on one host)
        assert not any(dataset.options().autotune.enabled for dataset in made)
        if strategy == "default":  # the iterator the Trainer runs is the one over that dataset
            assert trainer._train_iterator._dataset is made[0]
        else:  # and the datasets TensorFlow's MultiDeviceIterator builds for each device (its own, not the Task's)
            (worker,) = trainer._train_iterator._iterators
            per_device = [iterator._dataset for iterator in worker._iterator._device_iterators]
            # (unset, None, is TensorFlow's default: on)
            assert len(per_device) == 2 and all(dataset.options().autotune.enabled is False for dataset in per_device)


def test_later_evaluations_read_the_batches_the_first_one_cached(tmp_path):
    """The evaluation pipeline runs once per split: later evaluations read its batches from memory (making a new
    iterator instantiated its map functions again, ~3 % of an evaluation; inputs.distribute_eval_inputs), with
    the same results, and a pass left unfinished after that reads nothing either."""
    reads = []

    class CountingTask(ToyTask):
        def build_inputs(self, split, *, batch_size, input_context=None):
            dataset = super().build_inputs(split, batch_size=batch_size, input_context=input_context)
            if split == "train":
                return dataset
            # Each batch the pipeline produces passes through Python once.
            count = lambda x: reads.append(1) or x
            counted = lambda x: tf.ensure_shape(tf.py_function(count, [x], tf.float32), x.shape)
            return dataset.map(lambda f, l: ({**f, "x": counted(f["x"])}, l))

    trainer = Trainer(CountingTask(), TrainerConfig(model_dir=str(tmp_path), train_steps=1, global_batch_size=16,
                                                   eval_batch_size=32))
    first = trainer.evaluate()
    assert len(reads) == 3  # 96 examples in batches of 32
    assert trainer.evaluate() == first and trainer.evaluate() == first
    assert len(reads) == 3
    unfinished = iter(next(iter(trainer._eval_inputs.values())))
    next(unfinished)
    del unfinished
    assert len(reads) == 3  # the cache is complete: the pipeline is not read again


def test_one_device_strategy_equals_default(plain_run):
    assert_same(plain_run, one_update_weights(ToyTask, global_batch_size=32, strategy="one_device", train_steps=2))


class _SignGate(tf_keras.layers.Layer):
    """Python control flow on a tensor: traceable only with AutoGraph (which turns the `if` into a tf.cond)."""

    def call(self, inputs):
        if tf.reduce_sum(inputs) > 0:
            return inputs
        return -inputs


class _AutoGraphToyTask(ToyTask):
    autograph = True

    def build_model(self):
        inputs = tf_keras.Input([self.x.shape[1]], name="x")
        logits = tf_keras.layers.Dense(self.classes, dtype="float32")(_SignGate()(inputs))
        return tf_keras.Model(inputs, logits)


@pytest.mark.parametrize("autograph", [True, False])
def test_task_autograph_decides_whether_its_step_and_evaluation_are_converted(autograph):
    """A custom Task (Task.autograph defaults to True) may write Python `if`s on tensors: its training step,
    accumulation and evaluation are traced with AutoGraph. The built-in Tasks set it False to skip the conversion;
    then the same model cannot be traced, which shows the flag is what the engine follows."""
    from tasks.classification.task import ClassificationTask  # noqa: PLC0415
    from tasks.ner.task import TaggingTask  # noqa: PLC0415
    from tasks.squad.task import SquadTask  # noqa: PLC0415
    assert not any(task.autograph for task in (ClassificationTask, TaggingTask, SquadTask))

    task = type("Task", (_AutoGraphToyTask,), {"autograph": autograph})
    if not autograph:
        with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
            run_training(task, global_batch_size=16, train_steps=2, grad_accum_steps=2)
        return
    trainer = run_training(task, global_batch_size=16, train_steps=2, grad_accum_steps=2, eval_split="validation")
    assert np.isfinite(trainer.train_history[-1]["loss"])
    assert np.isfinite(trainer.evaluate("validation")["loss"])
