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


# ------------------------------------------- restoring a trained model (predict, export, evaluate, soup)

def resolve_checkpoint(checkpoint: str) -> str:
    """A launch.train model_dir (its latest checkpoint) or a checkpoint prefix -> the prefix."""
    if os.path.isdir(checkpoint):
        latest = tf.train.latest_checkpoint(checkpoint)
        if latest:
            return latest
        found = sorted(os.listdir(checkpoint))[:12]
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: expected a launch.train --model_dir with a `checkpoint` "
                                f"file (or a checkpoint prefix such as {os.path.join(checkpoint, 'ckpt-100')}); the "
                                f"folder has {found or 'nothing'}")
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: no such folder or checkpoint (expected a launch.train "
                                f"--model_dir or a prefix with a {os.path.basename(checkpoint)}.index file)")
    return checkpoint


def _object_graph(reader):
    from tensorflow.core.protobuf import trackable_object_graph_pb2  # noqa: PLC0415
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph


def _model_layout(prefix: str) -> Optional[tuple[dict, dict]]:
    """({variable key: shape}, {model child: sorted variable shapes under it}) of a checkpoint's `model`;
    None if it has no `model` (e.g. a bare encoder checkpoint)."""
    # The reader itself, not tf.train.load_checkpoint: that takes a ram:// prefix for a folder.
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    shapes = reader.get_variable_to_shape_map()
    graph = _object_graph(reader)
    roots = {child.local_name: child.node_id for child in graph.nodes[0].children}
    if "model" not in roots:
        return None
    variables = {key: tuple(shape) for key, shape in shapes.items()
                 if key.startswith("model/") and key.endswith("VARIABLE_VALUE") and "OPTIMIZER_SLOT" not in key}

    def shapes_under(node_id: int) -> list:
        seen, stack, found = {node_id}, [node_id], []
        while stack:
            node = graph.nodes[stack.pop()]
            found += [list(shapes[a.checkpoint_key]) for a in node.attributes
                      if a.name == "VARIABLE_VALUE" and a.checkpoint_key in shapes]
            for child in node.children:
                if child.node_id not in seen:
                    seen.add(child.node_id)
                    stack.append(child.node_id)
        return sorted(found)

    children = {c.local_name: shapes_under(c.node_id) for c in graph.nodes[roots["model"]].children}
    return variables, children


def _shorten(items: list, limit: int = 8) -> str:
    return "; ".join(items[:limit]) + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def restore_model(model: "tf.keras.Model", checkpoint: str, *, expected: str) -> str:
    """Loads the `model` weights of a launch.train checkpoint; returns the checkpoint prefix used.

    The checkpoint must hold exactly this model: same variables and shapes AND the same layer layout
    (a 2-class classifier and a span-QA head have identical variables, only their layer order
    differs). Anything else is one ValueError naming `expected` and what the checkpoint holds.
    """
    prefix = resolve_checkpoint(checkpoint)
    try:
        found = _model_layout(prefix)
    except (tf.errors.OpError, ValueError) as error:
        raise ValueError(f"checkpoint {prefix!r} cannot be read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); expected a launch.train checkpoint of "
                         f"{expected}") from None
    if found is None:
        graph = _object_graph(tf.compat.v1.train.NewCheckpointReader(prefix))
        held = sorted(child.local_name for child in graph.nodes[0].children)
        raise ValueError(f"checkpoint {prefix!r} holds {held}, not a `model`: expected a launch.train checkpoint of "
                         f"{expected} (an encoder checkpoint goes to --init_encoder)")
    reference = "ram://serving_reference/" + os.urandom(6).hex()
    try:
        want = _model_layout(tf.train.Checkpoint(model=model).write(reference + "/ckpt"))
    finally:
        tf.io.gfile.rmtree(reference)
    (want_vars, want_layout), (found_vars, found_layout) = want, found
    problems = []
    missing = [f"{k} {list(s)}" for k, s in want_vars.items() if k not in found_vars]
    unexpected = [f"{k} {list(s)}" for k, s in found_vars.items() if k not in want_vars]
    mis_shaped = [f"{k}: expected {list(s)}, found {list(found_vars[k])}" for k, s in want_vars.items()
                  if k in found_vars and found_vars[k] != s]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            problems.append(f"{len(items)} {title} variable(s): {_shorten(sorted(items))}")
    if not problems:
        layout = [f"model/{name}: expected {len(want_layout.get(name, []))} variable(s) "
                  f"{want_layout.get(name, [])[:2]}, found {len(found_layout.get(name, []))} "
                  f"{found_layout.get(name, [])[:2]}"
                  for name in sorted(set(want_layout) | set(found_layout))
                  if want_layout.get(name) != found_layout.get(name)]
        if layout:
            problems.append("a different layer layout (another task's model?): " + _shorten(layout))
    if problems:
        raise ValueError(f"checkpoint {prefix!r} does not match {expected} ({len(want_vars)} model variables); "
                         f"it holds {len(found_vars)} model variables with\n  " + "\n  ".join(problems))
    status = tf.train.Checkpoint(model=model).read(prefix)
    status.assert_existing_objects_matched().expect_partial()
    return prefix
