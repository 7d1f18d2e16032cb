"""Span question answering on SQuAD v1.1: the Task, and n-best post-processing to answer strings.

The model is an encoder plus one Dense(2) on every token: a start and an end logit, float32 even
under mixed precision, padding masked out. The loss per example is the mean of the start and end
cross-entropies. Evaluation brings every window's logits to the host; `decode_predictions` picks
the best valid span of each question over all its windows and cuts the answer out of the original
context, and `squad_metrics` scores it with the official EM/F1 rules. Data, splits and the feature
cache are in data.py and cache.py (its docstring says why the dev file is split by article).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from engine import inputs
from engine.task import Task
from tasks import encoders, textfiles
from tasks.squad import cache as squad_cache
from tasks.squad import data as squad_data
from tasks.squad import metrics as squad_metrics


@dataclasses.dataclass(frozen=True)
class SquadConfig:
    """SQuAD options; field names double as launch flag names (see tasks/registry.py)."""
    data_dir: str = dataclasses.field(default_factory=textfiles.default_data_dir)
    # Split -> SQuAD v1.1-format JSON ("train", "validation"/"eval"; --train_data, --eval_data). With both, each
    # file is read whole; otherwise the one file given, or squad_file, is split by article (squad_data).
    data_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    squad_file: Optional[str] = None        # the one file to split; default: <data_dir>/squad/dev-v1.1.json
    encoder: encoders.EncoderInit = "minilm"
    vocab_file: Optional[str] = None        # default: the encoder's own vocab
    lower_case: bool = True
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30             # in tokens
    max_examples: Optional[int] = None      # first N questions of each split (small runs and tests)
    cache_dir: Optional[str] = None         # feature cache; default ~/.cache/bert_engine/squad
    predictions_dir: Optional[str] = None   # where postprocess writes predictions_<split>.json ...
    model_dir: Optional[str] = None         # ... default: the run's model_dir; neither set: not written
    shuffle_buffer: int = 10000
    seed: int = 0

    def __post_init__(self):
        if self.squad_file and self.data_files:
            raise ValueError("--squad_file (one file, split by article) or --train_data/--eval_data (a file per "
                             "split), not both")

    @property
    def input_path(self) -> str:
        """The one file split by article when not both a training and an evaluation file are given."""
        files = list(self.data_files.values())
        return self.squad_file or (files[0] if len(files) == 1 else os.path.join(self.data_dir, "squad",
                                                                                  "dev-v1.1.json"))

    def source(self, split: str) -> tuple[str, str]:
        """(file, part of it) that holds `split`: a split's own file whole ("all"), else `split` of input_path."""
        split = squad_data.canonical_split(split)
        files = {squad_data.canonical_split(k): v for k, v in self.data_files.items()}
        if split != "all" and {"train", "eval"} <= set(files):
            return files[split], "all"
        return self.input_path, split

    @property
    def feature_settings(self) -> squad_data.FeatureSettings:
        return squad_data.FeatureSettings(self.max_seq_length, self.doc_stride, self.max_query_length)


def _vocab_file(config: SquadConfig) -> str:
    if config.vocab_file:
        return config.vocab_file
    # Random-init BertConfigs in tests have BERT's 30522-token vocab size: MiniLM's vocab fits them.
    return encoders.vocab_file_for(config.encoder) or encoders.vocab_file_for("minilm")


