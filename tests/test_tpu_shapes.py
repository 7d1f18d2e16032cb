"""TPU readiness without a TPU: the strategy branch up to the resolver (mocked), the static-shape check, and
XLA compiling the step once per bucket width of length-grouped batches, never more."""
import json
import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from conftest import DATA_DIR, write_sst2_head
from engine import inputs, strategy as strategy_lib
from engine.config import RuntimeConfig
from engine_helpers import ToyTask, run_training
from tasks.encoders import bert
from tasks.classification.task import ClassificationConfig, ClassificationTask
from tasks.ner.task import TaggingConfig, TaggingTask

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("tpu, expected", [("local", "local"), ("", None), ("grpc://10.0.0.2:8470", "grpc://10.0.0.2:8470")])
def test_tpu_strategy_connects_initialises_and_builds_in_order(tpu, expected):
    calls = []
    with mock.patch.object(tf.distribute.cluster_resolver, "TPUClusterResolver") as resolver_cls, \
            mock.patch.object(tf.config, "experimental_connect_to_cluster") as connect, \
            mock.patch.object(tf.tpu.experimental, "initialize_tpu_system") as initialize, \
            mock.patch.object(tf.distribute, "TPUStrategy") as strategy_cls:
        for name, m in (("connect", connect), ("initialize", initialize), ("strategy", strategy_cls)):
            m.side_effect = lambda *a, _name=name, **k: calls.append(_name)
        strategy_lib.make_strategy(RuntimeConfig(strategy="tpu", tpu=tpu))
    resolver_cls.assert_called_once_with(tpu=expected)
    resolver = resolver_cls.return_value
    connect.assert_called_once_with(resolver)
    initialize.assert_called_once_with(resolver)
    strategy_cls.assert_called_once_with(resolver)
    assert calls == ["connect", "initialize", "strategy"]  # the system is initialised before the strategy


def test_is_tpu_only_for_tpu_strategies():
    assert not strategy_lib.is_tpu(tf.distribute.get_strategy())
    assert not strategy_lib.is_tpu(strategy_lib.make_strategy(RuntimeConfig(strategy="mirrored")))


# ------------------------------------------------------------------------------------ static shapes

def spec(*shape, dtype=tf.int32):
    return tf.TensorSpec(shape, dtype)


def test_static_shape_check_allows_only_the_bucketed_sequence_axis():
    inputs.check_static_shapes(({"input_word_ids": spec(16, None), "input_mask": spec(16, None)}, spec(16)),
                               task_name="sst2")
    with pytest.raises(ValueError, match=r"task 'sst2': on TPU every training batch needs a static shape .*"
                                         r"batch\[0\]\['input_mask'\] has shape \(None, 64\) with unknown the batch "
                                         r"dimension \(batch with drop_remainder=True\)"):
        inputs.check_static_shapes(({"input_mask": spec(None, 64)}, spec(16)), task_name="sst2")
    with pytest.raises(ValueError, match=r"batch\[1\] has shape \(16, 8, None\) with unknown dimension 2"):
        inputs.check_static_shapes(({"x": spec(16, 64)}, spec(16, 8, None)), task_name="squad")
    with pytest.raises(ValueError, match="unknown rank"):
        inputs.check_static_shapes(({"x": tf.TensorSpec(None, tf.int32)}, spec(16)), task_name="t")


def test_bucket_widths():
    assert inputs.bucket_widths(64) == (16, 32, 48, 64)
    assert inputs.bucket_widths(100) == (16, 32, 48, 64, 80, 96, 100)


@pytest.fixture(scope="module")
def sst2_train(tmp_path_factory):
    """The first 192 training rows of SST-2: short sentences, several widths when grouped by length."""
    return write_sst2_head(tmp_path_factory.mktemp("sst2"), 192)


