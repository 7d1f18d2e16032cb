"""SQuAD Task: EM/F1 against the official script, span decoding, model/loss, training under the engine."""
import json
import os
import subprocess
import sys

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest

from tasks import textfiles
from tasks.squad import data as squad_data
from tasks.squad import decoding
from tasks.squad import metrics as squad_metrics
from tasks.squad import task as squad

DATA_DIR = textfiles.default_data_dir()
DEV_FILE = os.path.join(DATA_DIR, "squad", "dev-v1.1.json")
OFFICIAL_SCRIPT = os.path.join(DATA_DIR, "squad", "evaluate-v1.1.py")


# ------------------------------------------------------------------------------------- metrics

def _perturb(answer: str, i: int, rng: np.random.Generator) -> str:
    """Predictions that exercise every normalisation rule and partial overlaps."""
    words = answer.split()
    kind = i % 9
    if kind == 0:
        return answer
    if kind == 1:
        return "The " + answer.upper() + "!"
    if kind == 2:
        return " ".join(words[: max(1, len(words) // 2)])
    if kind == 3:
        return answer + " and an extra clause, (in brackets)"
    if kind == 4:
        return ""
    if kind == 5:
        return "  ".join(rng.permutation(words).tolist()) + " a"
    if kind == 6:
        return "completely unrelated"
    if kind == 7:
        return answer.replace(" ", "\t ") + "."
    return "".join(ch for ch in answer if ch.isalnum() or ch == " ")


def test_em_f1_equal_the_official_script(tmp_path):
    with open(DEV_FILE, encoding="utf-8") as f:
        dataset = json.load(f)
    dataset["data"] = dataset["data"][:4]  # a slice: ~1,100 questions
    rng = np.random.default_rng(0)
    gold = squad_metrics.gold_answers(dataset["data"])
    predictions = {}
    for i, (qas_id, answers) in enumerate(gold.items()):
        if i % 23 == 0:
            continue  # unanswered: scores 0 in both
        predictions[qas_id] = _perturb(answers[i % len(answers)], i, rng)
    dataset_path, predictions_path = tmp_path / "slice.json", tmp_path / "predictions.json"
    dataset_path.write_text(json.dumps(dataset), encoding="utf-8")
    predictions_path.write_text(json.dumps(predictions), encoding="utf-8")

    run = subprocess.run([sys.executable, OFFICIAL_SCRIPT, str(dataset_path), str(predictions_path)],
                         capture_output=True, text=True, check=True)
    official = json.loads(run.stdout)
    ours = squad_metrics.evaluate(gold, predictions)
    assert ours == official  # same rules, same summation order: equal to the last bit
    assert 20 < ours["exact_match"] < 60 and ours["f1"] > ours["exact_match"]  # the slice is not degenerate


def test_normalisation_rules():
    assert squad_metrics.normalize_answer("The  Denver, Broncos!") == "denver broncos"
    assert squad_metrics.normalize_answer("an apple a day") == "apple day"
    assert squad_metrics.normalize_answer("theater") == "theater"  # articles only as whole words
    assert squad_metrics.f1("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)
    assert squad_metrics.f1("a", "the") == 0.0  # both normalise to nothing


# ---------------------------------------------------------------------------------- decoding

def _features_for(context: str, char_offsets: list[tuple[int, int]], windows: list[tuple[int, int, int]]):
    """SquadFeatures of one question over hand-made tokens; windows are (doc_start, doc_len, seq_offset)."""
    tokens = squad_data.TokenizedText(np.zeros(len(char_offsets), np.int32),
                                      np.asarray([s for s, _ in char_offsets], np.int32),
                                      np.asarray([e for _, e in char_offsets], np.int32))
    example = squad_data.SquadExample("q", "question?", 0, (), 0)
    data = squad_data.SquadData([context], [example], [], 1)
    rows = np.asarray([(0, *w) for w in windows], np.int32)
    return squad_data.SquadFeatures(data, [tokens], rows, squad_data.FeatureSettings())


def _word_offsets(text: str) -> list[tuple[int, int]]:
    offsets, position = [], 0
    for word in text.split(" "):
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    return offsets


CONTEXT = "alpha beta gamma delta epsilon zeta eta theta iota kappa"  # 10 tokens


def test_decoding_picks_the_best_valid_span_and_skips_invalid_ones():
    features = _features_for(CONTEXT, _word_offsets(CONTEXT), [(0, 10, 3)])  # [CLS] q q [SEP] 10 tokens [SEP]
    seq = 16
    start, end = np.full([1, seq], -50.0), np.full([1, seq], -50.0)
    start[0, 0] = end[0, 0] = 50.0      # [CLS]: best raw score, but not an answer in SQuAD v1.1
    start[0, 1] = end[0, 2] = 40.0      # inside the question
    start[0, 12] = end[0, 13] = 30.0    # last context token .. [SEP]: end outside the context
    start[0, 14] = end[0, 15] = 35.0    # padding
    start[0, 3 + 6] = 20.0              # "eta" ...
    end[0, 3 + 2] = 19.0                # ... ends at "gamma": end before start
    start[0, 3 + 3] = 6.0               # "delta" .. "zeta": the best valid span
    end[0, 3 + 5] = 5.0
    assert squad.decode_predictions(start, end, np.array([0]), features) == {"q": "delta epsilon zeta"}
    # Longer than max_answer_length: not allowed, the next best valid span wins.
    got = squad.decode_predictions(start, end, np.array([0]), features, max_answer_length=2)
    assert len(got["q"].split()) <= 2


def test_best_span_over_windows_uses_max_context_and_original_text():
    context = "Ünïcode  text, with   spaces and\u200bmore words here now"
    offsets = [(0, 7), (9, 13), (13, 14), (15, 19), (22, 28), (29, 32), (33, 37), (38, 43), (44, 48), (49, 52)]
    assert [context[s:e] for s, e in offsets][5:7] == ["and", "more"]
    # Two windows over 10 tokens, [0, 7) and [3, 10), both starting at sequence position 3.
    features = _features_for(context, offsets, [(0, 7, 3), (3, 7, 3)])
    start, end = np.full([2, 12], -9.0), np.full([2, 12], -9.0)
    # Window 2 scores "with" (token 3) highest, but token 3 sits at window 2's left edge and has more
    # context in window 1, so window 2 may not start there.
    start[1, 3 + 0], end[1, 3 + 0] = 9.0, 9.0
    start[0, 3 + 3], end[0, 3 + 3] = 1.0, 1.0         # "with" in window 1: allowed, score 2
    start[0, 3 + 4], end[0, 3 + 6] = 2.0, 2.0         # tokens 4..6 in window 1: score 4, the answer
    rows_in_any_order = np.array([1, 0])
    got = squad.decode_predictions(start[::-1], end[::-1], rows_in_any_order, features)
    assert got == {"q": "spaces and\u200bmore"}  # the original characters, zero-width space included


def test_ties_go_to_the_first_pair_and_the_earlier_window_whatever_the_row_order():
    features = _features_for(CONTEXT, _word_offsets(CONTEXT), [(0, 6, 3), (4, 6, 3)])  # tokens 0-5 and 4-9
    start, end = np.full([2, 12], -9.0), np.full([2, 12], -9.0)
    # Window 1: "alpha" .. "beta" and "gamma" .. "gamma" both score 2; the better-ranked start is
    # "alpha" (equal start logits: the lower position ranks first), so its pair wins.
    start[0, 3 + 0] = start[0, 3 + 2] = 1.0
    end[0, 3 + 1] = end[0, 3 + 2] = 1.0
    # Window 2: "theta" (token 7, max context here) .. "theta" also scores 2: the earlier window wins,
    # given in either row order.
    start[1, 3 + 3] = end[1, 3 + 3] = 1.0
    for rows in ([0, 1], [1, 0]):
        assert squad.decode_predictions(start[rows], end[rows], np.array(rows), features) == {"q": "alpha beta"}
    # One more on window 2 and it wins.
    start[1, 3 + 3] = 1.5
    assert squad.decode_predictions(start, end, np.array([0, 1]), features) == {"q": "theta"}


def test_answers_crossing_a_window_edge_come_from_the_window_holding_them_whole():
    # Windows [0, 6) and [4, 10). "delta" .. "eta" (tokens 3-6) would score 7, but no window holds both.
    features = _features_for(CONTEXT, _word_offsets(CONTEXT), [(0, 6, 3), (4, 6, 3)])
    start, end = np.full([2, 12], -9.0), np.full([2, 12], -9.0)
    start[0, 3 + 3] = 4.0             # "delta" starts in window 1 (the only one holding it) ...
    end[0, 3 + 5] = 1.0               # ... whose last token is "zeta": "delta epsilon zeta" scores 5
    end[1, 3 + 2] = 3.0               # "eta" ends in window 2, where "delta" is not a token
    start[1, 3 + 1] = 2.5             # "zeta" (max context in window 2) .. "eta": 5.5
    assert squad.decode_predictions(start, end, np.array([0, 1]), features) == {"q": "zeta eta"}
    start[1, 3 + 1] = 1.5             # now 4.5 < 5: the cut-off span of window 1 wins
    assert squad.decode_predictions(start, end, np.array([0, 1]), features) == {"q": "delta epsilon zeta"}


def test_max_answer_length_and_the_exhaustive_fallback():
    features = _features_for(CONTEXT, _word_offsets(CONTEXT), [(0, 10, 3)])
    start, end = np.zeros([1, 16]), np.zeros([1, 16])
    start[0, 3 + 1], end[0, 3 + 8] = 9.0, 9.0    # "beta" .. "iota": 8 tokens
    start[0, 3 + 6], end[0, 3 + 7] = 0.5, 1.0    # "eta theta": 2 tokens, score 1.5 ("eta" .. "iota": 9.5)
    start[0, 3 + 2], end[0, 3 + 3] = 1.0, 0.5    # "gamma delta": score 1.5
    assert squad.decode_predictions(start, end, np.array([0]), features, max_answer_length=8) == {
        "q": "beta gamma delta epsilon zeta eta theta iota"}
    # 7 tokens at most: beta .. iota is out; "beta" .. "theta" (9 + 1) beats "beta" .. "delta" (9 + 0.5).
    assert squad.decode_predictions(start, end, np.array([0]), features, max_answer_length=7) == {
        "q": "beta gamma delta epsilon zeta eta theta"}
    # n_best_size=1: the only pair (beta, iota) is invalid, so every span is searched: "beta" + its best end
    # within 2 tokens; "beta" .. "gamma" (9 + 0) ties "beta" alone (9 + 0) and the first end wins.
    assert squad.decode_predictions(start, end, np.array([0]), features, n_best_size=1, max_answer_length=2) == {
        "q": "beta"}
    end[0, 3 + 2] = 0.5
    assert squad.decode_predictions(start, end, np.array([0]), features, n_best_size=1, max_answer_length=2) == {
        "q": "beta gamma"}


def test_questions_without_windows_or_context_get_no_answer():
    features = _features_for(CONTEXT, _word_offsets(CONTEXT), [(0, 10, 3)])
    assert squad.decode_predictions(np.zeros([0, 16]), np.zeros([0, 16]), np.zeros([0], np.int32), features) == {}
    # A window without context tokens (an empty context): nothing to choose, no answer.
    spans = decoding.best_spans(np.zeros([1, 8], np.float32), np.zeros([1, 8], np.float32), window_example=[0],
                                doc_start=[0], doc_len=[0], seq_offset=[3], num_examples=2, n_best_size=20,
                                max_answer_length=30)
    assert spans.found.numpy().tolist() == [False, False] and spans.first.numpy().tolist() == [0, 0]


def _bert_is_max_context(windows, window, position):
    """google-research/bert run_squad.py `_check_is_max_context`, per token: among the windows holding
    `position`, the one with the largest min(left, right) context + 0.01 * length (the first on ties)."""
    best_score, best_window = None, None
    for index, (doc_start, doc_len, _) in enumerate(windows):
        doc_end = doc_start + doc_len - 1
        if doc_start <= position <= doc_end:
            score = min(position - doc_start, doc_end - position) + 0.01 * doc_len
            if best_score is None or score > best_score:
                best_score, best_window = score, index
    return best_window == window


# BERT's windows over 40 tokens, 16 per window, stride 8 (written out: the oracle must not call data.py).
WINDOWS_40 = [(0, 16, 4), (8, 16, 4), (16, 16, 4), (24, 16, 4)]


def test_decoding_matches_brute_force_on_random_logits():
    """With n-best as large as the sequence, the result must equal the best of all valid spans over all
    windows, found by enumeration (BERT's token max-context rule, re-implemented here, included)."""
    rng = np.random.default_rng(1)
    context = " ".join(f"w{i}" for i in range(40))
    offsets = _word_offsets(context)
    windows = WINDOWS_40
    features = _features_for(context, offsets, windows)
    for trial in range(25):
        start, end = rng.normal(size=[2, len(windows), 24])
        best = None
        for w, (doc_start, doc_len, seq_offset) in enumerate(windows):
            for i in range(doc_len):
                for j in range(i, min(doc_len, i + 5)):
                    if _bert_is_max_context(windows, w, doc_start + i):
                        score = start[w, seq_offset + i] + end[w, seq_offset + j]
                        if best is None or score > best[0]:
                            best = (score, doc_start + i, doc_start + j)
        expected = context[offsets[best[1]][0]:offsets[best[2]][1]]
        rows = rng.permutation(len(windows))
        got = squad.decode_predictions(start[rows], end[rows], rows, features, n_best_size=24, max_answer_length=5)
        assert got == {"q": expected}, trial
        # The default n-best of 20 still never returns an invalid span.
        got20 = squad.decode_predictions(start, end, np.arange(len(windows)), features, max_answer_length=5)
        assert len(got20["q"].split()) <= 5 and got20["q"] in context


def test_max_context_prefers_the_centred_window():
    # Windows of tokens 0-5 and 3-8 of one question (example, doc_start, doc_len).
    first, second = decoding.max_context([0, 0], [0, 3], [6, 6], num_examples=1, seq_length=8).numpy()
    # Token 3: 3 left/2 right in window 1 (min 2) vs 0 left in window 2 -> window 1; token 5 -> window 2.
    assert first.tolist() == [True, True, True, True, True, False, False, False]  # token 4 ties: earlier window
    assert second.tolist() == [False, False, True, True, True, True, False, False]
    oracle = [[_bert_is_max_context(WINDOWS_40, w, s + t) if t < n else False for t in range(20)]
              for w, (s, n, _) in enumerate(WINDOWS_40)]
    windows = np.array(WINDOWS_40)
    got = decoding.max_context(np.zeros(4, np.int32), windows[:, 0], windows[:, 1], num_examples=1, seq_length=20)
    assert got.numpy().tolist() == oracle


# ------------------------------------------------------------------------------ model and engine

import dataclasses  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from engine_helpers import one_update_weights, run_training  # noqa: E402

from tasks.encoders import bert  # noqa: E402

# Dropout off: identical updates under accumulation/replicas need a deterministic forward pass.
TINY = dataclasses.replace(bert.BertConfig.tiny(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("squad_cache"))


def _tiny_task(cache_dir, **overrides):
    config = dict(encoder=TINY, max_seq_length=128, doc_stride=64, max_examples=48, cache_dir=cache_dir)
    config.update(overrides)
    return squad.SquadTask(squad.SquadConfig(**config))


def test_model_logits_are_float32_masked_and_the_loss_is_mean_start_end_cross_entropy(cache_dir):
    task = _tiny_task(cache_dir)
    task.cut_eval_batches = False  # padded to max_seq_length, so the batch surely has padding to mask
    dataset = task.build_inputs("validation", batch_size=4)
    assert not dataset.options().autotune.enabled  # engine/inputs.prefetched: no autotuning thread to wait for
    features, labels = next(iter(dataset))
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = task.build_model()
        outputs = model(features, training=False)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert outputs["start_logits"].dtype == tf.float32 and outputs["end_logits"].dtype == tf.float32
    padding = features["input_mask"].numpy() == 0
    assert padding.any() and (outputs["start_logits"].numpy()[padding] == -1e9).all()
    assert (np.abs(outputs["end_logits"].numpy()[~padding]) < 100).all()

    def cross_entropy(logits, positions):  # independent numpy computation
        logits = logits.astype(np.float64)
        log_z = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        return log_z - logits[np.arange(len(positions)), positions]
    expected = (cross_entropy(outputs["start_logits"].numpy(), labels["start_positions"].numpy())
                + cross_entropy(outputs["end_logits"].numpy(), labels["end_positions"].numpy())) / 2
    np.testing.assert_allclose(task.per_example_loss(features, labels, outputs).numpy(), expected, rtol=1e-5)


def test_length_grouped_training_batches_give_the_loss_of_full_padding(cache_dir):
    task = _tiny_task(cache_dir, group_by_length=4)
    model = task.build_model()
    batches = list(task.build_inputs("train", batch_size=4).take(8))
    # Each batch is cut to its longest window rounded up to 16, not padded to max_seq_length.
    for features, _ in batches:
        lengths = features["input_mask"].numpy().sum(axis=1)
        assert features["input_word_ids"].shape[1] == min(-(-lengths.max() // 16) * 16, task.config.max_seq_length)
    features, labels = next(b for b in batches if b[0]["input_word_ids"].shape[1] < task.config.max_seq_length)
    width = features["input_word_ids"].shape[1]
    # The answer positions still point inside each window's tokens.
    lengths = features["input_mask"].numpy().sum(axis=1)
    assert (labels["end_positions"].numpy() < lengths).all()
    padded = {k: tf.pad(v, [[0, 0], [0, task.config.max_seq_length - width]]) for k, v in features.items()}
    np.testing.assert_allclose(task.per_example_loss(features, labels, model(features)).numpy(),
                               task.per_example_loss(padded, labels, model(padded)).numpy(), rtol=1e-5, atol=1e-5)


def test_training_under_the_engine_lowers_the_loss_and_scores_with_the_official_rules(cache_dir, tmp_path):
    predictions_dir = str(tmp_path / "predictions")
    trainer = run_training(lambda: _tiny_task(cache_dir, predictions_dir=predictions_dir), global_batch_size=8,
                           train_steps=40, steps_per_loop=10, learning_rate=2e-3, eval_split="validation",
                           eval_batch_size=16)
    losses = [h["loss"] for h in trainer.train_history]
    assert losses[-1] < 0.6 * losses[0], losses
    results = trainer.evaluate("validation")
    assert {"exact_match", "f1", "start_accuracy", "end_accuracy", "loss"} <= set(results)

    # The written predictions, scored by the official script on exactly the evaluated questions,
    # give the in-process numbers.
    with open(os.path.join(predictions_dir, "predictions_validation.json"), encoding="utf-8") as f:
        predictions = json.load(f)
    task = trainer.task
    features, _ = task.features("validation")
    assert set(predictions) == {e.qas_id for e in features.data.examples}
    for example in features.data.examples:
        assert predictions[example.qas_id] in features.data.contexts[example.context_index]
    official = _official_scores(os.path.join(predictions_dir, "predictions_validation.json"), predictions, tmp_path)
    assert results["exact_match"] == pytest.approx(official["exact_match"], abs=1e-9)
    assert results["f1"] == pytest.approx(official["f1"], abs=1e-9)

    # Raw (question, context) pairs through SquadTask.predict (launch/predict.py's path, no cache)
    # give the answers of the evaluation path.
    examples = features.data.examples
    answers = task.predict(trainer.model, [e.question for e in examples],
                           [features.data.contexts[e.context_index] for e in examples])
    assert answers == [predictions[e.qas_id] for e in examples]


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_cut_evaluation_gives_the_answers_and_scores_of_full_padding(cache_dir, tmp_path, strategy):
    """Evaluation windows longest first, each batch cut to its longest (the default off TPU), against the same
    model on the cache's batches in file order padded to max_seq_length."""
    trainers = {}
    for cut in (True, False):
        factory = lambda: squad.SquadTask(dataclasses.replace(  # noqa: E731
            _tiny_task(cache_dir, predictions_dir=str(tmp_path / str(cut))).config), cut_eval_batches=cut)
        trainers[cut] = run_training(factory, global_batch_size=8, train_steps=1, strategy=strategy,
                                     eval_batch_size=8)
    trainers[False].model.set_weights(trainers[True].model.get_weights())
    results = {cut: trainer.evaluate("validation") for cut, trainer in trainers.items()}
    for name in ("exact_match", "f1", "start_accuracy", "end_accuracy"):
        assert results[True][name] == results[False][name], name
    np.testing.assert_allclose(results[True]["loss"], results[False]["loss"], rtol=1e-5)
    predictions = [trainers[cut].task.last_predictions["validation"] for cut in (True, False)]
    assert predictions[0] == predictions[1] and len(set(predictions[0].values())) > 5

    # The batches: the cache's windows longest first (ties in window order), each cut to its longest.
    padded = list(trainers[False].task.build_inputs("validation", batch_size=8))
    masks = np.concatenate([f["input_mask"].numpy() for f, _ in padded])
    order = np.argsort(-masks.sum(1), kind="stable")
    row, widths = 0, set()
    for features, labels in trainers[True].task.build_inputs("validation", batch_size=8):
        rows = order[row:row + len(labels["feature_index"])]
        row += len(rows)
        width = features["input_mask"].shape[1]
        widths.add(width)
        assert width == masks[rows].sum(1).max()
        np.testing.assert_array_equal(labels["feature_index"], rows)  # the cache holds windows in order
        np.testing.assert_array_equal(features["input_mask"], masks[rows, :width])
    assert row == len(masks) and len(widths) > 2 and min(widths) < 128


def _official_scores(predictions_path, predictions, tmp_path) -> dict:
    """evaluate-v1.1.py on the dev questions that have a prediction."""
    with open(DEV_FILE, encoding="utf-8") as f:
        dataset = json.load(f)
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [qa for qa in paragraph["qas"] if qa["id"] in predictions]
    (tmp_path / "subset.json").write_text(json.dumps(dataset), encoding="utf-8")
    run = subprocess.run([sys.executable, OFFICIAL_SCRIPT, str(tmp_path / "subset.json"), str(predictions_path)],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def test_decoding_the_gold_positions_scores_near_100_with_the_official_script(cache_dir, tmp_path):
    """Logits peaked at each window's labelled answer positions, decoded over many overlapping windows
    (short windows, so most questions have several), scored by evaluate-v1.1.py on the written file."""
    task = _tiny_task(cache_dir, max_seq_length=64, doc_stride=24, max_query_length=16, max_examples=120)
    features, _ = task.features("validation")
    assert features.num_features > 4 * len(features.data.examples)
    starts, ends, index = [], [], []
    for _, labels in task.build_inputs("validation", batch_size=64):
        for positions, rows in ((labels["start_positions"], starts), (labels["end_positions"], ends)):
            logits = np.full([len(positions), 64], -10.0, np.float32)
            logits[np.arange(len(positions)), positions.numpy()] = 10.0  # position 0 ([CLS]): not in the window
            rows.append(logits)
        index.append(labels["feature_index"].numpy())
    order = np.random.default_rng(0).permutation(features.num_features)  # rows in any order
    host = {"start_logits": np.concatenate(starts)[order], "end_logits": np.concatenate(ends)[order],
            "feature_index": np.concatenate(index)[order]}
    task.config = dataclasses.replace(task.config, predictions_dir=str(tmp_path))
    results = task.postprocess(host, "validation")
    predictions = task.last_predictions["validation"]
    assert len(predictions) == len(features.data.examples)
    official = _official_scores(tmp_path / "predictions_validation.json", predictions, tmp_path)
    assert results == pytest.approx(official, abs=1e-9)
    assert official["exact_match"] > 95 and official["f1"] > 97, official


def _assert_same_update(reference, other):
    np.testing.assert_allclose(other[0], reference[0], rtol=1e-5)
    for a, b in zip(reference[1], other[1]):
        np.testing.assert_allclose(b, a, atol=2e-6)


def test_grad_accumulation_and_two_replicas_give_the_same_update(cache_dir):
    # In file order: length grouping sorts each replica's share of a window, so its batches depend on the replicas.
    factory = lambda: _tiny_task(cache_dir, max_seq_length=64, doc_stride=32, max_examples=16,  # noqa: E731
                                 group_by_length=0)
    plain = one_update_weights(factory, global_batch_size=8, learning_rate=1e-3)
    _assert_same_update(plain, one_update_weights(factory, global_batch_size=8, grad_accum_steps=2,
                                                  learning_rate=1e-3))
    _assert_same_update(plain, one_update_weights(factory, global_batch_size=8, strategy="mirrored",
                                                  learning_rate=1e-3))
    # Negative control: a different batch (half of it) gives a measurably different update.
    half = one_update_weights(factory, global_batch_size=4, learning_rate=1e-3)
    with pytest.raises(AssertionError):
        _assert_same_update(plain, half)
