"""Helpers for engine-level tests: a tiny Task and "one update under a given geometry".

Every Task's tests can use `one_update_weights` to check that gradient accumulation and a
two-replica MirroredStrategy give the same update as the plain run.
"""
from __future__ import annotations

import tempfile
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tf_keras

from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from engine.strategy import make_strategy
from engine.task import Task
from engine.trainer import Trainer


def graph_nodes(graph_def) -> list:
    """A GraphDef's nodes, including those inside its conds and nested functions (its function library)."""
    return list(graph_def.node) + [node for f in graph_def.library.function for node in f.node_def]


def graph_op_types(function, *args) -> set:
    """Op types of the traced tf.function, including those inside its conds and nested functions."""
    return {node.op for node in graph_nodes(function.get_concrete_function(*args).graph.as_graph_def())}


def constant_shapes(graph_def, dtype) -> list:
    """Shapes of the constants of `dtype` among graph_nodes(graph_def)."""
    return [tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim) for node in graph_nodes(graph_def)
            if node.op == "Const" and node.attr["dtype"].type == dtype.as_datatype_enum]


class ToyTask(Task):
    """A 2-layer classifier on fixed random data, with unequal example weights (so the reduction matters)."""

    name = "toy"

    def __init__(self, num_examples: int = 96, dim: int = 8, classes: int = 3, nan_from_step: Optional[int] = None,
                 shuffle: bool = False):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(num_examples, dim)).astype(np.float32)
        self.y = rng.integers(0, classes, size=num_examples).astype(np.int32)
        self.w = rng.uniform(0.2, 2.0, size=num_examples).astype(np.float32)
        self.classes = classes
        self.shuffle = shuffle
        self.nan_from_step = nan_from_step
        self.calls = None

    def build_model(self):
        inputs = tf_keras.Input([self.x.shape[1]], name="x")
        hidden = tf_keras.layers.Dense(16, activation="gelu")(inputs)
        logits = tf_keras.layers.Dense(self.classes, dtype="float32")(hidden)
        return tf_keras.Model(inputs, logits)

    def build_inputs(self, split, *, batch_size, input_context=None):
        x = self.x.copy()
        if self.nan_from_step is not None and split == "train":
            # Poison every example after the first `nan_from_step` global batches' worth.
            x[self.nan_from_step * batch_size:] = np.nan
        dataset = tf.data.Dataset.from_tensor_slices(({"x": x, "w": self.w}, self.y))
        if input_context and input_context.num_input_pipelines > 1:
            dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if split == "train":
            if self.shuffle:
                dataset = dataset.shuffle(32, seed=1)
            return dataset.repeat().batch(batch_size, drop_remainder=True)
        return dataset.batch(batch_size)

    def per_example_loss(self, features, labels, outputs):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs)

    def example_weights(self, features, labels):
        return features["w"]

    def build_metrics(self):
        return [tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def update_metrics(self, metrics, features, labels, outputs, mask):
        for metric in metrics:
            metric.update_state(labels, outputs, sample_weight=mask)

    def eval_outputs(self, features, labels, outputs):
        return {"logits": outputs, "label": labels}

    def postprocess(self, host_outputs, split, *, write_files=True):
        return {"host_accuracy": float(np.mean(host_outputs["logits"].argmax(-1) == host_outputs["label"])),
                "num_examples": float(len(host_outputs["label"]))}


def run_training(task_factory: Callable[[], Task], *, global_batch_size: int, grad_accum_steps: int = 1,
                 strategy: str = "default", train_steps: int = 1, model_dir: Optional[str] = None,
                 precision: str = "float32", jit_compile: bool = False, learning_rate: float = 1e-2,
                 steps_per_loop: int = 1, ema_decay: Optional[float] = None, adam_epsilon: float = 1e-6,
                 runtime_options: Optional[dict] = None, **trainer_kwargs) -> Trainer:
    """Builds a Trainer for a fresh task and trains it; returns the trainer (weights, history)."""
    config = TrainerConfig(model_dir=model_dir or tempfile.mkdtemp(), train_steps=train_steps,
                           global_batch_size=global_batch_size, grad_accum_steps=grad_accum_steps,
                           steps_per_loop=steps_per_loop, eval_split=trainer_kwargs.pop("eval_split", ""),
                           **trainer_kwargs)
    runtime = RuntimeConfig(strategy=strategy, precision=precision, jit_compile=jit_compile, **(runtime_options or {}))
    # No warmup/decay and no clipping, so one update's result shows every difference in the gradient.
    optimizer = OptimizerConfig(learning_rate=learning_rate, warmup_steps=0, decay_steps=10 ** 6,
                                end_learning_rate=learning_rate, clip_norm=None, ema_decay=ema_decay,
                                epsilon=adam_epsilon)
    trainer = Trainer(task_factory(), config, optimizer, runtime, strategy=make_strategy(runtime))
    trainer.train()
    return trainer


def one_update_weights(task_factory: Callable[[], Task], *, global_batch_size: int, grad_accum_steps: int = 1,
                       strategy: str = "default", train_steps: int = 1, **kwargs) -> tuple[list[float], list[np.ndarray]]:
    """(losses per step, model weights) after `train_steps` updates from a fixed initialisation."""
    trainer = run_training(task_factory, global_batch_size=global_batch_size, grad_accum_steps=grad_accum_steps,
                           strategy=strategy, train_steps=train_steps, **kwargs)
    losses = [h["loss"] for h in trainer.train_history]
    return losses, [np.array(w) for w in trainer.model.get_weights()]


def reads_alias(variable) -> bool:
    """Whether two reads of `variable` share its buffer. They do not once a ResourceGather has run on it:
    TensorFlow then keeps the variable in copy-on-read mode, where reads and optimizer updates copy it whole
    (engine/fusion.py). `_numpy()` is the view of a tensor's buffer; `numpy()` would copy."""
    first, second = variable.value(), variable.value()
    return first._numpy().__array_interface__["data"][0] == second._numpy().__array_interface__["data"][0]


def encoder_pair_with_dropout():
    """(inputs, stock, fused): two tiny BERT encoders with dropout on and the same weights; `stock` with keyed
    dropout only (the engine's stock path: the same masks), `fused` with all of engine/fusion.py's rewrites."""
    from engine import dropout, fusion  # noqa: PLC0415
    from tasks.encoders import bert  # noqa: PLC0415
    config = bert.BertConfig(**{**bert.BertConfig.tiny().__dict__, "hidden_dropout_prob": 0.1,
                                    "attention_probs_dropout_prob": 0.1})
    ids = tf.reshape(tf.range(64) % 50 + 1, [4, 16])
    mask = tf.cast(tf.range(16)[None] < tf.constant([[16], [11], [5], [1]]), tf.int32)
    inputs = {"input_word_ids": ids * mask, "input_mask": mask, "input_type_ids": tf.zeros_like(ids)}
    stock, fused = bert.build_encoder(config), bert.build_encoder(config)
    stock(inputs), fused(inputs)
    fused.set_weights(stock.get_weights())
    dropout.rebind(stock, xla=False)
    fusion.fuse_elementwise(fused)
    return inputs, stock, fused


DROPOUT_KEY = tf.constant([0x1234_5678_9ABC_DEF0, -11], tf.int64)


def encoder_training_step(model, inputs):
    """A tf.function: the encoder's training forward under dropout key DROPOUT_KEY, returning the real positions'
    sequence output and the gradients of a loss on both outputs."""
    from engine import dropout  # noqa: PLC0415

    @tf.function
    def compute():
        with tf.GradientTape() as tape, dropout.keys(DROPOUT_KEY):
            outputs = model(inputs, training=True)
            real = tf.cast(inputs["input_mask"], tf.float32)[:, :, None]
            y = tf.cast(outputs["sequence_output"], tf.float32) * real
            loss = tf.reduce_sum(y * y) + tf.reduce_sum(tf.cast(outputs["pooled_output"], tf.float32))
        return [y] + [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
    return compute