class SpanLogits(tf_keras.layers.Layer):
    """[batch, seq, 2] token logits + input mask -> float32 start/end logits with padding at -1e9."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")  # softmax over 384 positions wants float32 under mixed precision
        super().__init__(**kwargs)

    def call(self, logits: tf.Tensor, input_mask: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = tf.cast(logits, tf.float32)
        padding = tf.equal(input_mask, 0)
        start, end = tf.unstack(logits, axis=-1)
        return {"start_logits": tf.where(padding, -1e9, start), "end_logits": tf.where(padding, -1e9, end)}


# ----------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------

def max_context_masks(windows: np.ndarray) -> list[np.ndarray]:
    """Per window, whether each of its context tokens has its most context in this window.

    A token in several overlapping windows is scored only where min(left, right) context is largest
    (BERT's `_check_is_max_context`; ties go to the earlier window), so it is not picked from a window
    where it sits at the edge with little context.
    """
    masks: list[Optional[np.ndarray]] = [None] * len(windows)
    by_example: dict[int, list[int]] = {}
    for i, (example_index, *_rest) in enumerate(windows):
        by_example.setdefault(int(example_index), []).append(i)
    for rows in by_example.values():
        num_tokens = max(int(windows[r, 1] + windows[r, 2]) for r in rows)
        best_score = np.full(num_tokens, -np.inf)
        best_row = np.full(num_tokens, -1)
        for r in rows:  # in window order: strict > keeps the earlier window on ties
            start, length = int(windows[r, 1]), int(windows[r, 2])
            positions = np.arange(start, start + length)
            score = np.minimum(positions - start, start + length - 1 - positions) + 0.01 * length
            better = score > best_score[positions]
            best_score[positions[better]] = score[better]
            best_row[positions[better]] = r
        for r in rows:
            start, length = int(windows[r, 1]), int(windows[r, 2])
            masks[r] = best_row[start:start + length] == r
    return masks


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, *, seq_offset: int, doc_len: int,
               is_max_context: np.ndarray, n_best_size: int, max_answer_length: int) -> list[tuple[float, int, int]]:
    """Valid (score, first, last) spans of one window, best first; first/last index its context tokens.

    Candidates are the n-best start and n-best end positions *among context tokens*, so [CLS], the
    question, [SEP] and padding can never be chosen; pairs with last < first, longer than
    `max_answer_length` or starting at a token without max context are dropped.
    """
    starts = np.asarray(start_logits[seq_offset:seq_offset + doc_len], np.float64)
    ends = np.asarray(end_logits[seq_offset:seq_offset + doc_len], np.float64)
    start_candidates = [i for i in np.argsort(-starts, kind="stable")[:n_best_size] if is_max_context[i]]
    end_candidates = np.argsort(-ends, kind="stable")[:n_best_size]
    spans = [(starts[i] + ends[j], int(i), int(j)) for i in start_candidates for j in end_candidates
             if i <= j < i + max_answer_length]
    return sorted(spans, key=lambda s: -s[0])[:n_best_size]


def _exhaustive_best_span(start_logits: np.ndarray, end_logits: np.ndarray, *, seq_offset: int, doc_len: int,
                          is_max_context: np.ndarray, max_answer_length: int) -> Optional[tuple[float, int, int]]:
    """Best valid span by brute force: the fallback when no n-best pair of any window is valid."""
    starts = start_logits[seq_offset:seq_offset + doc_len]
    ends = end_logits[seq_offset:seq_offset + doc_len]
    best = None
    for i in np.nonzero(is_max_context)[0]:
        last = min(doc_len, i + max_answer_length)
        j = i + int(np.argmax(ends[i:last]))
        score = float(starts[i] + ends[j])
        if best is None or score > best[0]:
            best = (score, int(i), int(j))
    return best


def decode_predictions(start_logits: np.ndarray, end_logits: np.ndarray, feature_index: np.ndarray,
                       features: squad_data.SquadFeatures, *, n_best_size: int = 20,
                       max_answer_length: int = 30) -> dict[str, str]:
    """{question id: answer text}: the best-scoring valid span over all windows of each question.

    Rows may come in any order (replicas interleave them): `feature_index` says which window each
    row is. Questions none of whose windows are present get no prediction.
    """
    windows = features.windows
    masks = max_context_masks(windows)
    best: dict[int, tuple[float, int, int, int]] = {}  # example -> (score, window, first, last)
    rows_of_example: dict[int, list[int]] = {}
    for row, window in enumerate(np.asarray(feature_index).tolist()):
        example_index, _, doc_len, seq_offset = (int(v) for v in windows[window])
        rows_of_example.setdefault(example_index, []).append(row)
        spans = best_spans(start_logits[row], end_logits[row], seq_offset=seq_offset, doc_len=doc_len,
                           is_max_context=masks[window], n_best_size=n_best_size, max_answer_length=max_answer_length)
        if spans and (example_index not in best or spans[0][0] > best[example_index][0]):
            best[example_index] = (spans[0][0], window, spans[0][1], spans[0][2])
    for example_index, rows in rows_of_example.items():
        if example_index in best:
            continue
        for row in rows:
            window = int(feature_index[row])
            span = _exhaustive_best_span(start_logits[row], end_logits[row], seq_offset=int(windows[window, 3]),
                                         doc_len=int(windows[window, 2]), is_max_context=masks[window],
                                         max_answer_length=max_answer_length)
            if span and (example_index not in best or span[0] > best[example_index][0]):
                best[example_index] = (span[0], window, span[1], span[2])
    predictions = {}
    for example_index, (_, window, first, last) in best.items():
        example = features.data.examples[example_index]
        tokens = features.context_tokens[example.context_index]
        doc_start = int(windows[window, 1])
        context = features.data.contexts[example.context_index]
        predictions[example.qas_id] = context[tokens.char_start[doc_start + first]:tokens.char_end[doc_start + last]]
    return predictions


# ----------------------------------------------------------------------------------------------
# The Task
# ----------------------------------------------------------------------------------------------

class SquadTask(Task):
    """Extractive QA: start/end logits over `[CLS] question [SEP] context [SEP]` windows."""
    name = "squad"

    def __init__(self, config: SquadConfig = SquadConfig()):
        self.config = config
        self.vocab_file = _vocab_file(config)
        self._features: dict[str, tuple[squad_data.SquadFeatures, str]] = {}
        self.last_predictions: dict[str, dict[str, str]] = {}

    def features(self, split: str) -> tuple[squad_data.SquadFeatures, str]:
        """(features, TFRecord path) of a split, from the cache when it has them."""
        split = squad_data.canonical_split(split)
        if split not in self._features:
            cfg = self.config
            path, part = cfg.source(split)
            features, record_path = squad_cache.cached_features(
                path, part, vocab_file=self.vocab_file, lower_case=cfg.lower_case,
                settings=cfg.feature_settings, cache_dir=cfg.cache_dir, max_examples=cfg.max_examples)
            self._features[split] = features, record_path
            num_articles = features.data.num_articles
            articles = squad_data.split_articles(part, num_articles, path)
            shown = (f"all {num_articles} articles" if part == "all" else
                     f"articles {articles.start + 1}-{articles.stop} of {num_articles} (one file split by article)")
            print(f"squad | {split}: {path}, {shown}: {len(features.data.examples)} questions, "
                  f"{features.num_features} windows", flush=True)
        return self._features[split]

    def num_examples(self, split: str) -> int:
        """Windows (not questions) in a split: what one epoch of training steps over."""
        return self.features(split)[0].num_features

    def build_model(self) -> tf_keras.Model:
        inputs = {name: tf_keras.layers.Input([None], dtype=tf.int32, name=name)
                  for name in ("input_word_ids", "input_mask", "input_type_ids")}
        encoder, _ = encoders.make_encoder(self.config.encoder)
        sequence_output = encoder(inputs)["sequence_output"]
        token_logits = tf_keras.layers.Dense(
            2, name="span_logits", kernel_initializer=tf_keras.initializers.TruncatedNormal(stddev=0.02))(
                sequence_output)
        outputs = SpanLogits(name="masked_span_logits")(token_logits, inputs["input_mask"])
        return tf_keras.Model(inputs, outputs, name="span_labeler")

    def build_inputs(self, split: str, *, batch_size: int,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        _, record_path = self.features(split)
        dataset = tf.data.TFRecordDataset(record_path)
        # Batch, then parse the whole batch in one op: cheaper than parsing record by record.
        dataset = inputs.shard_shuffle_batch(
            dataset, training=squad_data.canonical_split(split) == "train", batch_size=batch_size,
            input_context=input_context, shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed)
        dataset = dataset.map(squad_cache.parse_batch_fn(self.config.max_seq_length),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def per_example_loss(self, features, labels, outputs) -> tf.Tensor:
        start = tf.nn.sparse_softmax_cross_entropy_with_logits(labels["start_positions"], outputs["start_logits"])
        end = tf.nn.sparse_softmax_cross_entropy_with_logits(labels["end_positions"], outputs["end_logits"])
        return (start + end) / 2.0

    def example_weights(self, features, labels) -> tf.Tensor:
        return tf.ones(tf.shape(labels["start_positions"]), tf.float32)

    def build_metrics(self) -> Sequence[tf_keras.metrics.Metric]:
        return [tf_keras.metrics.Accuracy(name="start_accuracy"), tf_keras.metrics.Accuracy(name="end_accuracy")]

    def update_metrics(self, metrics, features, labels, outputs, mask) -> None:
        for metric in metrics:
            which = "start" if metric.name == "start_accuracy" else "end"
            predicted = tf.argmax(outputs[f"{which}_logits"], axis=-1, output_type=tf.int32)
            metric.update_state(labels[f"{which}_positions"], predicted, sample_weight=mask)

    def eval_outputs(self, features, labels, outputs) -> Mapping[str, tf.Tensor]:
        return {"start_logits": outputs["start_logits"], "end_logits": outputs["end_logits"],
                "feature_index": labels["feature_index"]}

    def postprocess(self, host_outputs: Mapping[str, np.ndarray], split: str, *, write_files: bool = True) -> dict:
        """Official EM/F1 of the split's questions, from the gathered window logits."""
        features, _ = self.features(split)
        predictions = decode_predictions(
            host_outputs["start_logits"], host_outputs["end_logits"], host_outputs["feature_index"], features,
            n_best_size=self.config.n_best_size, max_answer_length=self.config.max_answer_length)
        self.last_predictions[split] = predictions
        predictions_dir = self.config.predictions_dir or self.config.model_dir
        if predictions_dir and write_files:
            write_predictions(os.path.join(predictions_dir, f"predictions_{split}.json"), predictions)
        gold = {e.qas_id: [text for text, _ in e.answers] for e in features.data.examples}
        return squad_metrics.evaluate(gold, predictions)

    def serving_module(self, model: tf_keras.Model) -> tf.Module:
        """Raw strings in, this Task's answer out (see tasks/squad/serving.py)."""
        from tasks.squad.serving import SquadServing  # noqa: PLC0415 - tensorflow-text ops load only for an export
        return SquadServing(self, model)

    def predict(self, model: tf_keras.Model, questions: Sequence[str], contexts: Sequence[str], *,
                batch_size: int = 16) -> list[str]:
        """Answers raw (question, context) pairs with a trained model; no cache, no labels needed."""
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        data = squad_data.data_from_pairs(questions, contexts)
        features = squad_data.build_features(
            data, squad_data.OffsetTokenizer(self.vocab_file, lower_case=self.config.lower_case),
            self.config.feature_settings)
        inputs = {k: features.arrays[k] for k in ("input_word_ids", "input_mask", "input_type_ids")}
        starts, ends = [], []
        for begin in range(0, features.num_features, batch_size):
            out = model({k: v[begin:begin + batch_size] for k, v in inputs.items()}, training=False)
            starts.append(out["start_logits"].numpy())
            ends.append(out["end_logits"].numpy())
        predictions = decode_predictions(
            np.concatenate(starts), np.concatenate(ends), features.arrays["feature_index"], features,
            n_best_size=self.config.n_best_size, max_answer_length=self.config.max_answer_length)
        return [predictions[e.qas_id] for e in data.examples]


def write_predictions(path: str, predictions: Mapping[str, str]) -> None:
    """The official {question id: answer} JSON that evaluate-v1.1.py reads."""
    if os.path.dirname(path):
        tf.io.gfile.makedirs(os.path.dirname(path))  # gfile: model_dir may be gs://
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(predictions, ensure_ascii=False))
    logging.info("wrote %d predictions to %s", len(predictions), path)
