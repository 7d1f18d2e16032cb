"""TaggingTask under the engine with a tiny random encoder: it trains, scores like conlleval.pl, windows
long sentences without losing words, and gives the same update under accumulation, 2 replicas and XLA."""
import os
import subprocess

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf

from conftest import DATA_DIR
from engine_helpers import one_update_weights, run_training
from tasks.ner import conll
from tasks.encoders import bert
from tasks.ner.task import TaggingConfig, TaggingTask

CONLLEVAL = os.path.join(DATA_DIR, "conll2003", "eval", "conlleval.pl")
VOCAB = os.path.join(bert.minilm_dir(), "vocab.txt")


def tiny_config(**overrides) -> TaggingConfig:
    # No dropout anywhere, so different batch geometries must give bit-comparable updates.
    encoder = bert.BertConfig(**{**bert.BertConfig.tiny().__dict__, "hidden_dropout_prob": 0.0,
                                     "attention_probs_dropout_prob": 0.0})
    values = dict(encoder=encoder, vocab_file=VOCAB, data_dir=DATA_DIR, max_seq_length=32, dropout=0.0,
                  max_train_sentences=64, max_eval_sentences=48)
    values.update(overrides)
    return TaggingConfig(**values)


def _perl_scores(path: str) -> tuple[float, float, float]:
    with open(path, encoding="utf-8") as f:
        output = subprocess.run(["perl", CONLLEVAL], stdin=f, capture_output=True, text=True, check=True).stdout
    fields = output.splitlines()[1].replace("%", "").replace(";", "").split()
    values = dict(zip(fields[0::2], fields[1::2]))
    return float(values["precision:"]), float(values["recall:"]), float(values["FB1:"])


@pytest.mark.parametrize("head", ["crf", "softmax"])
def test_trains_under_engine_and_scores_like_conlleval(tmp_path, head):
    config = tiny_config(head=head, predictions_dir=str(tmp_path))
    trainer = run_training(lambda: TaggingTask(config), global_batch_size=16, train_steps=100, steps_per_loop=25,
                           learning_rate=5e-3, eval_split="validation", model_dir=str(tmp_path / "model"))
    losses = [h["loss"] for h in trainer.train_history]
    assert losses[-1] < 0.6 * losses[0], losses
    results = trainer.evaluate("validation")
    predictions = tmp_path / "validation_predictions.txt"
    # Every word of every evaluated sentence is in the predictions file, and perl agrees with us.
    sentences = conll.read_conll(os.path.join(DATA_DIR, "conll2003", "valid.txt"))[:48]
    lines = [line for line in predictions.read_text().splitlines() if line]
    assert len(lines) == sum(len(s.words) for s in sentences)
    perl_precision, perl_recall, perl_f1 = _perl_scores(str(predictions))
    assert (round(results["precision"], 2), round(results["recall"], 2), round(results["f1"], 2)) == (
        perl_precision, perl_recall, perl_f1)
    assert results["f1"] > 0  # it learnt to find at least some entities
    assert 0.5 < results["word_accuracy"] <= 1.0


def test_length_grouped_batches_give_the_loss_of_full_padding():
    task = TaggingTask(tiny_config(max_seq_length=64, group_by_length=4))
    model = task.build_model()
    dataset = task.build_inputs("train", batch_size=8)
    assert not dataset.options().autotune.enabled  # engine/inputs.prefetched: no autotuning thread to wait for
    features, labels = next(iter(dataset))
    width = features["input_word_ids"].shape[1]
    # Word-piece tensors are cut to the batch's longest sentence; word-level ones keep their length.
    assert width < 64 and features["word_mask"].shape[1] == labels.shape[1] == task.config.words_per_window
    padded = {k: tf.pad(v, [[0, 0], [0, 64 - width]]) if k.startswith("input_") else v for k, v in features.items()}
    np.testing.assert_allclose(task.per_example_loss(features, labels, model(features)).numpy(),
                               task.per_example_loss(padded, labels, model(padded)).numpy(), rtol=1e-5, atol=1e-5)


