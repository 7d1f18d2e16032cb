"""The Controller: the training policy, as Orbit's. It decides when the Trainer trains, evaluates, saves and stops.

The Trainer (engine/trainer.py) does the work: compiled loops of N steps, evaluation, checkpoints, restore.
Here is only the *when* and what the user sees: loops that end at evaluations, checkpoints and profiled steps;
saves by step count and by the clock; early stopping; SIGTERM, agreed by all workers at a step boundary; the run
header and one line per loop (with MFU and ETA); the profiler trace.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from typing import Any

import tensorflow as tf
import tf_keras

from engine import optimization, strategy as strategy_lib, summaries


class NonFiniteError(FloatingPointError):
    """Raised under nonfinite_policy="raise"; the offending update was not applied."""


class LostWorkerError(RuntimeError):
    """Another worker of a multi-worker job crashed or became unreachable; restart all workers to resume."""


# What a collective raises when a peer is gone: the coordination service's heartbeat check (seconds after a
# crash), a closed socket, or the collective timeout (RuntimeConfig.collective_timeout_secs).
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                tf.errors.CancelledError)


class Controller:
    """Runs a Trainer's training to config.train_steps: `Controller(trainer).run()` (what `Trainer.train()` does).

    `trainer` is an engine.trainer.Trainer (not imported: the Trainer imports this module)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.config = trainer.config
        self._agreement = strategy_lib.Agreement(trainer.strategy)
        self._summaries = summaries.Summaries(self.config.model_dir, enabled=trainer.is_chief)
        self._preempted = threading.Event()
        self.history: list[dict] = []  # one dict per loop: step and the logged values
        self._first_loop = (0, 0.0)
        self._rate = summaries.RecentRate()  # for the console line's ETA
        self._profiling = 0  # while a trace runs: the step it started at
        self._last_save_time = time.monotonic()

    def run(self) -> dict:
        """Trains to config.train_steps (resuming from model_dir), evaluating and saving as configured; returns the
        last evaluation's metrics."""
        try:
            return self._run()
        except _PEER_ERRORS as error:
            trainer = self.trainer
            if trainer.num_workers == 1:
                raise
            text = str(error)
            peers = sorted(set(re.sub(r"/replica:\d+", "", p) for p in re.findall(r"/job:\w+/\S*?task:\d+", text)))
            # The first line that says what happened ("... tasks are unhealthy", "Connection reset by peer").
            reasons = [line.strip() for line in text.splitlines()
                       if re.search(r"aborted by|unhealthy|reset by peer|[Tt]imeout|timed out|closed", line)]
            raise LostWorkerError(
                f"worker {trainer.worker_index} lost contact with {', '.join(peers) or 'another worker'} "
                f"({type(error).__name__}: {(reasons or [text.strip().splitlines()[0]])[0][:160]}); the last "
                f"checkpoint is {trainer.saver.latest_checkpoint}: restart all workers to resume from it") from error

    def _run(self) -> dict:
        cfg, trainer = self.config, self.trainer
        restored = trainer.setup()
        step = int(trainer.global_step.numpy())
        if restored:
            print(f"resumed from {restored} at step {step}", flush=True)
        self._log_run_header(step)
        previous_handler = self._install_sigterm_handler()
        self._last_save_time = time.monotonic()
        last_eval: dict = {}
        evals_without_improvement = 0
        if trainer.times.loop_started is None:
            trainer.times.loop_started = time.monotonic()
        try:
            with trainer.times.measure("loop"):
                while step < cfg.train_steps:
                    num_steps = self._steps_until_boundary(step)
                    self._maybe_profile(step, num_steps, start=True)
                    done = trainer.run_loop(num_steps)
                    self._maybe_profile(step, num_steps, start=False)
                    step = done.step
                    # fp16 loss-scale overflows are routine (the scale halves and training goes on); others are not.
                    if done.skipped > done.overflows and cfg.nonfinite_policy == "raise":
                        raise NonFiniteError(
                            f"non-finite loss or gradients at step {step} (the update was not applied; "
                            f"last checkpoint: {trainer.saver.latest_checkpoint}). "
                            "Lower --learning_rate, check the input, or use --nonfinite_policy=skip.")
                    self._log_train(step, done)
                    # One decision for all workers at this step boundary: a SIGTERM to any worker stops them all
                    # here, and a save due by the clock (each host's clock differs) happens on all or none.
                    stop, save_due_by_time = self._agreement.any(
                        self._preempted.is_set(),
                        cfg.checkpoint_every_secs and
                        time.monotonic() - self._last_save_time >= cfg.checkpoint_every_secs)
                    if stop:
                        self._save(step)
                        print(f"SIGTERM: saved step {step} ({trainer.saver.latest_checkpoint or 'collective save'}); "
                              "exiting", flush=True)
                        return last_eval
                    at_end = step >= cfg.train_steps
                    eval_due = at_end or (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
                    if eval_due and cfg.eval_split:
                        with trainer.averaged_weights():
                            last_eval = trainer.evaluate()
                            self._summaries.scalars("eval", step, last_eval)
                            summaries.log_line("eval", step, last_eval)
                            if trainer.best is not None:
                                improved = trainer.best.update(step, last_eval)
                                evals_without_improvement = 0 if improved else evals_without_improvement + 1
                            self._save(step)
                        if cfg.early_stopping_patience and evals_without_improvement >= cfg.early_stopping_patience:
                            print(f"early stopping at step {step}: {cfg.best_metric} did not improve for "
                                  f"{evals_without_improvement} evaluations (best {trainer.best.best_value:.4f})",
                                  flush=True)
                            # A sidecar stops after this checkpoint instead of waiting for its timeout.
                            trainer.write_train_steps(stopped_at=step)
                            break
                    # Without an eval split (launch.train --mode=train: a sidecar evaluates), still save where an
                    # evaluation would have been, so the sidecar sees the same checkpoints.
                    elif (eval_due or save_due_by_time or
                          (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)):
                        self._save(step)
        finally:
            if self._profiling:  # an error inside the profiled steps: keep what was traced
                tf.profiler.experimental.stop()
                self._profiling = 0
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            self._summaries.close()
        return last_eval

    def _save(self, step: int) -> None:
        self.trainer.save(step)
        self._last_save_time = time.monotonic()

    def _steps_until_boundary(self, step: int) -> int:
        """Loops end exactly at eval/checkpoint boundaries and at train_steps."""
        cfg = self.config
        limit = min(cfg.steps_per_loop, cfg.train_steps - step)
        for every in (cfg.eval_every_steps, cfg.checkpoint_every_steps):
            if every:
                limit = min(limit, every - step % every)
        # A profile covers whole loops: one ends before the first profiled step and one at the last.
        for end in ((cfg.profile_steps[0] - 1, cfg.profile_steps[1]) if cfg.profile_steps else ()):
            if end > step:
                limit = min(limit, end - step)
        return limit

    def _log_train(self, step: int, done: Any) -> None:
        """`done`: the Trainer's LoopResult."""
        trainer = self.trainer
        applied = done.steps - done.skipped
        values = {
            "loss": done.loss_sum / applied if applied else float("nan"),
            "learning_rate": optimization.current_learning_rate(trainer.optimizer),
            "grad_norm": done.grad_norm,
            "steps/sec": done.steps / done.seconds,
            "examples/sec": done.steps * self.config.global_batch_size / done.seconds,
            "skipped_updates": done.skipped,
        }
        if isinstance(trainer.optimizer, tf_keras.mixed_precision.LossScaleOptimizer):
            values["loss_scale"] = float(trainer.optimizer.loss_scale)
            values["loss_scale_overflows"] = done.overflows
        flops = trainer.task.train_flops_per_example()
        if flops and trainer.peak_flops:
            values["mfu"] = flops * values["examples/sec"] / trainer.peak_flops
        if not self.history:
            self._first_loop = (done.steps, done.seconds)
        elif len(self.history) == 1:
            # The first loop paid for tracing (and XLA compilation): the excess over a steady loop.
            first_steps, first_seconds = self._first_loop
            values["compile_seconds"] = max(first_seconds - first_steps * done.seconds / done.steps, 0.0)
            trainer.times.seconds["train_compile"] += values["compile_seconds"]
        self.history.append(dict(values, step=step))
        self._summaries.scalars("train", step, values)
        rate = self._rate.mark(step)
        eta = (self.config.train_steps - step) / rate if rate else None
        # `train | step: N |` stays first: tests and scripts look for it.
        progress = summaries.progress_fields(step, self.config.train_steps, eta)
        summaries.log_line("train", step, dict(progress, **values))

    def _log_run_header(self, step: int) -> None:
        cfg, trainer = self.config, self.trainer
        params = trainer.model.count_params()
        tokens = (f"global batch {cfg.global_batch_size} = {trainer.num_replicas} replicas x "
                  f"{cfg.grad_accum_steps} micro-batches x {trainer.per_replica_batch_size}")
        print(f"{trainer.task.name}: {params:,} parameters | {tokens} | precision {trainer.precision} | "
              f"xla {trainer.runtime.jit_compile} | "
              f"fused layers {trainer.fused_layers if trainer.fuse_elementwise else 'off'} | "
              f"weight average {trainer.optimizer_config.ema_decay or 'off'} | "
              f"strategy {type(trainer.strategy).__name__}", flush=True)
        if step == 0:
            configs = (cfg, trainer.optimizer_config, trainer.runtime)
            config_text = "\n".join(f"{k}: {v}" for c in configs for k, v in dataclasses.asdict(c).items())
            self._summaries.text("train", 0, "config", config_text)
            self._summaries.scalars("train", 0, {"parameters": float(params)})
            hparams = {k: v for c in configs for k, v in dataclasses.asdict(c).items()}
            hparams.update(trainer.hparams)  # launch flags win: the names a user typed
            self._summaries.hparams(hparams)

    def _maybe_profile(self, step: int, num_steps: int, *, start: bool) -> None:
        """A profiler trace of the loops covering steps profile_steps = (first, last), counted from 1, into
        model_dir/train/plugins/profile (TensorBoard's Profile tab, with tensorboard-plugin-profile), as Keras'
        TensorBoard callback writes it. `step` is the step before the loop of `num_steps`. Chief only."""
        if not self.config.profile_steps or not self.trainer.is_chief:
            return
        first, last = self.config.profile_steps
        if start and not self._profiling and step < last and step + num_steps >= first:
            tf.profiler.experimental.start(os.path.join(self.config.model_dir, "train"))
            self._profiling = step + 1
        elif not start and self._profiling and step + num_steps >= last:
            tf.profiler.experimental.stop()
            print(f"profiled steps {self._profiling}-{step + num_steps} into "
                  f"{os.path.join(self.config.model_dir, 'train', 'plugins', 'profile')}", flush=True)
            self._profiling = 0

    def _install_sigterm_handler(self):
        """SIGTERM (preemption, `kill`) sets a flag; the loop saves a checkpoint at its end and exits."""
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGTERM, lambda signum, frame: self._preempted.set())
