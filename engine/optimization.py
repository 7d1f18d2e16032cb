"""AdamW with BERT's weight-decay exclusions and linear warmup then linear decay.

Uses tf_keras' AdamW (decoupled weight decay, as BERT's AdamWeightDecay) and Model Garden's
LinearWarmup schedule. Clipping is not done by the optimizer: the engine clips the global norm
once, after averaging over micro-batches and replicas.
"""
from __future__ import annotations

import tf_keras
from official.modeling.optimization import lr_schedule

from engine.config import OptimizerConfig


def make_learning_rate(config: OptimizerConfig, train_steps: int):
    """Linear warmup from 0 to learning_rate, then linear decay to end_learning_rate; counts updates."""
    decay_steps = config.decay_steps or train_steps
    schedule = tf_keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=config.learning_rate, decay_steps=max(decay_steps, 1),
        end_learning_rate=config.end_learning_rate, power=1.0)
    if config.warmup_steps:
        schedule = lr_schedule.LinearWarmup(
            after_warmup_lr_sched=schedule, warmup_steps=config.warmup_steps, warmup_learning_rate=0.0)
    return schedule


def make_optimizer(config: OptimizerConfig, train_steps: int, *, loss_scale: bool) -> tf_keras.optimizers.Optimizer:
    """Builds the optimizer; wraps it in a dynamic LossScaleOptimizer for float16."""
    optimizer = tf_keras.optimizers.AdamW(
        learning_rate=make_learning_rate(config, train_steps), weight_decay=config.weight_decay,
        beta_1=config.beta_1, beta_2=config.beta_2, epsilon=config.epsilon,
        # The engine compiles the step itself; the optimizer's own per-variable XLA is not wanted on CPU.
        jit_compile=False)
    optimizer.exclude_from_weight_decay(var_names=list(config.exclude_from_weight_decay))
    if loss_scale:
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer, dynamic=True)
    return optimizer


def current_learning_rate(optimizer: tf_keras.optimizers.Optimizer) -> float:
    """The learning rate the next update will use (the schedule counts updates, not micro-batches)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = inner._learning_rate  # pylint: disable=protected-access  (the public property is a variable copy)
    if isinstance(schedule, tf_keras.optimizers.schedules.LearningRateSchedule):
        return float(schedule(inner.iterations.numpy()))
    return float(schedule.numpy() if hasattr(schedule, "numpy") else schedule)
