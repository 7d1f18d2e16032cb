"""Checkpoints: the rolling latest ones, the best one by an eval metric, and a careful restore.

CheckpointManager writes atomically (temp file then rename of the index). Under several workers a save
is collective (reading synchronised variables may all-reduce), so every worker saves: the chief into
model_dir, the others into a temporary folder of their own that is removed at once (TF's rule, as in
Keras' BackupAndRestore). All paths go through tf.io.gfile, so model_dir may be gs://.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import tensorflow as tf
from absl import logging

from engine import files


class CheckpointError(RuntimeError):
    pass


_RESTORE_ERRORS = (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError)


def restore_latest(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager) -> Optional[str]:
    """Restores the newest readable checkpoint; returns its path, or None if there is none.

    A corrupt or truncated newest checkpoint (a host lost mid-write on a file system without atomic
    rename, a damaged disk) is reported and the previous kept one restored instead; nothing is deleted.
    """
    candidates = list(reversed(manager.checkpoints))
    first_error = None
    for path in candidates:
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except _RESTORE_ERRORS as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            first_error = first_error or (path, reason)
            print(f"warning: cannot restore {path} ({reason}); it was left untouched, trying an older checkpoint",
                  flush=True)
            continue
        logging.info("restored %s", path)
        return path
    if first_error:
        path, reason = first_error
        raise CheckpointError(
            f"cannot restore {path} ({reason}) nor any older checkpoint in {manager.directory}: corrupt or written "
            "by a different model. They were left untouched; use a new --model_dir or remove them by hand.")
    return None


class Saver:
    """Saves `checkpoint` as step N: the chief into `directory` (kept max_to_keep), others into a temp dir."""

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, *, max_to_keep: int, is_chief: bool,
                 worker_index: int, step_counter: Optional[tf.Variable] = None):
        self._checkpoint = checkpoint
        self._is_chief = is_chief
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep,
                                                  step_counter=step_counter)
        self._temp_dir = os.path.join(directory, f"workertemp_{worker_index}")

    @property
    def latest_checkpoint(self) -> Optional[str]:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> Optional[str]:
        if self._is_chief:
            return self.manager.save(checkpoint_number=step)
        tf.train.CheckpointManager(self._checkpoint, self._temp_dir, max_to_keep=1).save(checkpoint_number=step)
        tf.io.gfile.rmtree(self._temp_dir)
        return None


class BestCheckpoint:
    """Keeps one checkpoint of the best evaluation so far in model_dir/best (or model_dir/<folder>), with its
    metrics as JSON.

    Every worker takes the same decision (evaluation results are gathered from all workers, and the best
    value so far is read from the same file), so all join the collective save."""

    def __init__(self, checkpoint: tf.train.Checkpoint, model_dir: str, metric: str, mode: str, *,
                 is_chief: bool = True, worker_index: int = 0, folder: str = "best"):
        self.metric = metric
        self._mode = mode
        self._is_chief = is_chief
        directory = os.path.join(model_dir, folder)
        self._saver = Saver(checkpoint, directory, max_to_keep=1, is_chief=is_chief, worker_index=worker_index)
        self._json = os.path.join(directory, "best_metrics.json")
        saved = files.read_json(self._json) or {}
        self.best_value: Optional[float] = saved.get(metric)

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Saves if `metrics[metric]` improved; returns whether it did."""
        if self.metric not in metrics:
            raise KeyError(f"--best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        better = (self.best_value is None or
                  (value > self.best_value if self._mode == "max" else value < self.best_value))
        if better:
            self.best_value = value
            self._saver.save(step)
            if self._is_chief:
                files.write_json(self._json, dict({k: float(v) for k, v in metrics.items()}, step=step))
        return better
