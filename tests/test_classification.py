"""Classification Task: TSV reading and its errors, losses vs NumPy, metrics vs recomputation, launch end to end."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from conftest import DATA_DIR, REPO_ROOT, write_tiny_encoder_dir
from engine import inputs, strategy as strategy_lib
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from engine.trainer import Trainer
from engine_helpers import one_update_weights, reads_alias, run_training
from tasks.encoders import bert
from tasks.classification.task import ClassificationConfig, ClassificationTask, read_tsv

SST2 = os.path.join(DATA_DIR, "sst2")
VOCAB = os.path.join(bert.minilm_dir(), "vocab.txt")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sst2_slices(tmp_path_factory):
    """The first 256 training and 100 dev rows of the real SST-2 files."""
    folder = tmp_path_factory.mktemp("sst2")
    for name, rows in (("train", 256), ("dev", 100)):
        with open(os.path.join(SST2, f"{name}.tsv"), encoding="utf-8") as f:
            lines = [next(f) for _ in range(rows + 1)]
        write(folder / f"{name}.tsv", "".join(lines))
    return {"train": str(folder / "train.tsv"), "validation": str(folder / "dev.tsv")}


# No dropout anywhere, so runs under different batch geometries are comparable update for update.
TINY = dataclasses.replace(bert.BertConfig.tiny(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_config(files, **kwargs):
    return ClassificationConfig(data_files=files, encoder=TINY, vocab_file=VOCAB,
                                max_seq_length=32, dropout=0.0, **kwargs)


# ------------------------------------------------------------------------------------ reading

def test_reads_real_sst2_dev():
    examples = read_tsv(os.path.join(SST2, "dev.tsv"), tiny_config({}))
    assert len(examples.labels) == 872 and int(examples.labels.sum()) == 444  # PROVENANCE: 444 positive
    assert examples.texts[0][0].startswith("it 's a charming and often affecting journey")


@pytest.mark.parametrize("content, config_kwargs, message", [
    ("sentence\tscore\nfine\t1\n", {}, r":1: missing column\(s\) \['label'\]"),
    ("sentence\tlabel\ngood\t1\nbad\tnegative\n", {}, r":3: label 'negative' is not an integer"),
    ("sentence\tlabel\ngood\tpos\nbad\tmeh\n", {"label_names": ("neg", "pos")}, r":3: unknown label 'meh'"),
    ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", {}, r":3: 3 fields, the header has 2"),
    ("sentence\tlabel\ngood\t7\n", {}, r":2: label 7 is outside 0..1"),
    ("", {}, r":1: empty file"),
    ("sentence\tlabel\n", {}, r"no examples after the header"),
])
def test_bad_tsv_names_file_and_line(tmp_path, content, config_kwargs, message):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(ValueError, match=message) as error:
        read_tsv(path, tiny_config({}, **config_kwargs))
    assert path in str(error.value)


def test_sentence_pairs_and_string_labels(tmp_path):
    path = write(tmp_path / "pairs.tsv", "premise\thypothesis\tlabel\na man\ta person\tyes\nit rains\tsunny\tno\n")
    config = tiny_config({"validation": path}, text_columns=("premise", "hypothesis"), label_names=("no", "yes"))
    examples = read_tsv(path, config)
    assert examples.texts == (("a man", "it rains"), ("a person", "sunny"))
    assert examples.labels.tolist() == [1, 0]
    task = ClassificationTask(config)
    dataset = task.build_inputs("validation", batch_size=2)
    assert not dataset.options().autotune.enabled  # engine/inputs.prefetched: no autotuning thread to wait for
    features, labels = next(iter(dataset))
    ids = features["input_word_ids"].numpy()[labels.numpy().tolist().index(1)]
    tokens = [task.tokenizer.vocab[i] for i in ids if i]
    assert tokens == ["[CLS]", "a", "man", "[SEP]", "a", "person", "[SEP]"]


def test_integer_labels_with_label_names(tmp_path):
    """GLUE files have 0/1 labels: given names, a file may use the names or the class ids, unless a name is itself
    an integer (then "1" would be ambiguous and only names are accepted)."""
    path = write(tmp_path / "ids.tsv", "sentence\tlabel\ngood\t1\nbad\tneg\nmeh\t0\n")
    assert read_tsv(path, tiny_config({}, label_names=("neg", "pos"))).labels.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match=r":2: unknown label '1'; expected one of \['2', '3'\]"):
        read_tsv(path, tiny_config({}, label_names=("2", "3")))


def test_lower_case_reaches_the_tokenizer_through_the_registry(tmp_path):
    """A cased encoder's vocab: --lower_case=false must reach the classification tokenizer, whose packed ids are
    then those of HF's cased BertWordPieceTokenizer ([CLS] a [SEP])."""
    from tokenizers import BertWordPieceTokenizer  # noqa: PLC0415
    from tasks import registry  # noqa: PLC0415
    from test_tokenization import CASED, write_cased_vocab  # noqa: PLC0415
    vocab = write_cased_vocab(tmp_path / "vocab.txt")
    for lower_case in (False, True):
        task, _ = registry.build_task("classification", {"vocab_file": vocab, "lower_case": lower_case,
                                                         "max_seq_length": 64})
        ids = task.tokenizer.encode(tf.constant(CASED))["input_word_ids"].numpy()
        expected = BertWordPieceTokenizer(vocab, lowercase=lower_case).encode_batch(CASED)
        for row, want in zip(ids, expected):
            assert row[:len(want.ids)].tolist() == want.ids and not row[len(want.ids):].any()


