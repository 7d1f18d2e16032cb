"""Sentence (pair) classification from TSV files: SST-2-style sentiment and any GLUE-like task.

Binary tasks may use a single sigmoid logit (as in the TF Hub blog post) or a softmax; multi-class
tasks use a softmax. Tokenization happens inside tf.data with tensorflow-text.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from engine import inputs
from engine.task import Task
from tasks import textfiles
from tasks.encoders import bert, loading
from tasks.encoders.tokenization import WordPieceTokenizer


# The options (help texts and launch flags with them) live in a light module, so launch reads them without
# TensorFlow; imported here so `tasks.classification.task.ClassificationConfig` keeps working.
from tasks.classification.config import ClassificationConfig  # noqa: E402,F401  pylint: disable=wrong-import-position


class MaskedMeanPooling(tf_keras.layers.Layer):
    """[B, T, H] token vectors, [B, T] mask -> [B, H]: the mean over the tokens the mask keeps."""

    def call(self, sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        weights = tf.cast(mask, sequence.dtype)[:, :, tf.newaxis]
        total = tf.reduce_sum(sequence * weights, axis=1)
        return total / tf.maximum(tf.reduce_sum(weights, axis=1), tf.cast(1.0, sequence.dtype))


@dataclasses.dataclass(frozen=True)
class Examples:
    texts: tuple          # one tuple of strings per text column
    labels: np.ndarray    # int32 class ids, -1 where the file has no label column


def read_tsv(path: str, config: ClassificationConfig, *, require_labels: bool = True) -> Examples:
    """Reads a headed TSV; every problem is reported with the file and line number (InputError).

    Fields are split at tabs, with no quoting (as GLUE's TSVs are written): not the csv module, whose
    131,072-character field limit would refuse a long document. A BOM and CRLF line ends are dropped."""
    lines = textfiles.read_lines(path, missing="--train_data/--eval_data")
    first = next(lines, None)
    header = first[1].split("\t") if first and first[1] else None
    if not header:
        raise textfiles.InputError(path, 1, "empty file, expected a header line with columns "
                                   f"{list(config.text_columns) + [config.label_column]}")
    columns = {name: i for i, name in enumerate(header)}
    missing = [c for c in config.text_columns if c not in columns]
    has_labels = config.label_column in columns
    if require_labels and not has_labels:
        missing.append(config.label_column)
    if missing:
        raise textfiles.InputError(path, 1, f"missing column(s) {missing}; the header has {header}")
    label_ids = _label_ids(config)
    texts = [[] for _ in config.text_columns]
    labels = []
    for line, text in lines:
        if not text:
            continue
        row = text.split("\t")
        if len(row) != len(header):
            raise textfiles.InputError(path, line, f"{len(row)} fields, the header has {len(header)}")
        for column, values in zip(config.text_columns, texts):
            values.append(row[columns[column]])
        labels.append(_parse_label(row[columns[config.label_column]], label_ids, config, path, line)
                      if has_labels else -1)
    if not labels:
        raise textfiles.InputError(path, None, "no examples after the header")
    return Examples(tuple(tuple(t) for t in texts), np.asarray(labels, np.int32))


def _label_ids(config: ClassificationConfig) -> dict[str, int]:
    """Label string -> class id: the label names, and also the ids "0", "1", ... as strings unless a name is
    itself an integer (then "1" could mean either). So integer-labelled files such as GLUE's SST-2 can be given
    names, which predictions and the serving export answer with."""
    ids = {name: i for i, name in enumerate(config.label_names)}
    if ids and not any(_is_int(name) for name in ids):
        ids.update({str(i): i for i in range(len(ids))})
    return ids


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _parse_label(value: str, label_ids: Mapping[str, int], config: ClassificationConfig, path: str,
                 line: int) -> int:
    value = value.strip()
    if label_ids:
        if value not in label_ids:
            raise textfiles.InputError(path, line, f"unknown label {value!r}; expected one of "
                                       f"{list(config.label_names)}")
        return label_ids[value]
    if not _is_int(value):
        raise textfiles.InputError(path, line, f"label {value!r} is not an integer (pass label names for string "
                                   "labels)")
    label = int(value)
    if not 0 <= label < config.num_classes:
        raise textfiles.InputError(path, line, f"label {label} is outside 0..{config.num_classes - 1}")
    return label


# Training batches (group_by_length) are cut to their longest sequence rounded up to this: the widths of
# engine.inputs.bucket_widths, so a compiled step traces (and XLA compiles) at most once per width. Evaluation
# batches round up to Task.eval_width_multiple (1 unless the eval step is XLA-compiled).
BUCKET_MULTIPLE = 16
# `predict` and the serving signature pad each batch to its longest sequence rounded up to this (one trace with
# open shapes: any width costs nothing extra).
PREDICT_WIDTH_MULTIPLE = 1
# `predict` tokenizes and sorts this many batches at a time: memory stays bounded on large inputs.
PREDICT_WINDOW_BATCHES = 64


class ClassificationTask(Task):
    name = "classification"
    autograph = False  # control flow as TensorFlow ops only (Task.autograph)

    def __init__(self, config: ClassificationConfig, *, cut_eval_batches: Optional[bool] = None):
        """cut_eval_batches: evaluation, `predict` and serving batches are cut to their longest sequence (rounded
        up to Task.eval_width_multiple or PREDICT_WIDTH_MULTIPLE) instead of padded to max_seq_length: the same outputs,
        less work on short sentences. None: yes, unless the model was built under a TPU strategy (static shapes)."""
        self.config = config
        self.cut_eval_batches = cut_eval_batches
        self._examples: dict[str, Examples] = {}
        self._encoded: dict[str, tuple] = {}   # evaluation split -> (features padded to max_seq_length, labels)
        self._encoder = None
        self._tokenizer: Optional[WordPieceTokenizer] = None
        self._predict_encode = None   # (number of text columns, the traced tokenize)

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        if self._tokenizer is None:
            self._tokenizer = loading.tokenizer_for(self.config)
        return self._tokenizer

    def examples(self, split: str) -> Examples:
        if split not in self._examples:
            if split not in self.config.data_files:
                raise ValueError(f"no data file for split {split!r}; have {sorted(self.config.data_files)}")
            self._examples[split] = read_tsv(self.config.data_files[split], self.config)
        return self._examples[split]

    def num_examples(self, split: str) -> int:
        return len(self.examples(split).labels)

    # ------------------------------------------------------------------------------------ model

    def build_model(self) -> tf_keras.Model:
        # The engine builds the model inside its strategy's scope: the one moment a Task sees the device kind.
        self.note_build_device()
        cls_only = self.config.pooling == "cls" and self.config.last_layer_cls_only
        encoder, _ = loading.make_encoder(self.config.encoder, output_range=1 if cls_only else None)
        self._encoder = encoder
        inputs = {name: tf_keras.layers.Input([None], dtype=tf.int32, name=name)
                  for name in ("input_word_ids", "input_mask", "input_type_ids")}
        outputs = encoder(inputs)
        if self.config.pooling == "mean":
            pooled = MaskedMeanPooling(name="mean_pooling")(outputs["sequence_output"], inputs["input_mask"])
        else:
            pooled = outputs["pooled_output"]
        pooled = tf_keras.layers.Dropout(self.config.dropout)(pooled)
        units = 1 if self.config.head == "sigmoid" else self.config.classes
        # float32 logits under mixed precision: softmax/sigmoid and the loss need the range.
        logits = tf_keras.layers.Dense(
            units, dtype="float32", name="logits",
            kernel_initializer=tf_keras.initializers.TruncatedNormal(stddev=0.02))(pooled)
        return tf_keras.Model(inputs, logits, name="classifier")

    def train_flops_per_example(self) -> Optional[float]:
        # Batches cut to their longest sequence have no fixed cost per example: no MFU then.
        if self._encoder is None or self.config.group_by_length:
            return None
        return bert.bert_train_flops_per_example(self._encoder, self.config.max_seq_length)

    # ------------------------------------------------------------------------------------ input

    def encoded(self, split: str) -> tuple[dict, np.ndarray]:
        """An evaluation split tokenized once (eagerly, in chunks), padded to max_seq_length: (features, labels).

        Evaluation reads the same sentences every time, as HF users' pre-tokenized eval datasets: tokenizing
        them again in a new tf.data graph per evaluation took seconds of tracing and iterator setup, more than
        the encoder's work on a small dev set."""
        if split not in self._encoded:
            examples = self.examples(split)
            chunks = []
            for start in range(0, len(examples.labels), 1024):
                texts = [tf.constant(list(t[start:start + 1024]), tf.string) for t in examples.texts]
                chunks.append({k: v.numpy() for k, v in self.tokenizer.encode(*texts).items()})
            features = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
            self._encoded[split] = (features, examples.labels)
        return self._encoded[split]

    def build_inputs(self, split: str, *, batch_size: int,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        if split != "train":
            features, labels = self.encoded(split)
            if self.cuts_batches:
                # Longest first, so each cut batch holds similar lengths: fewer tokens for the same metrics
                # (they are sums over examples; only the loss's float rounding depends on the order).
                order = inputs.longest_first(features["input_mask"])
                features, labels = {k: v[order] for k, v in features.items()}, labels[order]
            dataset = tf.data.Dataset.from_tensor_slices((features, labels))
            dataset = inputs.shard_shuffle_batch(
                dataset, training=False, batch_size=batch_size, input_context=input_context,
                shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed)
            if self.cuts_batches:
                dataset = inputs.cut_batches_to_longest(dataset, length_key="input_mask",
                                                        multiple=self.eval_width_multiple)
            return inputs.prefetched(dataset)
        examples = self.examples(split)
        # Created here, eagerly: built inside the map function, its vocab table would belong to that graph.
        tokenizer = self.tokenizer

        def encode(*texts_and_label):
            *texts, label = texts_and_label
            return tokenizer.encode(*texts), label

        dataset = tf.data.Dataset.from_tensor_slices(tuple(list(t) for t in examples.texts) + (examples.labels,))
        # Batch first: tensorflow-text tokenizes a whole batch per call, much faster than per example.
        dataset = inputs.batches(
            dataset, training=True, batch_size=batch_size, window_batches=self.config.group_by_length,
            input_context=input_context, shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed,
            decode=self.unconverted(encode), multiple=BUCKET_MULTIPLE)
        return inputs.prefetched(dataset)

    # ------------------------------------------------------------------------------------ loss

    def per_example_loss(self, features, labels, outputs) -> tf.Tensor:
        logits = tf.cast(outputs, tf.float32)
        if self.config.head == "sigmoid":
            return tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=logits[:, 0])
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)

    def example_weights(self, features, labels) -> tf.Tensor:
        if not self.config.class_weights:
            return tf.ones(tf.shape(labels), tf.float32)
        return tf.gather(tf.constant(self.config.class_weights, tf.float32), labels)

    def probabilities(self, logits: tf.Tensor) -> tf.Tensor:
        """[batch, classes] probabilities for either head."""
        logits = tf.cast(logits, tf.float32)
        if self.config.head == "sigmoid":
            p = tf.sigmoid(logits[:, 0])
            return tf.stack([1.0 - p, p], axis=-1)
        return tf.nn.softmax(logits, axis=-1)

    # ------------------------------------------------------------------------------------ metrics

    def build_metrics(self) -> Sequence[tf_keras.metrics.Metric]:
        metrics = [tf_keras.metrics.Accuracy(name="accuracy")]
        if self.config.classes == 2:
            # F1 of the positive class (label id 1).
            f1 = tf_keras.metrics.F1Score(average="micro", threshold=0.5, name="f1")
            # Built now (it takes [n, 1] columns, see update_metrics), not at its first update: a first trace of
            # the eval step that creates variables makes tf.function trace it again, ~2 s for MiniLM.
            f1.build((None, 1), (None, 1))
            metrics.append(f1)
        return metrics

    def update_metrics(self, metrics, features, labels, outputs, mask) -> None:
        predictions = tf.argmax(self.probabilities(outputs), axis=-1, output_type=tf.int32)
        for metric in metrics:
            if metric.name == "f1":
                as_column = lambda t: tf.cast(t, tf.float32)[:, None]  # noqa: E731
                metric.update_state(as_column(labels), as_column(predictions), sample_weight=mask)
            else:
                metric.update_state(labels, predictions, sample_weight=mask)

    # ------------------------------------------------------------------------------------ predict

    def serving_module(self, model: tf_keras.Model) -> tf.Module:
        """Raw strings in, this Task's answer out (see tasks/classification/serving.py)."""
        from tasks.classification.serving import ClassificationServing  # noqa: PLC0415 - tensorflow-text ops load only for an export
        return ClassificationServing(self, model)

    def predict(self, model: tf_keras.Model, *texts: Sequence[str], batch_size: int = 64) -> tuple[list, np.ndarray]:
        """Raw sentences (or pairs: two lists) -> (labels as `config.answer_labels`, [n, classes] probabilities).

        The sentences are tokenized a window at a time and run longest first, in batches cut to their longest
        sentence (as evaluation does); the answers come back in input order. A row's answer does not depend on
        its batch: padding is masked."""
        encode = self._predict_tokenize(len(texts))
        cut = (lambda batch: inputs.cut_to_longest(
            batch, (), length_key="input_mask", full_length=batch["input_mask"].shape[1],
            multiple=PREDICT_WIDTH_MULTIPLE)[0]) if self.cuts_batches else None
        rows_done, answers = [], []
        window = batch_size * PREDICT_WINDOW_BATCHES
        for start in range(0, len(texts[0]), window):
            features = encode(*[tf.constant(list(t[start:start + window]), tf.string) for t in texts])
            features = {k: v.numpy() for k, v in features.items()}
            forward = self.traced_model_call(model, features)
            for rows, batch in inputs.longest_first_batches(features, batch_size, cut=cut):
                rows_done.append(start + rows)
                answers.append(self.probabilities(forward(batch)).numpy())
        if not answers:  # no sentences: no answers ([0, 2] for a sigmoid head, as its probabilities have 2 columns)
            return [], np.zeros([0, max(self.config.classes, 2)], np.float32)
        probabilities = np.empty([len(texts[0]), answers[0].shape[1]], np.float32)
        probabilities[np.concatenate(rows_done)] = np.concatenate(answers)
        ids = probabilities.argmax(-1)
        return [self.config.answer_labels[i] for i in ids], probabilities

    def _predict_tokenize(self, num_texts: int):
        """strings -> features, traced once for any batch size (shapes left open); cached per number of text
        columns. The model's forward pass is `Task.traced_model_call`."""
        if self._predict_encode is None or self._predict_encode[0] != num_texts:
            tokenizer = self.tokenizer  # its vocab table: created eagerly, not inside the trace
            encode = tf.function(lambda *texts: tokenizer.encode(*texts, pad_to_multiple=self.predict_pad_to_multiple),
                                 input_signature=[tf.TensorSpec([None], tf.string)] * num_texts,
                                 autograph=self.autograph)
            self._predict_encode = (num_texts, encode)
        return self._predict_encode[1]

    @property
    def predict_pad_to_multiple(self) -> Optional[int]:
        """`tokenizer.encode`'s pad_to_multiple for `predict` and the serving signature (None: max_seq_length)."""
        return PREDICT_WIDTH_MULTIPLE if self.cuts_batches else None