def test_long_sentences_are_windowed_and_every_word_is_predicted(tmp_path):
    # 12 sub-tokens per window: most sentences need several windows.
    config = tiny_config(max_seq_length=12, max_eval_sentences=30, predictions_dir=str(tmp_path))
    task = TaggingTask(config)
    data = task.split_data("validation")
    assert len(data.sources) > 2 * len(data.sentences)
    trainer = run_training(lambda: task, global_batch_size=8, train_steps=1, eval_split="")
    # One update leaves every word "O"; large random emissions make the tags (and the entities) varied.
    kernel, bias = trainer.model.emissions.get_weights()
    trainer.model.emissions.set_weights([np.random.default_rng(0).normal(size=kernel.shape) * 3, bias])
    results = trainer.evaluate("validation")
    gold = [s.tags for s in data.sentences]
    path = tmp_path / "validation_predictions.txt"
    blocks = path.read_text().split("\n\n")
    rows = [[line.split() for line in block.splitlines()] for block in blocks if block.strip()]
    assert [[(r[0], r[1]) for r in rows_] for rows_ in rows] == [list(zip(s.words, s.tags)) for s in data.sentences]
    predicted = [[r[-1] for r in rows_] for rows_ in rows]
    # The in-process scores are conlleval.pl's on the written file (gold and prediction columns).
    assert (round(results["precision"], 2), round(results["recall"], 2), round(results["f1"], 2)) == _perl_scores(
        str(path))
    # Predictions come from the model: the same tags as decoding each window's owned words directly
    # (the model's in-graph tags, placed by each window's source and owned mask, without conll.stitch).
    _, host = trainer.predict_outputs("validation")
    direct = [[None] * len(g) for g in gold]
    for row, window in enumerate(host["example_index"]):
        source = data.sources[window]
        for slot in range(source.num_words):
            if data.arrays["owned_mask"][window, slot]:
                assert direct[source.sentence][source.begin + slot] is None  # owned by one window only
                direct[source.sentence][source.begin + slot] = config.labels[host["tags"][row, slot]]
    assert direct == predicted
    assert results["f1"] > 0 and len({t for tags in predicted for t in tags}) > 3, "all-O would make this vacuous"


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_cut_evaluation_gives_the_tags_and_scores_of_full_padding(tmp_path, strategy):
    """Evaluation batches sorted longest first and cut to their longest window (the default off TPU) against the same model on batches in file order padded to max_seq_length and words_per_window."""
    trainers = {}
    for cut in (True, False):
        config = tiny_config(max_seq_length=64, max_eval_sentences=40, predictions_dir=str(tmp_path / str(cut)))
        trainer = run_training(lambda: TaggingTask(config, cut_eval_batches=cut), global_batch_size=8, train_steps=1,
                               strategy=strategy, eval_batch_size=8)
        if trainers:
            trainer.model.set_weights(trainers[True].model.get_weights())
        else:  # varied tags, so equal predictions are not all "O"
            kernel, bias = trainer.model.emissions.get_weights()
            trainer.model.emissions.set_weights([np.random.default_rng(0).normal(size=kernel.shape) * 3, bias])
        trainers[cut] = trainer
    cut, full = trainers[True], trainers[False]
    assert cut.task.cuts_batches and not full.task.cuts_batches
    results = {c: t.evaluate("validation") for c, t in trainers.items()}
    for name in ("precision", "recall", "f1", "word_accuracy"):
        assert results[True][name] == results[False][name], name
    np.testing.assert_allclose(results[True]["loss"], results[False]["loss"], rtol=1e-5)
    predictions = [(tmp_path / str(c) / "validation_predictions.txt").read_text() for c in (True, False)]
    assert predictions[0] == predictions[1]
    assert len({line.split()[-1] for line in predictions[0].splitlines() if line}) > 3, "all-O would prove little"

    # The batches: windows longest first (ties in file order), each cut to its longest window, its word arrays to that minus 2.
    arrays = cut.task.split_data("validation").arrays
    order = np.argsort(-arrays["input_mask"].sum(1), kind="stable")
    widths, row = set(), 0
    for features, labels in cut.task.build_inputs("validation", batch_size=8):
        rows = order[row:row + len(labels)]
        row += len(labels)
        pieces, words = features["input_mask"].shape[1], features["word_mask"].shape[1]
        widths.add((pieces, words))
        assert pieces == arrays["input_mask"][rows].sum(1).max() and words == pieces - 2
        assert not np.any(arrays["word_mask"][rows][:, words:])  # only padding words were cut
        for name, value in features.items():
            np.testing.assert_array_equal(value, arrays[name][rows][:, :value.shape[1]] if value.ndim > 1
                                          else arrays[name][rows])
        np.testing.assert_array_equal(labels, arrays["tags"][rows][:, :words])
    assert row == len(order) and len(widths) > 2 and max(w for w, _ in widths) < 64


