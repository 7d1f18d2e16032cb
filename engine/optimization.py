"""AdamW or LAMB with BERT's weight-decay exclusions, optional layer-wise learning-rate decay, and linear
warmup then linear decay.

AdamW is tf_keras' update (decoupled weight decay, as BERT's AdamWeightDecay) applied by fused kernels;
LAMB is ours (below, and why); the schedule is Model Garden's LinearWarmup. Clipping is not done by the
optimizer: the engine clips the global norm once, after averaging over micro-batches and replicas.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import tensorflow as tf
import tf_keras
from official.modeling.optimization import lr_schedule

from engine import adamw_kernel
from engine.config import OptimizerConfig


def make_learning_rate(config: OptimizerConfig, train_steps: int):
    """Linear warmup from 0 to learning_rate, then linear decay to end_learning_rate; counts updates."""
    decay_steps = config.decay_steps or train_steps
    if config.warmup_steps >= decay_steps:
        # LinearWarmup ramps towards the decayed schedule's value at the end of warmup, which is then 0: the
        # run would train at learning rate 0 without a word (e.g. the demo's 100 warmup steps with 60 updates).
        raise ValueError(f"--warmup_steps={config.warmup_steps} is not below the {decay_steps} updates the learning "
                         "rate decays over (--train_steps): the rate would stay 0; use fewer warmup steps")
    schedule = tf_keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=config.learning_rate, decay_steps=max(decay_steps, 1),
        end_learning_rate=config.end_learning_rate, power=1.0)
    if config.warmup_steps:
        schedule = lr_schedule.LinearWarmup(
            after_warmup_lr_sched=schedule, warmup_steps=config.warmup_steps, warmup_learning_rate=0.0)
    return schedule


def layer_decay_multipliers(names: Sequence[str], decay: float, *, layer_pattern: str,
                            embedding_pattern: str) -> list[float]:
    """Learning-rate factor per variable name: decay^(L - l) for encoder layer l (0-based) of L,
    decay^(L + 1) for the embeddings, 1 for everything else (the head, and the pooler above the top layer).

    Layers are found by `layer_pattern`, whose first group is the layer index (Model Garden's BertEncoderV2:
    ".../transformer/layer_3/..."); L is the largest index + 1."""
    layers = [re.search(layer_pattern, name) for name in names]
    indices = [int(m.group(1)) for m in layers if m]
    if not indices:
        raise ValueError(f"--layer_decay={decay}: no variable name matches the encoder layer pattern "
                         f"{layer_pattern!r} (e.g. {names[0] if names else 'no variables'!r})")
    num_layers = max(indices) + 1
    factors = []
    for name, layer in zip(names, layers):
        if layer:
            factors.append(decay ** (num_layers - int(layer.group(1))))
        elif re.search(embedding_pattern, name):
            factors.append(decay ** (num_layers + 1))
        else:
            factors.append(1.0)
    return factors


class _LayerwiseLearningRate:
    """Per-variable learning-rate factors for new-style tf_keras optimizers, fixed when the optimizer is built.

    Call `set_layer_decay` before `build`, like `exclude_from_weight_decay`. The factors are Python floats
    keyed by variable, so the compiled update carries one constant per variable and nothing enters the
    checkpoint: a resumed run recomputes them from the same names."""

    _layer_decay: Optional[tuple] = None
    _multipliers: Optional[dict] = None

    def set_layer_decay(self, decay: Optional[float], *, layer_pattern: str, embedding_pattern: str) -> None:
        self._layer_decay = (decay, layer_pattern, embedding_pattern) if decay and decay != 1.0 else None

    def build(self, var_list):
        if self._multipliers is None:
            factors = [1.0] * len(var_list)
            if self._layer_decay is not None:
                decay, layer_pattern, embedding_pattern = self._layer_decay
                factors = layer_decay_multipliers([v.name for v in var_list], decay, layer_pattern=layer_pattern,
                                                  embedding_pattern=embedding_pattern)
            # Plain dicts, not tracked: nothing of this goes into the checkpoint.
            self._multipliers = self._no_dependency({self._var_key(v): f for v, f in zip(var_list, factors)})
            self._multiplier_names = self._no_dependency({v.name: f for v, f in zip(var_list, factors)})
        super().build(var_list)

    @property
    def learning_rate_multipliers(self) -> dict[str, float]:
        """{variable name: factor}, after `build` (for logs and tests)."""
        return dict(self._multiplier_names)

    def _multiplier(self, variable) -> float:
        return (self._multipliers or {}).get(self._var_key(variable), 1.0)


class FusedAdamW(_LayerwiseLearningRate, tf_keras.optimizers.AdamW):
    """tf_keras' AdamW (same update, slots and checkpoint layout) applied as one fused kernel per variable,
    with optional layer-wise learning-rate factors.

    Why not the stock update: tf_keras' AdamW builds about 30 small ops per variable (the learning rate,
    step count and beta powers recomputed for every variable, then m, v, decay and the step as separate
    elementwise passes), about 3,000 ops per update for MiniLM's 103 variables; at short sequences the
    step is bound by op count (bench/RESULTS.md). Here the scalars are computed once per update and each
    variable gets `ResourceApplyAdam`, the fused kernel tf_keras' legacy Adam uses (the same formula:
    m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)),
    preceded by the decoupled decay w -= lr wd w as one `ResourceApplyGradientDescent`.
    `epsilon_after_bias_correction=True` scales eps by sqrt(1 - b2^t) once per update, which turns that formula
    into PyTorch's AdamW update (eps added to sqrt(v / (1 - b2^t))): a Hugging Face recipe's exact optimizer.
    On the CPU, float32 variables are updated instead by engine/adamw_kernel's one-pass kernel, which computes
    the same (bit for bit) in one pass over memory, and can also take the global-norm clip's factor
    (`gradient_scale`), saving the engine's separate scaling pass.
    Sparse gradients (which tf_keras deduplicates first) are applied as dense AdamW applies them: every row of m,
    v and the weight is updated, rows without a gradient with a zero one (the same values as tf_keras' sparse
    path); the kernel takes them as rows, TensorFlow's kernels densified. No AMSGrad."""

    # TrainStep passes the clip factor to apply_gradients instead of scaling the gradients itself, and leaves
    # embedding gradients as rows (tf.IndexedSlices) instead of densifying them.
    accepts_gradient_scale = True
    accepts_sparse_gradients = True

    def __init__(self, *args, epsilon_after_bias_correction: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.epsilon_after_bias_correction = epsilon_after_bias_correction
        if self.amsgrad:
            raise ValueError("FusedAdamW has no AMSGrad variant: use tf_keras.optimizers.AdamW(amsgrad=True)")
        # {(device, dtype): (lr, beta_1_power, beta_2_power, beta_1, beta_2, epsilon, weight_decay)} for the
        # update being built; tensors, so not tracked. Cleared at every apply_gradients.
        self._step_scalars = self._no_dependency({})
        self._decayed_keys = self._no_dependency(set())
        self._gradient_scale = None

    def get_config(self):
        return dict(super().get_config(), epsilon_after_bias_correction=self.epsilon_after_bias_correction)

    def apply_gradients(self, grads_and_vars, *args, gradient_scale=None, **kwargs):
        """As tf_keras' apply_gradients; `gradient_scale` (a scalar tensor, e.g. the global-norm clip's factor)
        multiplies every gradient first, as `tf.clip_by_global_norm` would have."""
        self._step_scalars.clear()
        self._gradient_scale = gradient_scale
        try:
            return super().apply_gradients(grads_and_vars, *args, **kwargs)
        finally:
            self._step_scalars.clear()
            self._gradient_scale = None

    def _apply_weight_decay(self, variables):
        # Only note which variables decay (decided on the distributed variables, as the stock method does):
        # update_step applies the decay in the same pass as Adam.
        self._decayed_keys.clear()
        if self.weight_decay:
            self._decayed_keys.update(self._var_key(v) for v in variables if self._use_weight_decay(v))

    def _scalars(self, variable):
        key = (variable.device, variable.dtype)
        if key not in self._step_scalars:
            dtype = variable.dtype
            step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            beta_2_power = tf.pow(beta_2, step)
            epsilon = tf.cast(self.epsilon, dtype)
            if self.epsilon_after_bias_correction:
                # The kernels compute lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps'); with
                # eps' = eps sqrt(1 - b2^t) that is lr / (1 - b1^t) m / (sqrt(v / (1 - b2^t)) + eps), torch's update.
                epsilon *= tf.sqrt(1.0 - beta_2_power)
            self._step_scalars[key] = (
                tf.cast(self.learning_rate, dtype), tf.pow(beta_1, step), beta_2_power, beta_1, beta_2,
                epsilon, tf.cast(self.weight_decay or 0.0, dtype))
        return self._step_scalars[key]

    def update_step(self, gradient, variable):
        lr, beta_1_power, beta_2_power, beta_1, beta_2, epsilon, weight_decay = self._scalars(variable)
        scale = self._multiplier(variable)
        if scale != 1.0:
            lr = lr * tf.cast(scale, lr.dtype)
        key = self._var_key(variable)
        decayed = key in self._decayed_keys
        index = self._index_dict[key]
        m, v = self._momentums[index], self._velocities[index]
        kernel = adamw_kernel.load() if adamw_kernel.usable_for(variable) else None
        if kernel is not None:
            grad_scale = tf.constant(1.0, variable.dtype) if self._gradient_scale is None else tf.cast(
                self._gradient_scale, variable.dtype)
            common = dict(variable=variable, m=m, v=v, grad_scale=grad_scale, lr=lr, beta1_power=beta_1_power,
                          beta2_power=beta_2_power, beta1=beta_1, beta2=beta_2, epsilon=epsilon,
                          decay=lr * weight_decay if decayed else tf.zeros_like(lr))
            if isinstance(gradient, tf.IndexedSlices):  # one row per index: apply_gradients deduplicated them
                adamw_kernel.apply_rows(kernel, rows=tf.cast(gradient.values, variable.dtype),
                                        indices=gradient.indices, **common)
            else:
                adamw_kernel.apply(kernel, grad=tf.cast(gradient, variable.dtype), **common)
            return
        gradient = tf.cast(tf.convert_to_tensor(gradient), variable.dtype)
        if self._gradient_scale is not None:
            gradient = gradient * tf.cast(self._gradient_scale, variable.dtype)
        if decayed:
            tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr * weight_decay,
                                                    delta=variable.read_value())
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, beta1_power=beta_1_power, beta2_power=beta_2_power,
            lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon, grad=gradient)


