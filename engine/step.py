"""The compiled train and eval steps.

One update, per replica:
  1. all-reduce the example weights of the whole global batch (all replicas, all micro-batches);
  2. loop over K micro-batches (inside one function, optionally XLA-compiled), adding the gradients
     of sum(loss * weight) / global_weight into local buffers;
  3. one all-reduce of the gradients, unscale (fp16), clip by global norm, one optimizer update,
     skipped when anything is non-finite (FusedAdamW applies the clip's factor inside its update).
Because every micro-batch is normalised by the same global weight, K micro-batches of b examples on
R replicas give exactly the update of one batch of K*b*R.
"""
from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf
import tf_keras

from engine import dropout
from engine.averaging import WeightAverage
from engine.task import Task

SUM = tf.distribute.ReduceOp.SUM


def split_micro_batches(structure: Any, num_micro_batches: int) -> Any:
    """[K*b, ...] tensors -> [K, b, ...] so the accumulation loop can index micro-batch i."""
    def split(t):
        t = tf.convert_to_tensor(t)
        return tf.reshape(t, tf.concat([[num_micro_batches, -1], tf.shape(t)[1:]], 0))
    return tf.nest.map_structure(split, structure)


def clip_scale(grad_norm: tf.Tensor, clip_norm: float) -> tf.Tensor:
    """The factor `tf.clip_by_global_norm(..., clip_norm, use_norm=grad_norm)` multiplies every gradient by,
    computed by the same ops (so the same float): min(1, clip_norm / grad_norm), NaN for a non-finite norm."""
    scale = clip_norm * tf.minimum(1.0 / grad_norm, tf.constant(1.0, dtype=grad_norm.dtype) / clip_norm)
    return scale + (grad_norm - grad_norm)


def summed_rows(grad: tf.IndexedSlices) -> tf.IndexedSlices:
    """`grad` with each index once, its rows summed in order of appearance (as densifying would sum them)."""
    indices, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(indices)[0])
    return tf.IndexedSlices(values, indices, grad.dense_shape)