def test_lower_case_flag_has_one_definition_and_reaches_export():
    from absl import flags  # noqa: PLC0415
    from launch import config_flags, export  # noqa: PLC0415
    shared, exported = flags.FlagValues(), flags.FlagValues()
    config_flags.define(["lower_case"], shared)  # from the Task configs' lower_case field
    export.define_flags(exported)
    assert exported["lower_case"].help == shared["lower_case"].help and exported["lower_case"].default is None
    exported(["export", "--export_dir=unused", "--task=sst2", "--lower_case=false"])
    assert export._task_values(exported)["lower_case"] is False  # pylint: disable=protected-access


def _export_and_serve(task, model, export_dir, sentences):
    from tasks import serving  # noqa: PLC0415
    serving.save(task.serving_module(model), str(export_dir))
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    return {k: v.numpy() for k, v in serve(sentence=tf.constant(sentences)).items()}


@pytest.mark.parametrize("task_name, values, names", [
    ("sst2", {}, ["negative", "positive"]),
    ("classification", {"label_names": ("bad", "ok", "great")}, ["bad", "ok", "great"]),
    ("classification", {"num_classes": 3}, ["0", "1", "2"]),
])
def test_serving_export_answers_label_names(task_name, values, names, tmp_path):
    """The serving signature's `label` is the class name (sst2: negative/positive), else the id as a string;
    checked against the argmax of the model's own logits."""
    from tasks import registry  # noqa: PLC0415
    task, _ = registry.build_task(task_name, dict(values, init_encoder=TINY, vocab_file=VOCAB, max_seq_length=16))
    assert task.config.answer_labels == tuple(names)
    model = task.build_model()
    sentences = ["a gorgeous , witty film", "dull and tedious", "the plot", "it is what it is", "great cast",
                 "utterly awful", "fine", "so-so"]
    # Centre the random head's logits on these sentences, so that they do not all get one class.
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel * 100, bias * 0])
    logits = model(task.tokenizer.encode(tf.constant(sentences)), training=False).numpy()
    model.get_layer("logits").set_weights([kernel * 100, -logits.mean(0)])
    served = _export_and_serve(task, model, tmp_path / "export", sentences)
    # Padded to max_seq_length here; the export pads to the batch's longest sentence: the same answers.
    logits = model(task.tokenizer.encode(tf.constant(sentences)), training=False).numpy()
    expected = [names[i] for i in logits.argmax(-1)]
    assert [label.decode() for label in served["label"]] == expected
    assert served["label_id"].tolist() == logits.argmax(-1).tolist() and len(set(expected)) > 1
    np.testing.assert_allclose(served["probabilities"], task.probabilities(logits).numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ losses

@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_loss_matches_numpy(head):
    task = ClassificationTask(tiny_config({}, head=head, class_weights=(1.0, 3.0)))
    labels = tf.constant([0, 1, 1, 0])
    logits = np.array([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1], [1.5, 1.5]], np.float32)
    if head == "sigmoid":
        logits = logits[:, :1]
        p = 1 / (1 + np.exp(-logits[:, 0]))
        expected = -np.where(labels.numpy() == 1, np.log(p), np.log(1 - p))
    else:
        shifted = logits - logits.max(-1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        expected = -log_softmax[np.arange(4), labels.numpy()]
    np.testing.assert_allclose(task.per_example_loss({}, labels, tf.constant(logits)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(task.example_weights({}, labels).numpy(), [1, 3, 3, 1])
    probabilities = task.probabilities(tf.constant(logits)).numpy()
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)


def test_mean_pooling_is_the_masked_mean_of_token_vectors():
    task = ClassificationTask(tiny_config({}, pooling="mean"))
    model = task.build_model()
    ids = np.array([[101, 2023, 2003, 102, 0, 0], [101, 2307, 102, 0, 0, 0]], np.int32)
    features = {"input_word_ids": ids, "input_mask": (ids > 0).astype(np.int32), "input_type_ids": np.zeros_like(ids)}
    sequence = task._encoder(features)["sequence_output"].numpy()  # pylint: disable=protected-access
    pooled = np.stack([sequence[0, :4].mean(0), sequence[1, :3].mean(0)])
    kernel, bias = model.get_layer("logits").get_weights()
    np.testing.assert_allclose(model(features).numpy(), pooled @ kernel + bias, atol=1e-5)
    with pytest.raises(ValueError, match="pooling='max'"):
        tiny_config({}, pooling="max")


@pytest.mark.parametrize("pooling, cls_only, output_range", [("cls", True, 1), ("cls", False, None),
                                                                ("mean", True, None)])
def test_cls_pooling_builds_a_cls_only_last_layer_with_the_same_logits(pooling, cls_only, output_range):
    task = ClassificationTask(tiny_config({}, pooling=pooling, last_layer_cls_only=cls_only))
    tf_keras.utils.set_random_seed(5)
    model = task.build_model()
    assert task._encoder.get_config()["output_range"] == output_range  # pylint: disable=protected-access
    if pooling == "mean":
        return
    # The same weights in a classifier computing every position of the last layer: the same logits.
    full = ClassificationTask(tiny_config({}, pooling="cls", last_layer_cls_only=not cls_only)).build_model()
    full.set_weights(model.get_weights())
    ids = np.array([[101, 2023, 2003, 1037, 102, 0], [101, 2307, 102, 0, 0, 0]], np.int32)
    features = {"input_word_ids": ids, "input_mask": (ids > 0).astype(np.int32), "input_type_ids": np.zeros_like(ids)}
    np.testing.assert_allclose(model(features).numpy(), full(features).numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ training

def test_trains_and_metrics_match_recomputation(sst2_slices, tmp_path):
    trainer = run_training(lambda: ClassificationTask(tiny_config(sst2_slices)), global_batch_size=16,
                           train_steps=24, steps_per_loop=8, learning_rate=1e-3, eval_split="validation",
                           model_dir=str(tmp_path))
    losses = [h["loss"] for h in trainer.train_history]
    assert losses[-1] < losses[0]
    # Batches grouped by length come in several widths, yet the loop was traced once.
    assert trainer.train_loop_tracing_count == 1
    results = trainer.evaluate("validation")
    # Recompute accuracy and F1 from the model's own predictions on the raw sentences.
    task = trainer.task
    dev = task.examples("validation")
    predicted, _ = task.predict(trainer.model, list(dev.texts[0]))
    predicted, gold = np.array([int(label) for label in predicted]), dev.labels  # no label names: "0", "1"
    tp = np.sum((predicted == 1) & (gold == 1))
    f1 = 2 * tp / (np.sum(predicted == 1) + np.sum(gold == 1))
    np.testing.assert_allclose(results["accuracy"], np.mean(predicted == gold), atol=1e-6)
    np.testing.assert_allclose(results["f1"], f1, atol=1e-5)
    # Training, evaluating and predicting ran no ResourceGather on the word embedding: that op puts
    # a variable into copy-on-read mode for good, where every read and every optimizer update copies the whole
    # table (engine/fusion.py, tasks/encoders/bert.build_variables).
    assert reads_alias(next(v for v in trainer.model.variables if "word_embeddings" in v.name))


def test_accumulation_and_mirrored_same_update(sst2_slices):
    # Fixed-length batches in input order: the same examples form the global batch on every geometry.
    # (Grouped by length, each replica's pipeline would sort its own windows: other, equally valid, batches.)
    factory = lambda: ClassificationTask(tiny_config(sst2_slices, shuffle_buffer=1, group_by_length=0))  # noqa
    plain = one_update_weights(factory, global_batch_size=16)
    # Without micro-batches the word embedding's gradient stays rows (engine/step.py), which the mirrored
    # all-reduce concatenates across replicas; with them it is dense.
    for kwargs in ({"grad_accum_steps": 4}, {"strategy": "mirrored", "grad_accum_steps": 2}, {"strategy": "mirrored"}):
        losses, weights = one_update_weights(factory, global_batch_size=16, **kwargs)
        np.testing.assert_allclose(losses, plain[0], atol=1e-5)
        for a, b in zip(plain[1], weights):
            np.testing.assert_allclose(b, a, atol=1e-5)


# ------------------------------------------------------------------------------------ length grouping

def _expected_widths(lengths, batch_size, window_batches, full, multiple=16):
    """Batch widths from first principles: sort each window, chunk it, round each chunk's longest up."""
    widths = []
    for start in range(0, len(lengths), batch_size * window_batches):
        window = np.sort(lengths[start:start + batch_size * window_batches])
        widths += [min(-(-chunk.max() // multiple) * multiple, full) for chunk in window.reshape(-1, batch_size)]
    return sorted(widths)


def test_group_by_length_keeps_every_example_and_cuts_only_padding():
    rng = np.random.default_rng(0)
    full, batch_size, window_batches = 64, 8, 4
    lengths = np.concatenate([rng.integers(1, 20, 80), rng.integers(1, full + 1, 16)])[rng.permutation(96)]
    ids = np.zeros([96, full], np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = np.arange(length) + 1000 * (i + 1)
    features = {"input_word_ids": ids, "input_mask": (ids > 0).astype(np.int32)}
    windows = tf.data.Dataset.from_tensor_slices((features, (np.arange(96), ids * 2))).batch(batch_size * window_batches)
    grouped = inputs.group_by_length(windows, batch_size=batch_size, window_batches=window_batches,
                                     length_key="input_mask")
    seen, widths = [], []
    for batch, (example, sequence_label) in grouped:
        width = batch["input_mask"].shape[1]
        widths.append(width)
        for row, i in enumerate(example.numpy()):
            seen.append(i)
            # Only padding is cut: every row keeps all its tokens, and sequence-shaped labels are cut alike.
            assert batch["input_mask"][row].numpy().sum() == lengths[i]
            np.testing.assert_array_equal(batch["input_word_ids"][row], ids[i, :width])
            np.testing.assert_array_equal(sequence_label[row], 2 * ids[i, :width])
    assert sorted(seen) == list(range(96))
    assert sorted(widths) == _expected_widths(lengths, batch_size, window_batches, full)
    assert np.mean(widths) < 0.6 * full  # what the grouping is for


@pytest.mark.parametrize("multiple", [1, 5])
def test_predict_batches_come_longest_first_cut_in_numpy_to_the_widths_of_the_tensor_rule(multiple):
    rng = np.random.default_rng(1)
    full, batch_size = 24, 4
    lengths = np.concatenate([rng.integers(1, 12, 9), [full, 0]])[rng.permutation(11)]  # one full, one empty
    ids = np.zeros([11, full], np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = np.arange(length) + 100 * (i + 1)
    features = {"input_word_ids": ids, "input_mask": (ids > 0).astype(np.int32), "example": np.arange(11)}
    cut = lambda batch: inputs.cut_to_longest(batch, (), length_key="input_mask", full_length=full,
                                              multiple=multiple)[0]
    seen = []
    for rows, batch in inputs.longest_first_batches(features, batch_size, cut=cut):
        assert all(isinstance(t, tf.Tensor) for t in batch.values())
        # Longest first: no row of a later batch is longer than any row of this one.
        assert min(lengths[rows]) >= np.delete(lengths, np.concatenate(seen + [rows])).max(initial=0)
        longest = max(max(lengths[rows]), 1)
        width = min(full, longest if longest % multiple == 0 else longest + multiple - longest % multiple)
        assert batch["input_word_ids"].shape == (len(rows), width)
        np.testing.assert_array_equal(batch["input_word_ids"], ids[rows, :width])
        np.testing.assert_array_equal(batch["example"], rows)  # not sequence-shaped: not cut
        # The NumPy rule (these batches) and the tensor rule (tf.data evaluation batches) give the same width.
        assert int(inputs.longest_width(tf.constant(features["input_mask"][rows]), full, multiple)) == width
        seen.append(rows)
    assert sorted(np.concatenate(seen)) == list(range(11))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_cut_batches_give_the_logits_of_full_padding(sst2_slices, pooling):
    task = ClassificationTask(tiny_config(sst2_slices, pooling=pooling))
    model = task.build_model()
    # The first batch of a window narrower than max_seq_length (batches are shuffled within their window).
    features, _ = next(f for f in task.build_inputs("train", batch_size=8).take(16)
                       if f[0]["input_word_ids"].shape[1] < task.config.max_seq_length)
    width = features["input_word_ids"].shape[1]
    padded = {k: tf.pad(v, [[0, 0], [0, task.config.max_seq_length - width]]) for k, v in features.items()}
    np.testing.assert_allclose(model(features).numpy(), model(padded).numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------ evaluation cut to the longest

def test_encode_pads_to_the_longest_only_on_request():
    task = ClassificationTask(tiny_config({}))
    long = " ".join(["word"] * 40)  # truncated to max_seq_length (32) either way
    for sentences, multiple, width in ((["a film", "a gorgeous , witty film"], 1, 7), (["a film"], 16, 16),
                                       (["a film", long], 1, 32), (["a film", long], 16, 32)):
        full = task.tokenizer.encode(tf.constant(sentences))
        cut = task.tokenizer.encode(tf.constant(sentences), pad_to_multiple=multiple)
        assert full["input_mask"].shape[1] == 32 and cut["input_mask"].shape[1] == width
        for name in full:
            np.testing.assert_array_equal(cut[name], full[name][:, :width])
            assert not np.any(full[name][:, width:])  # only padding was left out


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_cut_evaluation_gives_the_metrics_and_logits_of_full_padding(sst2_slices, tmp_path, strategy):
    """Trainer.evaluate and predict with batches cut to their longest sentence (the default) against the same
    model on batches padded to max_seq_length: the same metrics and loss, logits within 1e-5."""
    config = dataclasses.replace(tiny_config(sst2_slices), max_seq_length=128)
    runtime = RuntimeConfig(strategy=strategy, precision="float32")
    trainers = {}
    for cut in (True, False):
        trainer = Trainer(ClassificationTask(config, cut_eval_batches=cut),
                          TrainerConfig(model_dir=str(tmp_path / str(cut)), train_steps=1, global_batch_size=16,
                                        eval_batch_size=16, eval_split="validation"),
                          OptimizerConfig(), runtime, strategy=strategy_lib.make_strategy(runtime))
        if trainers:
            trainer.model.set_weights(trainers[True].model.get_weights())
        trainers[cut] = trainer
    cut, full = trainers[True], trainers[False]
    assert cut.task.cuts_batches and not full.task.cuts_batches
    built = []
    build_inputs = cut.task.build_inputs
    cut.task.build_inputs = lambda split, **kwargs: built.append(split) or build_inputs(split, **kwargs)
    results = {c: t.evaluate("validation") for c, t in trainers.items()}
    # A second evaluation iterates the same batches again instead of building (and tracing) the pipeline anew.
    again = cut.evaluate("validation")
    assert built == ["validation"] and again["accuracy"] == results[True]["accuracy"]
    np.testing.assert_allclose(again["loss"], results[True]["loss"], rtol=1e-6)
    del cut.task.build_inputs
    assert results[True]["accuracy"] == results[False]["accuracy"]
    np.testing.assert_allclose(results[True]["f1"], results[False]["f1"], atol=1e-6)
    np.testing.assert_allclose(results[True]["loss"], results[False]["loss"], atol=1e-5)
    # The batches themselves: cut ones are the full ones, longest first, minus padding, with the same logits.
    padded_batches = list(full.task.build_inputs("validation", batch_size=16))
    padded = {k: np.concatenate([f[k] for f, _ in padded_batches]) for k in padded_batches[0][0]}
    padded_labels = np.concatenate([labels for _, labels in padded_batches])
    logits_in_file_order = np.concatenate([full.model(f, training=False) for f, _ in padded_batches])
    lengths = padded["input_mask"].sum(1)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in file order
    widths, row = [], 0
    for features, labels in cut.task.build_inputs("validation", batch_size=16):
        width = features["input_mask"].shape[1]
        widths.append(width)
        rows = order[row:row + len(labels)]
        row += len(labels)
        assert padded["input_mask"].shape[1] == 128 and not np.any(padded["input_mask"][rows, width:])
        for name in padded:
            np.testing.assert_array_equal(features[name], padded[name][rows, :width])
        np.testing.assert_array_equal(labels, padded_labels[rows])
        np.testing.assert_allclose(cut.model(features, training=False), logits_in_file_order[rows],
                                   atol=1e-5, rtol=0)
        assert width == features["input_mask"].numpy().sum(1).max()  # exactly the longest: no XLA here
    assert row == len(lengths) and len(widths) == 7  # 100 / 16
    assert widths == sorted(widths, reverse=True) and max(widths) < 128
    # Sorting is what cuts the tokens: fewer than batches of 16 in file order, each cut to its longest.
    in_file_order = sum(len(chunk) * chunk.max() for chunk in np.split(lengths, range(16, len(lengths), 16)))
    assert sum(16 * w for w in widths[:-1]) + widths[-1] * (len(lengths) % 16 or 16) < in_file_order
    # One trace for every width (here 6), over two evaluations: traced from the pipeline's spec, with the F1
    # metric's variables built beforehand (a first trace that creates variables is traced again).
    assert len(set(widths)) > 3 and cut._eval_step.experimental_get_tracing_count() == 1
    sentences = list(cut.task.examples("validation").texts[0])
    labels_cut, probabilities_cut = cut.task.predict(cut.model, sentences, batch_size=16)
    labels_full, probabilities_full = full.task.predict(full.model, sentences, batch_size=16)
    # predict runs longest first too, and answers in input order: against the model on batches in file order.
    np.testing.assert_allclose(probabilities_cut, tf.nn.softmax(logits_in_file_order), atol=1e-5, rtol=0)
    assert labels_cut == labels_full
    np.testing.assert_allclose(probabilities_cut, probabilities_full, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ launch

@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    return write_tiny_encoder_dir(tmp_path_factory.mktemp("tiny_encoder"))


def launch_train(*args, flagfile_lines=()):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_launch_train_with_flagfile(sst2_slices, tiny_encoder_dir, tmp_path):
    flagfile = write(tmp_path / "run.flags", "\n".join([
        "--task=sst2", f"--init_encoder={tiny_encoder_dir}", f"--train_data={sst2_slices['train']}",
        f"--eval_data={sst2_slices['validation']}", "--max_seq_length=32", "--precision=float32",
        "--global_batch_size=8", "--grad_accum_steps=2", "--train_steps=4", "--steps_per_loop=2",
        "--learning_rate=1e-3"]))
    model_dir = tmp_path / "run"
    result = launch_train(f"--flagfile={flagfile}", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train | step: 4 |" in result.stdout
    assert "final validation metrics: accuracy" in result.stdout
    metrics = json.load(open(model_dir / "eval_results.json"))
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
    assert any(name.startswith("events.out") for name in os.listdir(model_dir / "train"))
    # The model flags are saved with the run, so launch.predict needs only --model_dir.
    saved = json.load(open(model_dir / "model_flags.json"))
    assert saved == {"task": "sst2", "init_encoder": tiny_encoder_dir, "max_seq_length": 32}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    predicted = subprocess.run([sys.executable, "-m", "launch.predict", f"--model_dir={model_dir}",
                                "--text=a gorgeous , witty movie", "--text=dull"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a gorgeous , witty movie", "dull"]
    assert all(r["label"] == ["negative", "positive"][int(np.argmax(r["probabilities"]))] for r in rows)
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-5 for r in rows)

    # An impossible batch geometry, or resuming with another one, is refused naming the flags, and the
    # saved run is untouched.
    before = {name: os.path.getmtime(model_dir / name) for name in os.listdir(model_dir)}
    bad = launch_train(f"--flagfile={flagfile}", f"--model_dir={model_dir}", "--global_batch_size=9",
                       "--train_steps=8")
    assert bad.returncode != 0
    assert "--global_batch_size=9 is not divisible by --grad_accum_steps=2" in bad.stderr
    changed = launch_train(f"--flagfile={flagfile}", f"--model_dir={model_dir}", "--global_batch_size=10",
                           "--train_steps=8")
    assert changed.returncode != 0
    assert "global_batch_size: saved 8, now 10" in changed.stderr
    assert {name: os.path.getmtime(model_dir / name) for name in os.listdir(model_dir)} == before


def test_soup_averages_runs_and_predicts_from_its_dir(sst2_slices, tiny_encoder_dir, tmp_path):
    common = ["--task=sst2", f"--init_encoder={tiny_encoder_dir}", f"--train_data={sst2_slices['train']}",
              f"--eval_data={sst2_slices['validation']}", "--precision=float32", "--global_batch_size=8",
              "--train_steps=4", "--steps_per_loop=4", "--learning_rate=1e-3", "--max_seq_length=32"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    def start(module, *args):
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [tmp_path / f"seed{seed}" for seed in (0, 1)]
    other = tmp_path / "seq16"
    processes = [start("launch.train", *common, f"--seed={seed}", f"--model_dir={run}") for seed, run in zip((0, 1), runs)]
    processes.append(start("launch.train", *common, "--max_seq_length=16", f"--model_dir={other}"))
    for p in processes:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]

    soup_dir = tmp_path / "soup"
    souped = start("launch.soup", f"--model_dirs={runs[0]},{runs[1]}", f"--output_dir={soup_dir}",
                   f"--eval_data={sst2_slices['validation']}", "--precision=float32")
    mismatch = start("launch.soup", f"--model_dirs={runs[0]},{other}", f"--output_dir={tmp_path / 'bad'}")
    stdout, stderr = souped.communicate(timeout=600)
    assert souped.returncode == 0, stderr[-3000:]
    assert "final validation metrics: accuracy" in stdout
    # The soup's weights are the mean of the runs' latest checkpoints, read here straight from the files.
    readers = [tf.train.load_checkpoint(str(d)) for d in (*runs, soup_dir)]
    names = [n for n in readers[-1].get_variable_to_shape_map() if n.startswith("model/") and "VARIABLE_VALUE" in n]
    assert len(names) > 10
    for name in names:
        np.testing.assert_allclose(readers[2].get_tensor(name),
                                   (readers[0].get_tensor(name) + readers[1].get_tensor(name)) / 2, atol=1e-6)
    assert json.load(open(soup_dir / "model_flags.json")) == json.load(open(runs[0] / "model_flags.json"))
    predicted = start("launch.predict", f"--model_dir={soup_dir}", "--text=a gorgeous , witty movie")
    out, err = predicted.communicate(timeout=600)
    assert predicted.returncode == 0 and json.loads(out)["label"] in ("negative", "positive"), err[-3000:]

    _, stderr = mismatch.communicate(timeout=600)
    assert mismatch.returncode == 1
    assert "other model flags" in stderr and "max_seq_length: 32 vs 16" in stderr, stderr[-2000:]