def test_length_grouped_classification_batches_pass_the_check(sst2_train):
    config = ClassificationConfig(data_files={"train": sst2_train}, encoder=bert.BertConfig.tiny(),
                                  vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"), max_seq_length=64)
    dataset = ClassificationTask(config).build_inputs("train", batch_size=8)
    features, labels = dataset.element_spec
    assert features["input_word_ids"].shape.as_list() == [8, None] and labels.shape.as_list() == [8]
    inputs.check_static_shapes(dataset.element_spec, task_name="sst2")
    assert {int(f["input_mask"].shape[1]) for f, _ in dataset.take(24)} <= set(inputs.bucket_widths(64))


def test_evaluation_batches_keep_the_static_shape_on_tpu_only(sst2_train):
    """Off TPU, evaluation batches are cut to their longest sentence (bucket widths); a model built under a TPU
    strategy keeps every evaluation, predict and serving batch at max_seq_length."""
    config = ClassificationConfig(data_files={"validation": sst2_train}, encoder=bert.BertConfig.tiny(),
                                  vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"), max_seq_length=64)
    task = ClassificationTask(config)
    task.build_model()
    widths = {int(f["input_mask"].shape[1]) for f, _ in task.build_inputs("validation", batch_size=8)}
    assert task.cuts_batches and widths <= set(inputs.bucket_widths(64)) and min(widths) < 64
    with mock.patch.object(strategy_lib, "is_tpu", return_value=True):
        task.build_model()
    assert not task.cuts_batches and task.predict_pad_to_multiple is None
    dataset = task.build_inputs("validation", batch_size=8)
    assert dataset.element_spec[0]["input_mask"].shape.as_list() == [None, 64]
    assert {int(f["input_mask"].shape[1]) for f, _ in dataset} == {64}


def test_tagging_evaluation_batches_keep_the_static_shape_on_tpu_only():
    """The same for NER: off TPU both the sub-token and the word axis are cut; on TPU neither is."""
    config = TaggingConfig(encoder=bert.BertConfig.tiny(), vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"),
                           data_dir=DATA_DIR, max_seq_length=64, max_eval_sentences=24)
    task = TaggingTask(config)
    task.build_model()
    shapes = {(int(f["input_mask"].shape[1]), int(f["word_mask"].shape[1]))
              for f, _ in task.build_inputs("validation", batch_size=8)}
    # Task.eval_width_multiple is 16 until a Trainer's non-XLA eval step sets 1: bucket widths, and the word axis
    # follows the sub-token one (an XLA-compiled step compiles once per width, not per pair).
    assert task.cuts_batches and len(shapes) > 1 and shapes <= {(p, p - 2) for p in inputs.bucket_widths(64)}
    with mock.patch.object(strategy_lib, "is_tpu", return_value=True):
        task.build_model()
    assert not task.cuts_batches
    dataset = task.build_inputs("validation", batch_size=8)
    assert dataset.element_spec[0]["input_mask"].shape.as_list() == [None, 64]
    assert {(int(f["input_mask"].shape[1]), int(f["word_mask"].shape[1])) for f, _ in dataset} == {(64, 62)}


class RaggedBatchToyTask(ToyTask):
    """ToyTask whose training batches keep a partial last batch: an unknown batch dimension."""

    def build_inputs(self, split, *, batch_size, input_context=None):
        dataset = tf.data.Dataset.from_tensor_slices(({"x": self.x, "w": self.w}, self.y))
        return dataset.repeat().batch(batch_size) if split == "train" else dataset.batch(batch_size)


def test_trainer_on_tpu_refuses_an_unknown_batch_dimension(tmp_path):
    with mock.patch.object(strategy_lib, "is_tpu", return_value=True):
        with pytest.raises(ValueError, match=r"task 'toy': on TPU .* unknown the batch dimension"):
            run_training(RaggedBatchToyTask, global_batch_size=16, model_dir=str(tmp_path))
        # The same task with static batches trains (the strategy is still the default one underneath).
        trainer = run_training(ToyTask, global_batch_size=16, train_steps=2, model_dir=str(tmp_path / "ok"))
    assert trainer.train_history[-1]["step"] == 2
    # Off TPU the ragged batches are accepted as before.
    run_training(RaggedBatchToyTask, global_batch_size=16, model_dir=str(tmp_path / "cpu"))


# ------------------------------------------------------------------------------------ one compile per width

def test_jit_compiles_the_step_once_per_bucket_width(sst2_train, tmp_path):
    """The step is traced once (widths are a None dimension in the graph); XLA then compiles it once per
    concrete width, counted from XLA's own dump of every compiled module, and never again over 16 updates
    (a one-layer encoder at seq 32: two widths; each XLA compile of it takes seconds on CPU)."""
    dump = tmp_path / "xla_dump"
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_module_re=.*accumulate_gradients.*")
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "bucket_compile_worker.py"), sst2_train, str(tmp_path / "run"), "16", "32"],
        check=True, capture_output=True, text=True, timeout=600, env=env)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    widths = report["widths"]
    assert set(widths) == set(inputs.bucket_widths(32))  # both widths, 16 and 32, several times each
    assert report["accumulate_traces"] == 1 and report["loop_traces"] == 1
    compiled = []
    for name in sorted(os.listdir(dump)):
        if name.endswith(".before_optimizations.txt"):
            text = (dump / name).read_text()
            # The micro-batch parameters are [K=1, batch 16, width]; one module per compilation.
            compiled.append(sorted({int(w) for w in re.findall(r"s32\[1,16,(\d+)\]", text)}))
    assert sorted(c[0] for c in compiled) == sorted(set(widths)), (compiled, np.unique(widths))
    assert all(len(c) == 1 for c in compiled)