class LAMB(_LayerwiseLearningRate, tf_keras.optimizers.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

    Per variable w with gradient g, at update t:
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   m^ = m / (1 - b1^t),   v^ = v / (1 - b2^t)
        u = m^ / (sqrt(v^) + eps) + weight_decay * w
        r = ||w|| / ||u||  (1 if either norm is 0)
        w = w - lr * r * u
    Variables excluded from weight decay (LayerNorm, biases) get neither the decay nor the trust ratio
    (r = 1): what Model Garden's LAMB does when exclude_from_layer_adaptation is not given.

    Why not Model Garden's `official/modeling/optimization/lamb.py`, which computes the same: it is a tf_keras
    *legacy* optimizer. The engine builds its optimizer before the first step (`build(vars)`, so a checkpoint
    can restore the moments before any update), applies in replica context with
    `skip_gradients_aggregation=True`, and wraps it in the new LossScaleOptimizer for float16; the legacy
    class has none of these (lazy slots, `experimental_aggregate_gradients`, the legacy loss-scale wrapper)
    and would checkpoint its slots in another layout than AdamW's. So this is the same update as a
    new-style Optimizer, beside tf_keras' AdamW.
    """

    def __init__(self, learning_rate=0.001, weight_decay: float = 0.0, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-6, name: str = "LAMB", **kwargs):
        # The base class's own weight decay is applied before the update; LAMB's is part of the update.
        super().__init__(name=name, weight_decay=None, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.lamb_weight_decay = weight_decay
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._momentums = [self.add_variable_from_reference(model_variable=v, variable_name="m") for v in var_list]
        self._velocities = [self.add_variable_from_reference(model_variable=v, variable_name="v") for v in var_list]

    def update_step(self, gradient, variable):
        dtype = variable.dtype
        gradient = tf.convert_to_tensor(gradient)  # the engine's gradients are dense; IndexedSlices become dense
        rate = tf.cast(self.learning_rate, dtype) * self._multiplier(variable)
        step = tf.cast(self.iterations + 1, dtype)
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        m.assign(self.beta_1 * m + (1.0 - self.beta_1) * gradient)
        v.assign(self.beta_2 * v + (1.0 - self.beta_2) * tf.square(gradient))
        m_hat = m / (1.0 - tf.pow(tf.cast(self.beta_1, dtype), step))
        v_hat = v / (1.0 - tf.pow(tf.cast(self.beta_2, dtype), step))
        update = m_hat / (tf.sqrt(v_hat) + self.epsilon)
        if self._use_weight_decay(variable):
            if self.lamb_weight_decay:
                update += self.lamb_weight_decay * variable
            w_norm, u_norm = tf.norm(variable), tf.norm(update)
            ratio = tf.where((w_norm > 0.0) & (u_norm > 0.0), w_norm / tf.maximum(u_norm, 1e-30), 1.0)
            update *= ratio
        variable.assign_sub(rate * update)

    def get_config(self):
        config = super().get_config()
        config.update({"learning_rate": self._serialize_hyperparameter(self._learning_rate),
                       "weight_decay": self.lamb_weight_decay, "beta_1": self.beta_1, "beta_2": self.beta_2,
                       "epsilon": self.epsilon})
        return config


def make_optimizer(config: OptimizerConfig, train_steps: int, *, loss_scale: bool) -> tf_keras.optimizers.Optimizer:
    """Builds the optimizer; wraps it in a dynamic LossScaleOptimizer for float16."""
    options = dict(
        learning_rate=make_learning_rate(config, train_steps), weight_decay=config.weight_decay,
        beta_1=config.beta_1, beta_2=config.beta_2, epsilon=config.epsilon,
        # The engine compiles the step itself; the optimizer's own per-variable XLA is not wanted on CPU.
        jit_compile=False)
    if config.optimizer == "lamb":  # LAMB's formula adds epsilon after the bias correction already
        optimizer = LAMB(**options)
    else:
        optimizer = FusedAdamW(**options, epsilon_after_bias_correction=config.epsilon_after_bias_correction)
    optimizer.exclude_from_weight_decay(var_names=list(config.exclude_from_weight_decay))
    if isinstance(optimizer, _LayerwiseLearningRate):
        optimizer.set_layer_decay(config.layer_decay, layer_pattern=config.layer_pattern,
                                  embedding_pattern=config.embedding_pattern)
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
