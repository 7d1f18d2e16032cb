"""An exponential moving average of the trainable weights, evaluated and saved in their place.

    average <- decay_n * average + (1 - decay_n) * weight,   decay_n = min(decay, (1 + n) / (10 + n))

after update n = 1, 2, ... (the optimizer's count, which like the learning-rate schedule includes skipped
updates): TF1's tf.train.ExponentialMovingAverage with num_updates, so the first updates, far from the
end point, soon stop counting. A skipped (non-finite) update leaves the average alone. Training updates
the raw weights; evaluation and checkpoints use the average.

Why our own and not Model Garden's ExponentialMovingAverage optimizer: that one wraps a legacy Keras
optimizer (ours is the new tf_keras AdamW) and swaps weights by adding and subtracting, which rounds;
here the swap is exact and the average is a plain trackable next to the model in the checkpoint.
"""
from __future__ import annotations

import tensorflow as tf


class WeightAverage(tf.Module):
    """Averages of `variables`; create it under the strategy scope that created them."""

    def __init__(self, variables, decay: float):
        super().__init__(name="weight_average")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema_decay={decay}: expected a value in (0, 1), e.g. 0.999")
        self.decay = decay
        self._variables = list(variables)
        # Identical on every replica (the weights are), so one replica's value is kept: no all-reduce.
        self.averages = [tf.Variable(v.read_value(), trainable=False, name=v.name.split(":")[0] + "/average",
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                         for v in self._variables]

    def update(self, num_updates: tf.Tensor, applied: tf.Tensor) -> None:
        """Folds in the current weights after update `num_updates` (1-based); no-op if not `applied`."""
        n = tf.cast(num_updates, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + n) / (10.0 + n))
        decay = tf.where(applied, decay, 1.0)
        for average, variable in zip(self.averages, self._variables):
            weight = tf.cast(decay, average.dtype)
            average.assign(weight * average + (1.0 - weight) * tf.cast(variable, average.dtype), read_value=False)

    def swap(self) -> None:
        """Exchanges the weights and their averages (exactly; twice is the identity). Cross-replica context."""
        for average, variable in zip(self.averages, self._variables):
            raw = tf.identity(variable.read_value())
            variable.assign(average.read_value(), read_value=False)
            average.assign(raw, read_value=False)

    def reset_to_weights(self) -> None:
        """Averages := weights: after loading averaged weights into the model for evaluation only."""
        for average, variable in zip(self.averages, self._variables):
            average.assign(variable.read_value(), read_value=False)
