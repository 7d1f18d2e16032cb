"""The Task contract: one replica's description of what is learned.

A Task never sees a GradientTape, an optimizer, a strategy or a loss scale. The engine
reduces `sum(per_example_loss * example_weights) / sum(example_weights over the global
batch)`, which is what makes gradient accumulation, multi-replica training and padded
evaluation batches exact.

Batches are `(features, labels)` pairs of (nested) tensors, as with `model.fit`:
`model(features)` gives the outputs, the labels never enter the model.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from engine import strategy as strategy_lib


class Task:
    """Base class with the defaults most Tasks want; subclasses override what differs."""

    name: str = "task"
    # Evaluation batches may be cut to their longest sequence rounded up to this. The Trainer sets it before it
    # builds evaluation inputs: 1 when its eval step is traced with open shapes (any width, no retracing), 16
    # under XLA, which compiles once per width.
    eval_width_multiple: int = 16
    # Whether a Task that can (classification, NER, SQuAD) sorts its evaluation examples longest first and cuts
    # each batch to its longest sequence. None: yes, unless its model was built under a TPU strategy, whose XLA
    # programs want one static shape; such a Task records that in build_model (`note_build_device`).
    cut_eval_batches: Optional[bool] = None
    # Whether the engine traces this Task's model and per-step code with AutoGraph, which turns Python `if`/`for`
    # on tensors into tf.cond/tf.while_loop. The built-in Tasks write their control flow as TensorFlow ops and
    # set False: converting their Python source (model, tokenizer, Model Garden's layers) took seconds of every
    # trace, at start-up, export and predict (bench/RESULTS.md, 2026-12-06).
    autograph: bool = True
    _built_for_tpu: bool = False
    _traced_model_call: Optional[tuple] = None  # (model, its traced call): see traced_model_call

    def unconverted(self, fn):
        """`fn` for tf.data's `map` or a tf.function: not converted by AutoGraph unless this Task asks for it."""
        return fn if self.autograph else tf.autograph.experimental.do_not_convert(fn)

    @property
    def cuts_batches(self) -> bool:
        """Whether evaluation (and this Task's predict) batches are cut to their longest sequence."""
        return self.cut_eval_batches if self.cut_eval_batches is not None else not self._built_for_tpu

    def note_build_device(self) -> None:
        """Called from build_model: remembers whether the model is built for a TPU (see cut_eval_batches)."""
        self._built_for_tpu = strategy_lib.is_tpu(tf.distribute.get_strategy())

    def traced_model_call(self, model: tf_keras.Model, features: Mapping[str, np.ndarray]):
        """`model(features, training=False)` as a tf.function traced once for any batch size and width (every
        dimension left open, int32 like `features`), not run eagerly layer by layer (2.5x slower for MiniLM);
        cached for the last model. For a Task's `predict`."""
        if self._traced_model_call is None or self._traced_model_call[0] is not model:
            spec = {k: tf.TensorSpec([None] * np.ndim(v), tf.int32) for k, v in features.items()}
            self._traced_model_call = (model, tf.function(lambda batch: model(batch, training=False),
                                                          input_signature=[spec], autograph=self.autograph))
        return self._traced_model_call[1]

    def build_model(self) -> tf_keras.Model:
        """Builds the model. Called inside the strategy scope under the precision policy."""
        raise NotImplementedError

    def build_inputs(self, split: str, *, batch_size: int,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        """A dataset of `(features, labels)` batches of `batch_size` (per replica).

        split "train": shuffled, repeated forever, `drop_remainder=True`.
        Any other split: one pass in order; the last batch may be partial (the engine pads it).
        Shard by `input_context` when it is given and has more than one pipeline.
        """
        raise NotImplementedError

    def per_example_loss(self, features: Any, labels: Any, outputs: Any) -> tf.Tensor:
        """Loss per example, shape [batch], float32. The engine does the reduction."""
        raise NotImplementedError

    def example_weights(self, features: Any, labels: Any) -> tf.Tensor:
        """Weight per example, shape [batch], float32 (class weights go here). Default: ones."""
        return tf.ones([tf.shape(tf.nest.flatten(labels)[0])[0]], tf.float32)

    def build_metrics(self) -> Sequence[tf_keras.metrics.Metric]:
        """In-graph metrics, updated per replica by `update_metrics` during evaluation."""
        return []

    def update_metrics(self, metrics: Sequence[tf_keras.metrics.Metric], features: Any, labels: Any,
                       outputs: Any, mask: tf.Tensor) -> None:
        """Updates `metrics`; `mask` ([batch] float32) is 0 for padding examples and must be honoured.

        It is only the padding mask, not `example_weights`: metrics such as accuracy should not be
        skewed by class weights."""

    def eval_outputs(self, features: Any, labels: Any, outputs: Any) -> Optional[Mapping[str, tf.Tensor]]:
        """Per-example tensors ([batch, ...]) to bring to the host for `postprocess`. Default: none."""
        return None

    def train_flops_per_example(self) -> Optional[float]:
        """Model FLOPs of one training example (forward + backward), for MFU; None if unknown."""
        return None

    def postprocess(self, host_outputs: Mapping[str, np.ndarray], split: str, *, write_files: bool = True) -> dict:
        """Host-side metrics from the concatenated `eval_outputs` of a split (padding removed).

        Every worker of a multi-worker job gets all outputs and computes the same metrics; only one is asked
        to `write_files` (predictions), through tf.io.gfile."""
        return {}

    def serving_module(self, model: tf_keras.Model) -> tf.Module:
        """A tf.Module with a `serve` tf.function and `signatures()`, for `tf.saved_model.save` (launch.export)."""
        raise NotImplementedError(f"task {type(self).__name__} has no serving export")
