"""Serving SavedModels: raw strings in, each Task's answer out, tokenization and decoding in the graph.

One small tf.Module per Task, whose `serve` function becomes the `serving_default` signature:

  classification  sentence [n] (+ sentence_b [n] for pairs) -> label [n] string, label_id [n] int32,
                  probabilities [n, classes] float32
  squad           question [n], context [n] -> answer [n] string, score [n] float32 (start + end logit),
                  start/end [n] int32 character offsets of the answer in the context (-1: no answer)
  conll_ner       text [n] -> num_entities [n] int32 and, padded to the most entities of the batch,
                  entity_text/entity_type [n, k] string (""), start/end [n, k] int32 (-1) character offsets

The per-Task modules live with their Task (tasks/classification/serving.py, tasks/squad/serving.py,
tasks/ner/serving.py); `task.serving_module(model)` builds one. Each computes what its Task's host-side
`predict` computes, in TensorFlow ops, so the export
needs no Python: WordPiece with the vocab saved as an asset (the folder is self-contained), SQuAD's
overlapping doc_stride windows with max-context n-best span decoding, CoNLL's word windows with their
owners, CRF Viterbi inside the model, and conlleval's chunk rules for entities. Character offsets are
Unicode code points, as Python string indices.

Loading needs the tensorflow-text ops registered: `import tensorflow_text` before tf.saved_model.load
(TF Serving needs a build with them). Signatures return dense tensors only (no ragged outputs).
"""
from __future__ import annotations


import numpy as np
import tensorflow as tf
import tf_keras

from tasks.encoders.tokenization import WordPieceTokenizer

SIGNATURE = "serving_default"

# ------------------------------------------------------------------------------------------- helpers

def first_argmax(values: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """argmax whose ties go to the lowest index, as numpy (tf.argmax does not promise it)."""
    best = tf.reduce_max(values, axis=axis, keepdims=True)
    size = tf.shape(values, out_type=tf.int32)[axis]
    shape = [1] * values.shape.rank
    shape[axis] = -1
    index = tf.reshape(tf.range(size), shape) + tf.zeros_like(values, tf.int32)
    return tf.reduce_min(tf.where(tf.equal(values, best), index, size), axis=axis)


def segment_first_best(scores: tf.Tensor, valid: tf.Tensor, segments: tf.Tensor, num_segments) -> tuple:
    """Per segment: (index of the first valid row with the highest score, or -1; that score, or the lowest value)."""
    lowest = tf.constant(-np.inf if scores.dtype.is_floating else scores.dtype.min, scores.dtype)
    masked = tf.where(valid, scores, lowest)
    best = tf.math.unsorted_segment_max(masked, segments, num_segments)
    rows = tf.range(tf.size(scores, out_type=tf.int32))
    big = tf.size(scores, out_type=tf.int32)
    is_best = valid & tf.equal(masked, tf.gather(best, segments))
    first = tf.math.unsorted_segment_min(tf.where(is_best, rows, big), segments, num_segments)
    found = first < big
    return tf.where(found, first, -1), tf.where(found, best, lowest)


def char_offsets(texts: tf.Tensor, byte_offsets: tf.Tensor) -> tf.Tensor:
    """Byte offsets into `texts` (same shape, broadcast by row) -> character (code point) offsets."""
    prefix = tf.strings.substr(texts, tf.zeros_like(byte_offsets), byte_offsets, unit="BYTE")
    return tf.strings.length(prefix, unit="UTF8_CHAR")


class ServingModule(tf.Module):
    """Holds the model's variables and the tokenizer's vocab table (and its vocab.txt asset).

    Only the variables are tracked, not the Keras model itself: Keras' own SavedModel serialisation
    would trace every layer (slow, and fragile for subclassed models and Hub layers); the signature's
    graph is all that serving needs.
    """

    def __init__(self, model: tf_keras.Model, tokenizer: WordPieceTokenizer, name: str):
        super().__init__(name=name)
        self._model = _Untracked(model)
        self.model_variables = list(model.variables)
        self.wordpiece = tokenizer.wordpiece       # the lookup table; saves vocab.txt as an asset
        self.vocab_file = tf.saved_model.Asset(tokenizer.vocab_file)
        self.lower_case = tf.Variable(tokenizer.lower_case, trainable=False)

    @property
    def model(self) -> tf_keras.Model:
        return self._model.value

    def signatures(self) -> dict:
        return {SIGNATURE: self.serve.get_concrete_function()}


class _Untracked:
    """A plain holder, so tf.Module attribute tracking does not reach the Keras model."""

    def __init__(self, value):
        self.value = value


def save(module: ServingModule, export_dir: str) -> str:
    """Writes `module` as a SavedModel whose `serving_default` signature is `module.serve`, with the model
    variables that signature reads (not, e.g., the float32 kernels that engine/dense.hold_kernels_in replaced)."""
    signatures = module.signatures()
    # By handle: under a mixed policy the model's variables are Keras AutoCastVariables around the ones read.
    read = {variable.handle.ref() for variable in signatures[SIGNATURE].variables}
    module.model_variables = [variable for variable in module.model_variables if variable.handle.ref() in read]
    # The signature is the export's interface. Saved as an attribute too, `serve` would be traced once more under
    # the save context and its graph stored twice (with --serving_precision=bfloat16, the kernels' constants).
    serve = module.serve
    del module.serve
    try:
        tf.saved_model.save(module, export_dir, signatures=signatures)
    finally:
        module.serve = serve
    return export_dir
