"""TensorBoard event files and the one terse console line per loop."""
from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping, Optional

import tensorflow as tf


class Summaries:
    """One writer per phase under model_dir (train/, eval/), as TensorBoard expects; no-op writers off the chief
    (under several workers every worker computes the same values, and only one should write them)."""

    def __init__(self, model_dir: str, *, enabled: bool = True):
        self._dir = model_dir
        self._enabled = enabled
        self._writers: dict[str, tf.summary.SummaryWriter] = {}

    def writer(self, phase: str) -> tf.summary.SummaryWriter:
        if phase not in self._writers:
            self._writers[phase] = (tf.summary.create_file_writer(os.path.join(self._dir, phase)) if self._enabled
                                    else tf.summary.create_noop_writer())
        return self._writers[phase]

    def scalars(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        with self.writer(phase).as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)
        self.writer(phase).flush()

    def text(self, phase: str, step: int, name: str, value: str) -> None:
        with self.writer(phase).as_default(step=step):
            tf.summary.text(name, value)
        self.writer(phase).flush()

    def hparams(self, values: Mapping[str, Any]) -> None:
        """The run's settings for TensorBoard's HParams dashboard, written to model_dir itself.

        The run that holds the hparams is a "session" and its subfolders' scalars (train/loss, eval/accuracy,
        ...) are its metrics, shown at their last value: so one row per model_dir, comparable across runs
        (seeds, learning rates) when TensorBoard's --logdir is their parent, as Keras' hparams callback does.
        Values other than bool/int/float/str (None, tuples) are shown as text."""
        from tensorboard.plugins.hparams import api as hp  # noqa: PLC0415
        plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}
        with self.writer("").as_default(step=0):
            hp.hparams(plain)
        self.writer("").flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def format_line(phase: str, step: int, values: Mapping[str, float]) -> str:
    """`train | step: 1200 | progress: 1200/6000 (20%) | eta: 3m12s | loss: 0.41 | ...` (Orbit's style: a line per
    loop, `phase | step: N` first, then `name: value` fields in the order given)."""
    parts = [phase, f"step: {step}"]
    for name, value in values.items():
        parts.append(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    return " | ".join(parts)


def log_line(phase: str, step: int, values: Mapping[str, float]) -> None:
    """To stdout, not absl logging: it is the run's progress output, one line per loop."""
    print(format_line(phase, step, values), flush=True)


def format_duration(seconds: float) -> str:
    """`45s`, `3m12s`, `2h05m`, `3d04h`: an ETA's precision, no more."""
    seconds = max(int(round(seconds)), 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{minutes}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{days}d{hours % 24:02d}h"


def progress_fields(done: int, total: int, eta_seconds: Optional[float], *, name: str = "progress") -> dict:
    """{"progress": "120/600 (20%)", "eta": "3m12s"} for a console line (no eta while the rate is unknown)."""
    fields = {name: f"{done}/{total} ({math.floor(100 * done / total) if total else 100}%)"}
    if eta_seconds is not None and math.isfinite(eta_seconds):
        fields["eta"] = format_duration(eta_seconds)
    return fields


class RecentRate:
    """Steps per second over the last `window` loops, by the wall clock between loop ends (evaluations and
    saves in between count: the ETA is when the run ends, not when its last update does)."""

    def __init__(self, window: int = 10, clock=time.monotonic):
        self._window = window
        self._clock = clock
        self._marks: list[tuple[float, int]] = []

    def mark(self, step: int) -> Optional[float]:
        """Records that a loop just reached `step`; returns the recent rate in steps/s, None until a second loop
        has ended (the first loop's time is mostly tracing: 10 s for a step of 0.05 s in the tests' runs)."""
        now = self._clock()
        self._marks = (self._marks + [(now, step)])[-(self._window + 1):]
        (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


class BatchProgress:
    """Prints `eval | batch: 30/120 (25%) | eta: 1m02s` at most every `every_secs` during a long pass over
    batches (silent for passes shorter than that). `total` may be None (then batches done only); `unit` names
    what is counted; `file` (default stdout) lets a library keep a program's stdout for its results."""

    def __init__(self, phase: str, total: Optional[int], *, unit: str = "batch", every_secs: float = 10.0,
                 clock=time.monotonic, file=None):
        self._phase, self._total, self._unit, self._every = phase, total, unit, every_secs
        self._clock = clock
        self._file = file
        self._start = self._last = clock()

    def update(self, done: int) -> Optional[str]:
        """Call after each batch; returns the line it printed, if any."""
        now = self._clock()
        if now - self._last < self._every:
            return None
        self._last = now
        if self._total:
            rate = done / (now - self._start)
            fields = progress_fields(done, self._total, (self._total - done) / rate if rate else None,
                                     name=self._unit)
        else:
            fields = {self._unit: str(done)}
        line = " | ".join([self._phase] + [f"{k}: {v}" for k, v in fields.items()])
        print(line, file=self._file, flush=True)
        return line