def test_same_update_with_accumulation_and_two_replicas_and_xla():
    # Adam's first step moves each weight by lr * g / (|g| + epsilon): for a gradient within a few epsilons of
    # zero that amplifies float rounding up to lr / (4 epsilon) times. With the default 1e-6, one of 32,768
    # embedding entries differed by 1.6e-5 between XLA and oneDNN summation orders on an Intel AMX CPU. An
    # epsilon of 1e-3 keeps the comparison about the gradient (a rounding difference d in g moves the weight
    # by at most lr * d / epsilon) while gradients above 1e-3 still take Adam's full-size step.
    # Batches in file order (no length grouping), so every geometry sees the same 8 sentences.
    factory = lambda: TaggingTask(tiny_config(group_by_length=0))  # noqa: E731
    plain_losses, plain = one_update_weights(factory, global_batch_size=8, adam_epsilon=1e-3)
    for kwargs in (dict(grad_accum_steps=2), dict(strategy="mirrored", grad_accum_steps=2, jit_compile=True)):
        losses, weights = one_update_weights(factory, global_batch_size=8, adam_epsilon=1e-3, **kwargs)
        np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
        for a, b in zip(plain, weights):
            np.testing.assert_allclose(b, a, atol=1e-5)
    assert any(not np.allclose(a, 0) for a in plain[-3:])  # the CRF transitions did move


class _FixedTagModel:
    """Stands in for a trained model: tags words by position within the window."""

    def __init__(self, tag_ids):
        self.tag_ids = tag_ids

    def __call__(self, features, training=False):
        # TensorFlow ops: predict traces its model call (and cuts the word axis to the batch's longest window).
        mask = features["word_mask"]
        width = tf.shape(mask)[1]
        row = tf.pad(tf.constant(self.tag_ids, tf.int32), [[0, tf.maximum(width - len(self.tag_ids), 0)]])[:width]
        return {"tags": row[tf.newaxis] * mask}


def test_predict_returns_entities_with_character_offsets():
    task = TaggingTask(tiny_config())
    labels = list(task.config.labels)
    text = "Peter Blackburn visited  Brussels today."
    # words: Peter Blackburn visited Brussels today .
    model = _FixedTagModel([labels.index(t) for t in ["B-PER", "I-PER", "O", "B-LOC", "O", "O"]])
    (entities, empty) = task.predict(model, [text, "  "])
    assert [(e.text, e.type, e.start, e.end) for e in entities] == [
        ("Peter Blackburn", "PER", 0, 15), ("Brussels", "LOC", 25, 33)]
    assert empty == []
    # and the real (untrained) model runs end to end on text, giving spans that point into it
    real = task.build_model()
    for entity in task.predict(real, [text])[0]:
        assert text[entity.start:entity.end] == entity.text


def test_in_graph_word_shapes_equal_the_python_ones_on_every_conll_word():
    from tasks.ner import serving  # noqa: PLC0415
    words = sorted({w for s in conll.read_conll(os.path.join(DATA_DIR, "conll2003", "train.txt")) for w in s.words})
    words += ["Ångström", "ǅemal", "東京", "ÉCOLE", "éCOLE", "Ⓐ", ""]
    expected = [conll.word_shape(w) for w in words]
    assert serving.word_shapes(tf.constant(words)).numpy().tolist() == expected
    assert len(set(expected)) == conll.NUM_SHAPES - 1  # every shape but "none" occurs in the real data


def test_casing_features_reach_the_encoder():
    """The uncased tokenizer gives "Apple" and "apple" the same ids; only the shape embedding tells them apart."""
    texts = ["Apple opened a store in Paris .", "apple opened a store in paris ."]

    def logits(casing: bool) -> np.ndarray:
        task = TaggingTask(tiny_config(casing_features=casing))
        model = task.build_model()
        if casing:  # zero at initialisation (the pretrained encoder unchanged); make it matter
            table = model.case_embedding.embeddings
            table.assign(tf.random.stateless_normal(table.shape, seed=[1, 2]))
        sentences = [conll.Sentence(tuple(t.split()), ("O",) * len(t.split())) for t in texts]
        arrays = dict(task.encode(sentences).arrays)
        assert arrays["input_word_ids"][0].tolist() == arrays["input_word_ids"][1].tolist()
        return model(arrays, training=False)["logits"].numpy()

    with_casing, without = logits(True), logits(False)
    assert np.abs(with_casing[0] - with_casing[1]).max() > 1e-3
    np.testing.assert_array_equal(without[0], without[1])


def test_casing_features_default_to_uncased_model_garden_encoders_only():
    from tasks.ner.task import uses_casing_features  # noqa: PLC0415
    model_garden, hub_layer = bert.build_encoder(bert.BertConfig.tiny()), tf.keras.layers.Layer()
    assert uses_casing_features(tiny_config(), model_garden)
    assert not uses_casing_features(tiny_config(lower_case=False), model_garden)  # a cased encoder sees case
    assert not uses_casing_features(tiny_config(), hub_layer)  # a hub.KerasLayer takes no input embeddings
    assert not uses_casing_features(tiny_config(casing_features=False), model_garden)
    with pytest.raises(ValueError, match="casing_features needs a Model Garden encoder"):
        from tasks.ner.task import TaggingModel  # noqa: PLC0415
        TaggingModel(hub_layer, tiny_config(casing_features=True))
