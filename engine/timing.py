"""Where a run's wall time went, for time to accuracy: start-up, data, compile, train, eval.

`time | total: 3m45s | start-up: 9.1s | data: 12.0s | compile: 8.3s | train: 3m10s | eval: 25.4s`, printed at the
end of launch.train. The Trainer adds up the seconds where the work happens (input pipelines, evaluation), the
Controller those of the loop; `split` turns them into parts of the time since the process started.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Optional

import engine
from engine import host, summaries

PARTS = ("start-up", "data", "compile", "train", "eval")


def process_start() -> float:
    """When this process started, on time.monotonic()'s clock: from /proc on Linux (the interpreter's own start-up
    and TensorFlow's import count), else when the engine package was imported (first thing launch programs do)."""
    age = host.process_age_seconds()
    if age is not None:
        return time.monotonic() - age
    return engine.IMPORTED_AT


class RunTimes:
    """Seconds per kind of work, added up as it happens. Keys: "data" (input pipelines, evaluation's included),
    "eval" (evaluations, whole), "eval_data" and "eval_compile" (their shares of it), "train_compile", "loop" (the
    train loop, whole: its evaluations and saves included)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.created = clock()  # the Trainer's construction: model building and checkpoint restore are start-up
        self.loop_started: Optional[float] = None  # the first train loop's start: start-up ends here
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def measure(self, key: str):
        start = self._clock()
        try:
            yield
        finally:
            self.seconds[key] += self._clock() - start

    def split(self, *, started: float, strategy_built: Optional[float] = None, now: Optional[float] = None) -> dict:
        """{"total", "start-up", ...} in seconds. `strategy_built`: when the program had its strategy; until the
        Trainer was built it prepared the Task (tokenizing for --train_epochs, say), which counts as data."""
        s = self.seconds
        now = self._clock() if now is None else now
        before_task = min(strategy_built if strategy_built is not None else self.created, self.created)
        setup_data = s["data"] - s["eval_data"]
        loop_started = self.loop_started if self.loop_started is not None else now
        return {
            "total": now - started,
            "start-up": (before_task - started) + (loop_started - self.created - setup_data),
            "data": (self.created - before_task) + s["data"],
            "compile": s["train_compile"] + s["eval_compile"],
            "train": s["loop"] - s["eval"] - s["train_compile"],
            "eval": s["eval"] - s["eval_data"] - s["eval_compile"],
        }


def format_seconds(seconds: float) -> str:
    """`9.1s` under a minute, else summaries.format_duration's `3m10s`."""
    return f"{seconds:.1f}s" if seconds < 59.95 else summaries.format_duration(seconds)


def format_line(parts: dict) -> str:
    return " | ".join(["time"] + [f"{name}: {format_seconds(parts[name])}" for name in ("total",) + PARTS])