class TrainStep:
    """The per-replica train step for one (task, model, optimizer) triple."""

    def __init__(self, *, task: Task, model: tf_keras.Model, optimizer: tf_keras.optimizers.Optimizer,
                 grad_accum_steps: int, clip_norm: float | None, jit_compile: bool,
                 weight_average: WeightAverage | None = None, seed: int = 0):
        self._task = task
        self._seed = seed
        self._weight_average = weight_average
        self._model = model
        self._optimizer = optimizer
        self._grad_accum_steps = grad_accum_steps
        self._clip_norm = clip_norm
        self._loss_scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        # FusedAdamW takes the clip's factor into its one-pass kernel (engine/adamw_kernel), which saves a pass
        # over every gradient. Only where the update runs in replica context: under merge_call (TPU) the
        # factor, a replica-context tensor, would be used in cross-replica context.
        # Not under loss scaling: LossScaleOptimizer's apply_gradients would not pass the factor on.
        self._fold_clip = (bool(clip_norm) and not self._loss_scaled
                           and getattr(optimizer, "accepts_gradient_scale", False))
        # Embedding gradients stay rows (tf.IndexedSlices) where the optimizer takes them so (FusedAdamW's kernel
        # updates from the rows): densifying MiniLM's word-embedding gradient wrote, normed and read 47 MB per
        # update for the ~1,000 rows a batch touches. Not with micro-batches (the sum is a loop-carried dense
        # buffer), XLA (no dynamic row counts), loss scaling, or where the update runs under merge_call (TPU).
        self._sparse_gradients = (grad_accum_steps == 1 and not jit_compile and not self._loss_scaled
                                  and getattr(optimizer, "accepts_sparse_gradients", False))
        # Only the pure computation (forward, backward, accumulation) is XLA-compiled: all-reduce and
        # the optimizer's merge_call cannot live inside an XLA cluster under tf.distribute.
        self._accumulate = tf.function(self._accumulate_gradients, jit_compile=jit_compile,
                                       autograph=task.autograph)

    def _micro_step(self, features, labels, global_weight, key):
        variables = self._model.trainable_variables
        with tf.GradientTape() as tape, dropout.keys(key):
            outputs = self._model(features, training=True)
            per_example = tf.cast(self._task.per_example_loss(features, labels, outputs), tf.float32)
            weights = tf.cast(self._task.example_weights(features, labels), tf.float32)
            loss = tf.reduce_sum(per_example * weights) / global_weight
            scaled = self._optimizer.get_scaled_loss(loss) if self._loss_scaled else loss
        grads = tape.gradient(scaled, variables)
        # Otherwise dense buffers: embedding gradients arrive as IndexedSlices, which cannot be loop-carried.
        keep_rows = self._keeps_rows()
        grads = [tf.zeros_like(v) if g is None else g if keep_rows and isinstance(g, tf.IndexedSlices)
                 else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        return loss, grads

    @property
    def autograph(self) -> bool:
        """Whether this step is traced with AutoGraph (its Task's choice, Task.autograph)."""
        return self._task.autograph

    def _keeps_rows(self) -> bool:
        return self._sparse_gradients and tf.__internal__.distribute.strategy_supports_no_merge_call()

    def _accumulate_gradients(self, micro_features, micro_labels, global_weight, key):
        def micro_batch(i):
            return (tf.nest.map_structure(lambda t: t[i], micro_features),
                    tf.nest.map_structure(lambda t: t[i], micro_labels))

        if self._grad_accum_steps == 1:
            return self._micro_step(*micro_batch(0), global_weight, dropout.fold_in(key, 0))

        def add_micro_batch(i, loss, grads):
            micro_loss, micro_grads = self._micro_step(*micro_batch(i), global_weight, dropout.fold_in(key, i))
            return i + 1, loss + micro_loss, [a + g for a, g in zip(grads, micro_grads)]

        # A tf.while_loop written out: this function may be traced without AutoGraph (Task.autograph).
        _, loss, grads = tf.while_loop(
            lambda i, loss, grads: i < self._grad_accum_steps, add_micro_batch,
            (tf.constant(0), tf.constant(0.0), [tf.zeros_like(v) for v in self._model.trainable_variables]))
        return loss, grads

    def __call__(self, features, labels):
        """Runs one update in replica context; returns (loss, grad_norm, applied, overflow), equal on all replicas.

        `overflow`: skipped as an ordinary fp16 loss-scale overflow (finite loss, non-finite scaled gradients,
        a scale that can still drop), which the LossScaleOptimizer answers by halving the scale."""
        ctx = tf.distribute.get_replica_context()
        weights = tf.cast(self._task.example_weights(features, labels), tf.float32)
        global_weight = ctx.all_reduce(SUM, tf.reduce_sum(weights))
        # A batch made only of zero-weight examples has no loss; avoid 0/0.
        global_weight = tf.maximum(global_weight, 1e-12)
        micro_features = split_micro_batches(features, self._grad_accum_steps)
        micro_labels = split_micro_batches(labels, self._grad_accum_steps)
        # Dropout masks keyed by (seed, update, replica, micro-batch): a resumed run draws the same ones.
        key = dropout.step_key(self._seed, self._optimizer.iterations, ctx.replica_id_in_sync_group)
        loss, grads = self._accumulate(micro_features, micro_labels, global_weight, key)
        loss = ctx.all_reduce(SUM, loss)
        grads = ctx.all_reduce(SUM, grads)
        # One row per index (the batch repeats tokens, and the all-reduce concatenates the replicas' rows), so
        # that the global norm below, which reads IndexedSlices' values, is the norm of the summed gradient.
        grads = [summed_rows(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        if self._loss_scaled:
            grads = self._optimizer.get_unscaled_gradients(grads)
        grad_norm = tf.linalg.global_norm(grads)
        scale = None
        if self._fold_clip and tf.__internal__.distribute.strategy_supports_no_merge_call():
            scale = clip_scale(grad_norm, self._clip_norm)
        elif self._clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, self._clip_norm, use_norm=grad_norm)
        # The global norm is inf or NaN exactly when some gradient element is (or when the squares overflow
        # float32, a norm above 1e19, which is no update to apply either): one check instead of two ops per
        # variable.
        applied = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)
        overflow = tf.constant(False)
        if self._loss_scaled:
            overflow = tf.logical_not(applied) & tf.math.is_finite(loss) & (self._optimizer.loss_scale > 1.0)
        self._apply(grads, applied, scale)
        if self._weight_average is not None:
            self._weight_average.update(self._optimizer.iterations, applied)
        return loss, grad_norm, applied, overflow

    def _apply(self, grads, should_apply, scale=None):
        """Applies the gradients, multiplied by `scale` (the clip's factor, folded into FusedAdamW) if given."""
        variables = self._model.trainable_variables
        if self._loss_scaled:
            # LossScaleOptimizer skips non-finite updates itself and lowers the scale.
            self._optimizer.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
            return

        def apply_now(g):
            extra = {} if scale is None else {"gradient_scale": scale}
            self._optimizer.apply_gradients(zip(g, variables), skip_gradients_aggregation=True, **extra)

        def skip():
            # Count the attempt, as LossScaleOptimizer does, so the schedule stays aligned with the step.
            self._optimizer.iterations.assign_add(1, read_value=False)

        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.__internal__.smart_cond.smart_cond(should_apply, lambda: apply_now(grads), skip)
            return

        # The optimizer's apply calls merge_call, which cannot sit in a cond in replica context; so branch
        # in cross-replica context and re-enter the replicas: the pattern LossScaleOptimizer uses.
        def cross_replica(distribution, grads, should_apply):
            should = distribution.experimental_local_results(should_apply)[0]
            tf.__internal__.smart_cond.smart_cond(
                should, lambda: distribution.extended.call_for_each_replica(apply_now, args=(grads,)), skip)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, should_apply))


