"""Checkpoints: the rolling latest ones and the best one by an eval metric.

CheckpointManager writes atomically (temp file then rename of the index), so a crash or
preemption mid-save never leaves a corrupt latest checkpoint behind.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import tensorflow as tf
from absl import logging


class CheckpointError(RuntimeError):
    pass


def restore_latest(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager) -> Optional[str]:
    """Restores the newest checkpoint if there is one; a corrupt or incompatible one is a clear error."""
    path = manager.latest_checkpoint
    if not path:
        return None
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as e:
        raise CheckpointError(
            f"cannot restore {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}. "
            "The checkpoint is corrupt or was written by a different model; it was left untouched. "
            "Use a new --model_dir or remove it by hand.") from e
    logging.info("restored %s", path)
    return path


class BestCheckpoint:
    """Keeps one checkpoint of the best evaluation so far in model_dir/best, with its metrics as JSON."""

    def __init__(self, checkpoint: tf.train.Checkpoint, model_dir: str, metric: str, mode: str):
        self.metric = metric
        self._mode = mode
        self._dir = os.path.join(model_dir, "best")
        self._manager = tf.train.CheckpointManager(checkpoint, self._dir, max_to_keep=1)
        self._json = os.path.join(self._dir, "best_metrics.json")
        self.best_value: Optional[float] = None
        if os.path.exists(self._json):
            with open(self._json, encoding="utf-8") as f:
                self.best_value = json.load(f).get(metric)

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Saves if `metrics[metric]` improved; returns whether it did."""
        if self.metric not in metrics:
            raise KeyError(f"--best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        better = (self.best_value is None or
                  (value > self.best_value if self._mode == "max" else value < self.best_value))
        if better:
            self.best_value = value
            self._manager.save(checkpoint_number=step)
            tmp = self._json + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(dict({k: float(v) for k, v in metrics.items()}, step=step), f, indent=1)
            os.replace(tmp, self._json)
        return better
