"""Span question answering on SQuAD v1.1: the Task, and n-best post-processing to answer strings.

The model is an encoder plus one Dense(2) on every token: a start and an end logit, float32 even
under mixed precision, padding masked out. The loss per example is the mean of the start and end
cross-entropies. Evaluation brings every window's logits to the host; `decode_predictions` picks
the best valid span of each question over all its windows with decoding.py (the same TensorFlow
function the serving export runs in its graph) and cuts the answer out of the original context, and
`squad_metrics` scores it with the official EM/F1 rules. Data, splits and the feature
cache are in data.py and cache.py (its docstring says why the dev file is split by article).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from engine import inputs
from engine.task import Task
from tasks.encoders import loading
from tasks.squad import cache as squad_cache
from tasks.squad import data as squad_data
from tasks.squad import decoding
from tasks.squad import metrics as squad_metrics


# The options (help texts and launch flags with them) live in a light module, so launch reads them without
# TensorFlow; imported here so `tasks.squad.task.SquadConfig` keeps working.
from tasks.squad.config import SquadConfig  # noqa: E402,F401  pylint: disable=wrong-import-position


def _vocab_file(config: SquadConfig) -> str:
    if config.vocab_file:
        return config.vocab_file
    # Random-init BertConfigs in tests have BERT's 30522-token vocab size: MiniLM's vocab fits them.
    return loading.vocab_file_for(config.encoder) or loading.vocab_file_for("minilm")


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

def decode_predictions(start_logits: np.ndarray, end_logits: np.ndarray, feature_index: np.ndarray,
                       features: squad_data.SquadFeatures, *, n_best_size: int = 20,
                       max_answer_length: int = 30) -> dict[str, str]:
    """{question id: answer text}: each question's best valid span over its windows (squad/decoding.py).

    Rows may come in any order (replicas interleave them): `feature_index` says which window each
    row is; they are put back in window order, which decides ties. Questions none of whose windows
    are present get no prediction.
    """
    feature_index = np.asarray(feature_index)
    order = np.argsort(feature_index, kind="stable")
    windows = features.windows[feature_index[order]]
    num_examples = len(features.data.examples)
    all_windows = tf.constant(features.windows)
    is_max_context = tf.gather(decoding.max_context(  # max context among all windows of the split
        all_windows[:, 0], all_windows[:, 1], all_windows[:, 2], num_examples, np.shape(start_logits)[1]),
        feature_index[order])
    spans = decoding.best_spans(
        tf.constant(np.asarray(start_logits)[order]), tf.constant(np.asarray(end_logits)[order]),
        window_example=windows[:, 0], doc_start=windows[:, 1], doc_len=windows[:, 2], seq_offset=windows[:, 3],
        num_examples=num_examples, n_best_size=n_best_size, max_answer_length=max_answer_length,
        is_max_context=is_max_context)
    predictions = {}
    firsts, lasts = spans.first.numpy().tolist(), spans.last.numpy().tolist()
    for example_index in np.flatnonzero(spans.found.numpy()):
        example = features.data.examples[example_index]
        tokens = features.context_tokens[example.context_index]
        first, last = firsts[example_index], lasts[example_index]
        context = features.data.contexts[example.context_index]
        predictions[example.qas_id] = context[tokens.char_start[first]:tokens.char_end[last]]
    return predictions


# ----------------------------------------------------------------------------------------------
# The Task
# ----------------------------------------------------------------------------------------------

class SquadTask(Task):
    """Extractive QA: start/end logits over `[CLS] question [SEP] context [SEP]` windows."""

    name = "squad"
    autograph = False  # control flow as TensorFlow ops only (Task.autograph)

    def __init__(self, config: SquadConfig = SquadConfig(), *, cut_eval_batches: Optional[bool] = None):
        """cut_eval_batches: see engine.task.Task (None: cut unless the model was built for a TPU)."""
        self.config = config
        self.cut_eval_batches = cut_eval_batches
        self.vocab_file = _vocab_file(config)
        self._features: dict[str, tuple[squad_data.SquadFeatures, str]] = {}
        self._eval_windows: dict[str, tuple[dict, dict]] = {}  # split -> its parsed windows (features, labels)
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
        self.note_build_device()
        inputs = {name: tf_keras.layers.Input([None], dtype=tf.int32, name=name)
                  for name in ("input_word_ids", "input_mask", "input_type_ids")}
        encoder, _ = loading.make_encoder(self.config.encoder)
        sequence_output = encoder(inputs)["sequence_output"]
        token_logits = tf_keras.layers.Dense(
            2, name="span_logits", kernel_initializer=tf_keras.initializers.TruncatedNormal(stddev=0.02))(
                sequence_output)
        outputs = SpanLogits(name="masked_span_logits")(token_logits, inputs["input_mask"])
        return tf_keras.Model(inputs, outputs, name="span_labeler")

    def build_inputs(self, split: str, *, batch_size: int,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        if squad_data.canonical_split(split) != "train" and self.cuts_batches:
            # Longest first, each batch cut to its longest window: a dev window fills 46 % of the 384 positions
            # on average (178; 1,000 dev questions). Postprocess puts rows back by feature_index, and the
            # metrics are sums: same results.
            features, labels = self.eval_windows(split)
            order = inputs.longest_first(features["input_mask"])
            dataset = tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda v: v[order], (features, labels)))
            dataset = inputs.cut_batches_to_longest(dataset.batch(batch_size), length_key="input_mask",
                                                    multiple=self.eval_width_multiple)
            return inputs.prefetched(dataset)
        _, record_path = self.features(split)
        dataset = tf.data.TFRecordDataset(record_path)
        training = squad_data.canonical_split(split) == "train"
        # Batch, then parse the whole batch in one op: cheaper than parsing record by record. Grouped by length,
        # batches are cut to their longest window: positions stay valid (an answer, or [CLS] for none, lies
        # inside its window's tokens) and only padding is cut.
        dataset = inputs.batches(
            dataset, training=training, batch_size=batch_size, window_batches=self.config.group_by_length,
            input_context=input_context, shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed,
            decode=self.unconverted(squad_cache.parse_batch_fn(self.config.max_seq_length)))
        return inputs.prefetched(dataset)

    def eval_windows(self, split: str) -> tuple[dict, dict]:
        """A split's windows read from the cache once, as NumPy (features, labels), for sorting by length.

        In memory: 10,833 dev windows at seq 384 are 50 MB, as the TFRecord they come from."""
        split = squad_data.canonical_split(split)
        if split not in self._eval_windows:
            _, record_path = self.features(split)
            batches = tf.data.TFRecordDataset(record_path).batch(1024).map(
                squad_cache.parse_batch_fn(self.config.max_seq_length))
            parts = [tf.nest.map_structure(lambda t: t.numpy(), batch) for batch in batches]
            self._eval_windows[split] = tf.nest.map_structure(lambda *p: np.concatenate(p), *parts)
        return self._eval_windows[split]

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
        # Back to max_seq_length (padding logits are -1e9, as SpanLogits masks them): cut batches of different
        # widths concatenate on the host.
        padded = {name: tf.pad(outputs[name], [[0, 0], [0, self.config.max_seq_length - tf.shape(outputs[name])[1]]],
                               constant_values=-1e9) for name in ("start_logits", "end_logits")}
        return {**padded, "feature_index": labels["feature_index"]}

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
        windows = {k: features.arrays[k] for k in ("input_word_ids", "input_mask", "input_type_ids")}
        # As evaluation: longest first, each batch cut to its longest window, one traced forward pass; the
        # logits go back to their rows, padded to max_seq_length with SpanLogits' -1e9.
        seq_length = self.config.max_seq_length
        starts = np.full([features.num_features, seq_length], -1e9, np.float32)
        ends = starts.copy()
        cut = (lambda batch: inputs.cut_to_longest(batch, (), length_key="input_mask", full_length=seq_length,
                                                   multiple=1)[0]) if self.cuts_batches else None
        forward = self.traced_model_call(model, windows)
        for rows, batch in inputs.longest_first_batches(windows, batch_size, cut=cut):
            out = forward(batch)
            width = out["start_logits"].shape[1]
            starts[rows, :width], ends[rows, :width] = out["start_logits"].numpy(), out["end_logits"].numpy()
        predictions = decode_predictions(
            starts, ends, features.arrays["feature_index"], features,
            n_best_size=self.config.n_best_size, max_answer_length=self.config.max_answer_length)
        return [predictions[e.qas_id] for e in data.examples]


def write_predictions(path: str, predictions: Mapping[str, str]) -> None:
    """The official {question id: answer} JSON that evaluate-v1.1.py reads."""
    if os.path.dirname(path):
        tf.io.gfile.makedirs(os.path.dirname(path))  # gfile: model_dir may be gs://
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(predictions, ensure_ascii=False))
    logging.info("wrote %d predictions to %s", len(predictions), path)