def make_train_loop(strategy: tf.distribute.Strategy, step: TrainStep, *, stop_on_nonfinite: bool) -> Callable:
    """A tf.function running `num_steps` updates per call (the host talks to the device once per loop).

    Returns (steps_done, loss_sum, last_grad_norm, skipped, overflows); `overflows` counts the skipped updates
    that were fp16 loss-scale overflows. With `stop_on_nonfinite` the loop ends at the first other non-finite
    update, so the host can stop and name the step.
    """
    # AutoGraph converts the loop below (`for` over tf.range, `break`); the step only if its Task asks for it
    # (Task.autograph: the built-in Tasks need none, and converting their code cost seconds per trace).
    replica_step = step if step.autograph else tf.autograph.experimental.do_not_convert(
        lambda features, labels: step(features, labels))

    @tf.function
    def train_loop(iterator, num_steps):
        loss_sum = tf.constant(0.0)
        grad_norm = tf.constant(0.0)
        skipped = tf.constant(0, tf.int64)
        overflows = tf.constant(0, tf.int64)
        steps_done = tf.constant(0, tf.int64)
        for _ in tf.range(num_steps):
            features, labels = next(iterator)
            loss, norm, applied, overflow = strategy.run(replica_step, args=(features, labels))
            # Values are identical on every replica after the all-reduce: take the first.
            loss = strategy.experimental_local_results(loss)[0]
            grad_norm = strategy.experimental_local_results(norm)[0]
            applied = strategy.experimental_local_results(applied)[0]
            overflow = strategy.experimental_local_results(overflow)[0]
            steps_done += 1
            loss_sum += tf.where(applied, loss, 0.0)
            skipped += tf.cast(tf.logical_not(applied), tf.int64)
            overflows += tf.cast(overflow, tf.int64)
            if stop_on_nonfinite and not applied and not overflow:
                break
        return steps_done, loss_sum, grad_norm, skipped, overflows

    return train_loop


def make_eval_step(strategy: tf.distribute.Strategy, task: Task, model: tf_keras.Model, metrics, *,
                   jit_compile: bool) -> Callable:
    """A tf.function evaluating one padded global batch; returns its `eval_outputs` plus loss sums, gathered."""
    forward = tf.function(lambda features: model(features, training=False), jit_compile=jit_compile,
                          reduce_retracing=not jit_compile, autograph=task.autograph)

    def replica_step(features, labels, mask):
        outputs = forward(features)
        weights = tf.cast(task.example_weights(features, labels), tf.float32) * mask
        per_example = tf.cast(task.per_example_loss(features, labels, outputs), tf.float32)
        task.update_metrics(metrics, features, labels, outputs, mask)
        extra = task.eval_outputs(features, labels, outputs) or {}
        return dict(extra, _loss_sum=tf.reshape(tf.reduce_sum(per_example * weights), [1]),
                    _weight_sum=tf.reshape(tf.reduce_sum(weights), [1]), _mask=mask)

    @tf.function(reduce_retracing=not jit_compile, autograph=task.autograph)
    def eval_step(batch):
        features, labels, mask = batch
        outputs = strategy.run(replica_step, args=(features, labels, mask))
        # All replicas' rows, of all workers, in replica order (= the global batch's order): every worker
        # computes the same host-side metrics over the whole evaluation set.
        return {name: strategy.gather(value, axis=0) for name, value in outputs.items()}

    return eval_step
