"""TensorBoard event files and the one terse console line per loop."""
from __future__ import annotations

import os
from typing import Mapping

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

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def format_line(phase: str, step: int, values: Mapping[str, float]) -> str:
    """`train | step: 1200 | steps/sec: 3.1 | loss: 0.41` (Orbit's style)."""
    parts = [phase, f"step: {step}"]
    for name, value in values.items():
        parts.append(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    return " | ".join(parts)


def log_line(phase: str, step: int, values: Mapping[str, float]) -> None:
    """To stdout, not absl logging: it is the run's progress output, one line per loop."""
    print(format_line(phase, step, values), flush=True)
