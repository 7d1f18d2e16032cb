"""Sequence tagging (CoNLL-2003 NER): a BERT encoder, first-sub-token word features, a CRF or softmax head.

The encoder runs on sub-tokens; each word's first sub-token is gathered to word positions, so the
tag head and the CRF run over words, exactly the units conlleval scores. Both heads' per-example
loss is a SUM over the words of the window (CRF: -log p(tag path); softmax: summed token cross
entropy), so the two are on the same scale and the engine's weighted mean is over windows.

Evaluation decodes in the model (Viterbi for the CRF), brings predicted word tags to the host,
stitches windows back into sentences and scores them with a port of conlleval.pl; entity
precision/recall/F1 are in percent, like conlleval prints them and papers report them.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from engine import inputs
from engine.task import Task
from tasks import textfiles
from tasks.encoders import loading
from tasks.encoders.tokenization import WordPieceTokenizer
from tasks.ner import conll, crf, decoding, span_metrics

ENCODER_INPUTS = ("input_word_ids", "input_mask", "input_type_ids")
SUB_TOKEN_ARRAYS = ENCODER_INPUTS + ("input_case_ids",)    # [N, max_seq_length]
WORD_ARRAYS = ("word_positions", "word_mask", "owned_mask")  # [N, words_per_window], as the labels (tags)
SPLIT_FILES = {"train": "train.txt", "validation": "valid.txt", "valid": "valid.txt", "dev": "valid.txt",
               "test": "test.txt"}



# The options (help texts and launch flags with them) live in a light module, so launch reads them without
# TensorFlow; imported here so `tasks.ner.task.TaggingConfig` keeps working.
from tasks.ner.config import TaggingConfig  # noqa: E402,F401  pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    sentences: list                               # conll.Sentence, in file order
    arrays: Mapping[str, np.ndarray]              # conll.encode_sentences output
    sources: list                                 # conll.WindowSource per window


@dataclasses.dataclass(frozen=True)
class Entity:
    text: str
    type: str
    start: int                                    # character offsets into the input text, end exclusive
    end: int


def uses_casing_features(config: TaggingConfig, encoder: tf_keras.layers.Layer) -> bool:
    if config.casing_features is not None:
        return config.casing_features
    return config.lower_case and hasattr(encoder, "get_embedding_layer")


class TaggingModel(tf_keras.Model):
    """[+ word shapes] encoder -> gather first sub-tokens -> dropout -> Dense emissions (float32) [-> CRF decode].

    Outputs {"logits": [B, W, K] float32}; when not training also {"tags": [B, W] int32}, decoded
    in the model so evaluation and export get Viterbi in the same (optionally XLA) function.
    """

    def __init__(self, encoder: tf_keras.layers.Layer, config: TaggingConfig, **kwargs):
        super().__init__(name="tagger", **kwargs)
        self.encoder = encoder
        self.case_embedding = None
        if uses_casing_features(config, encoder):
            if not hasattr(encoder, "get_embedding_layer"):
                raise ValueError(f"casing_features needs a Model Garden encoder that accepts input embeddings, "
                                 f"not {type(encoder).__name__}; set --casing_features=false")
            self.case_embedding = tf_keras.layers.Embedding(
                conll.NUM_SHAPES, int(encoder.get_embedding_table().shape[-1]), embeddings_initializer="zeros",
                name="case_embedding")
        self.dropout = tf_keras.layers.Dropout(config.dropout)
        self.emissions = tf_keras.layers.Dense(
            len(config.labels), name="emissions", kernel_initializer=tf_keras.initializers.TruncatedNormal(stddev=0.02))
        self.crf = None
        if config.head == "crf":
            allowed, allowed_start = crf.iob2_constraints(config.labels) if config.iob2_constraints else (None, None)
            self.crf = crf.CRF(len(config.labels), allowed_transitions=allowed, allowed_start=allowed_start, name="crf")
            self.crf.build([None, None, len(config.labels)])

    def call(self, features: Mapping[str, tf.Tensor], training=None) -> dict:
        encoder_inputs = {k: features[k] for k in ENCODER_INPUTS}
        if self.case_embedding is not None:
            encoder_inputs["input_word_embeddings"] = (self.encoder.get_embedding_layer()(features["input_word_ids"])
                                                       + self.case_embedding(features["input_case_ids"]))
        sequence = self.encoder(encoder_inputs, training=training)["sequence_output"]
        words = tf.gather(sequence, features["word_positions"], batch_dims=1)
        # float32 logits under mixed precision: the CRF sums them over a sentence, the softmax needs range.
        logits = tf.cast(self.emissions(self.dropout(words, training=training)), tf.float32)
        outputs = {"logits": logits}
        if not training:
            outputs["tags"] = self.decode(features, logits)
        return outputs

    def decode(self, features: Mapping[str, tf.Tensor], logits: tf.Tensor) -> tf.Tensor:
        """Predicted tag ids [B, W] (0 = "O" on padding words)."""
        mask = tf.cast(features["word_mask"], tf.bool)
        if self.crf is None:
            tags = tf.argmax(logits, axis=-1, output_type=tf.int32)
            return tf.where(mask, tags, tf.zeros_like(tags))
        return self.crf.decode(logits, mask, starts_sentence=features["starts_sentence"],
                               ends_sentence=features["ends_sentence"])


class TaggingTask(Task):
    """NER on CoNLL-2003 (or any IOB2 CoNLL file with the same columns)."""

    name = "conll_ner"
    autograph = False  # control flow as TensorFlow ops only (Task.autograph)

    def __init__(self, config: TaggingConfig = TaggingConfig(), *, cut_eval_batches: Optional[bool] = None):
        """cut_eval_batches: evaluation batches are sorted longest first and cut to their longest window
        (`_cut_to_longest`) instead of padded to max_seq_length and words_per_window: the same tags and
        scores, less work. None: yes, unless the model was built under a TPU strategy (static shapes)."""
        self.config = config
        self.cut_eval_batches = cut_eval_batches
        self._splits: dict[str, EncodedSplit] = {}
        self._tokenizer: Optional[WordPieceTokenizer] = None
        self._crf: Optional[crf.CRF] = None       # the built model's CRF layer, whose parameters the loss uses

    # ------------------------------------------------------------------------------------ data

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        if self._tokenizer is None:
            self._tokenizer = loading.tokenizer_for(self.config)
        return self._tokenizer

    def _tokenize_words(self, words: list[str]) -> list[list[int]]:
        return self.tokenizer.tokenize(tf.constant(words)).to_list()

    def encode(self, sentences: Sequence[conll.Sentence]) -> EncodedSplit:
        """Windows of sentences as fixed-shape arrays (see conll.encode_sentences)."""
        tokenizer = self.tokenizer
        pieces = conll.word_pieces_for((w for s in sentences for w in s.words), self._tokenize_words, tokenizer.unk_id)
        arrays, sources = conll.encode_sentences(
            sentences, pieces, labels=self.config.labels, max_seq_length=self.config.max_seq_length,
            max_words=self.config.words_per_window, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
            pad_id=tokenizer.pad_id)
        return EncodedSplit(list(sentences), arrays, sources)

    def split_data(self, split: str) -> EncodedSplit:
        """Reads, tokenizes and windows a split once; build_inputs and postprocess share the result."""
        if split not in self._splits:
            sentences = conll.read_conll(self._path(split), labels=self.config.labels)
            limit = self.config.max_train_sentences if split == "train" else self.config.max_eval_sentences
            self._splits[split] = self.encode(sentences[:limit] if limit else sentences)
        return self._splits[split]

    def _path(self, split: str) -> str:
        if self.config.data_files and split in self.config.data_files:
            return self.config.data_files[split]
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
        return os.path.join(self.config.data_dir or textfiles.default_data_dir(), "conll2003", SPLIT_FILES[split])

    def num_examples(self, split: str) -> int:
        """Windows in a split (what one epoch of batches covers; used by launch --train_epochs)."""
        return len(self.split_data(split).sources)

    def build_inputs(self, split: str, *, batch_size: int,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        arrays = dict(self.split_data(split).arrays)
        labels = arrays.pop("tags")
        cut = split != "train" and self.cuts_batches
        if cut:
            # Longest first, so each cut batch holds windows of similar length. Postprocess finds every window's
            # sentence by its example_index, and the in-graph metric is a sum: the order changes no score.
            order = inputs.longest_first(arrays["input_mask"])
            arrays, labels = {k: v[order] for k, v in arrays.items()}, labels[order]
        # Everything is precomputed: the pipeline only slices, shuffles and batches in-memory arrays.
        dataset = tf.data.Dataset.from_tensor_slices((arrays, labels))
        dataset = inputs.batches(
            dataset, training=split == "train", batch_size=batch_size, window_batches=self.config.group_by_length,
            input_context=input_context, shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed)
        if cut:
            dataset = dataset.map(lambda features, labels: self._cut_to_longest(features, labels,
                                                                                self.eval_width_multiple))
        return inputs.prefetched(dataset)

    def _cut_to_longest(self, features, labels: Optional[tf.Tensor], multiple: int):
        """A batch with its sub-token arrays cut to its longest window (rounded up to `multiple`) and its word
        arrays (and tags) to that width minus [CLS] and [SEP]: the encoder, the gather and the CRF's Viterbi
        then skip padding (CoNLL sentences average ~14 words, the default window holds 62 at seq 64).

        Every word has at least one piece, so no window has more words than that. One width per batch, not a
        second one from the word mask: under XLA the step compiles once per shape, and pairs of widths cost
        10 s more compiling than they saved in a CoNLL evaluation (bench/RESULTS.md). Not
        engine.inputs.cut_to_longest: that would cut the word axis only if it happened to be as long."""
        pieces = inputs.longest_width(features["input_mask"], self.config.max_seq_length, multiple)
        # An int for NumPy arrays (predict's batches: inputs.longest_first_batches), else a tensor.
        words = (min(pieces - 2, self.config.words_per_window) if isinstance(pieces, int)
                 else tf.minimum(pieces - 2, self.config.words_per_window))
        features = {k: v[:, :pieces] if k in SUB_TOKEN_ARRAYS else v[:, :words] if k in WORD_ARRAYS else v
                    for k, v in features.items()}
        return features, (None if labels is None else labels[:, :words])

    # ------------------------------------------------------------------------------------ model

    def build_model(self) -> TaggingModel:
        encoder, vocab = loading.make_encoder(self.config.encoder)
        if self._tokenizer is None and vocab is not None:  # the vocab make_encoder found: no second lookup
            self._tokenizer = loading.tokenizer_for(self.config, vocab)
        self.note_build_device()
        model = TaggingModel(encoder, self.config)
        # Create every variable now: the engine builds the optimizer from model.trainable_variables
        # before the first step.
        model(self._dummy_features(), training=False)
        self._crf = model.crf
        return model

    def _dummy_features(self) -> dict[str, tf.Tensor]:
        words = self.config.words_per_window
        ids = tf.zeros([1, self.config.max_seq_length], tf.int32)
        return {"input_word_ids": ids, "input_mask": tf.ones_like(ids), "input_type_ids": ids, "input_case_ids": ids,
                "word_positions": tf.zeros([1, words], tf.int32), "word_mask": tf.ones([1, words], tf.int32),
                "starts_sentence": tf.ones([1], tf.int32), "ends_sentence": tf.ones([1], tf.int32)}

    # ------------------------------------------------------------------------------------ loss

    def per_example_loss(self, features: Mapping[str, tf.Tensor], labels: tf.Tensor, outputs: Any) -> tf.Tensor:
        logits = outputs["logits"]
        mask = features["word_mask"]
        if self.config.head == "softmax":
            token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            return tf.reduce_sum(token_loss * tf.cast(mask, tf.float32), axis=1)
        if self._crf is None:
            raise RuntimeError("build_model() must run before the CRF loss is computed")
        return -self._crf.log_likelihood(logits, labels, mask, starts_sentence=features["starts_sentence"],
                                         ends_sentence=features["ends_sentence"])

    # ------------------------------------------------------------------------------------ metrics

    def build_metrics(self) -> Sequence[tf_keras.metrics.Metric]:
        # Over owned words only, so words in window overlaps are counted once: a fraction in [0, 1].
        return [tf_keras.metrics.Accuracy(name="word_accuracy")]

    def update_metrics(self, metrics, features, labels, outputs, weights) -> None:
        word_weights = tf.cast(features["owned_mask"], tf.float32) * tf.cast(weights, tf.float32)[:, tf.newaxis]
        for metric in metrics:
            metric.update_state(labels, outputs["tags"], sample_weight=word_weights)

    def eval_outputs(self, features, labels, outputs) -> Mapping[str, tf.Tensor]:
        # Back to the full window width: batches cut to different word counts concatenate on the host.
        tags = outputs["tags"]
        tags = tf.pad(tags, [[0, 0], [0, self.config.words_per_window - tf.shape(tags)[1]]])
        return {"tags": tags, "example_index": features["example_index"]}

    def postprocess(self, host_outputs: Mapping[str, np.ndarray], split: str, *, write_files: bool = True) -> dict:
        """conlleval precision/recall/F1 (percent) over every word of the split; writes the predictions file."""
        data = self.split_data(split)
        index = host_outputs["example_index"]
        stitched = conll.stitch(host_outputs["tags"], data.arrays["owned_mask"][index], index, data.sources,
                                [len(s.words) for s in data.sentences])
        labels = self.config.labels
        predicted = [[labels[t] for t in sentence] for sentence in stitched]
        counts = span_metrics.evaluate([s.tags for s in data.sentences], predicted)
        if self.config.predictions_dir and write_files:
            self.write_predictions(os.path.join(self.config.predictions_dir, f"{split}_predictions.txt"),
                                   data.sentences, predicted)
        scores = counts.scores()
        del scores["accuracy"]  # the same number as the in-graph word_accuracy, in percent
        return scores

    @staticmethod
    def write_predictions(path: str, sentences: Sequence[conll.Sentence], predicted: Sequence[Sequence[str]]) -> None:
        """`WORD GOLD PRED` lines, blank line between sentences: input for `perl conlleval.pl < path`."""
        if os.path.dirname(path):
            tf.io.gfile.makedirs(os.path.dirname(path))  # gfile: the folder may be gs://
        with tf.io.gfile.GFile(path, "w") as f:
            for sentence, tags in zip(sentences, predicted, strict=True):
                f.write("".join(span_metrics.conlleval_lines(sentence.words, sentence.tags, tags)))

    # ------------------------------------------------------------------------------------ predict

    def serving_module(self, model: tf_keras.Model) -> tf.Module:
        """Raw strings in, this Task's answer out (see tasks/ner/serving.py)."""
        from tasks.ner.serving import TaggingServing  # noqa: PLC0415 - tensorflow-text ops load only for an export
        return TaggingServing(self, model)

    def predict(self, model: TaggingModel, texts: Sequence[str], *, batch_size: int = 32) -> list[list[Entity]]:
        """Raw texts -> entities with character offsets (one list per text; each text is one sentence)."""
        word_spans = [[(m.start(), m.end()) for m in _WORD.finditer(text)] for text in texts]
        sentences = [conll.Sentence(tuple(text[a:b] for a, b in spans), ("O",) * len(spans))
                     for text, spans in zip(texts, word_spans)]
        nonempty = [i for i, s in enumerate(sentences) if s.words]
        data = self.encode([sentences[i] for i in nonempty])
        arrays = {k: v for k, v in data.arrays.items() if k != "tags"}
        predicted = np.zeros_like(data.arrays["tags"])
        # As evaluation: longest first, each batch cut to its longest window (answers go back by row).
        cut = (lambda batch: self._cut_to_longest(batch, None, multiple=1)[0]) if self.cuts_batches else None
        forward = self.traced_model_call(model, arrays)
        for rows, batch in inputs.longest_first_batches(arrays, batch_size, cut=cut):
            tags = forward(batch)["tags"].numpy()
            predicted[rows, :tags.shape[1]] = tags
        stitched = conll.stitch(predicted, arrays["owned_mask"], arrays["example_index"], data.sources,
                                [len(s.words) for s in data.sentences])
        # Entities: decoding.entities, the chunking the serving export runs in its graph.
        splits = conll.sentence_splits(data.sentences)
        rules = decoding.chunk_rules(self.config.labels)
        found = decoding.entities(np.array([t for tags in stitched for t in tags], np.int32), splits, rules)
        results: list[list[Entity]] = [[] for _ in texts]
        for sentence, first, last, tag in zip(*(v.numpy().tolist() for v in found)):
            i, base = nonempty[sentence], splits[sentence]
            start, stop = word_spans[i][first - base][0], word_spans[i][last - base][1]
            results[i].append(Entity(texts[i][start:stop], rules.types[tag], start, stop))
        return results


# Words as CoNLL tokenizes them, roughly: runs of letters/digits (with inner . ' - as in "U.S", "O'Neill",
# "1996-08-22") and single punctuation marks.
_WORD = re.compile(r"\w+(?:[.'\u2019-]\w+)*|[^\w\s]")
