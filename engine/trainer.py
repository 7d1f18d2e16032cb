"""The Trainer: the only stateful object. Builds the Task under a strategy and runs the loops.

Reads top to bottom like the recipe: strategy -> precision -> model and optimizer in scope ->
distributed input -> compiled loops -> checkpoints, evaluation, summaries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import signal
import threading
import time
from collections import defaultdict
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
import tf_keras
from absl import logging

from engine import averaging, checkpoints, dropout, files, fusion, inputs, optimization, precision, summaries
from engine import step as step_lib, strategy as strategy_lib
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from engine.task import Task


# Where the run ends, for an evaluation sidecar (launch.evaluate --mode=continuous_eval): {"train_steps": N}, plus
# "stopped_at": step after early stopping.
TRAIN_STEPS_FILE = "train_steps.json"


class NonFiniteError(FloatingPointError):
    """Raised under nonfinite_policy="raise"; the offending update was not applied."""


class LostWorkerError(RuntimeError):
    """Another worker of a multi-worker job crashed or became unreachable; restart all workers to resume."""


# What a collective raises when a peer is gone: the coordination service's heartbeat check (seconds after a
# crash), a closed socket, or the collective timeout (RuntimeConfig.collective_timeout_secs).
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                tf.errors.CancelledError)


class Trainer:
    """Runs any Task: `Trainer(task, TrainerConfig(...)).train()`."""

    def __init__(self, task: Task, config: TrainerConfig, optimizer_config: OptimizerConfig = OptimizerConfig(),
                 runtime: RuntimeConfig = RuntimeConfig(), *, strategy: Optional[tf.distribute.Strategy] = None,
                 hparams: Optional[Mapping[str, Any]] = None):
        """`hparams`: what describes the run beyond the configs (the launch flags), for TensorBoard's HParams
        dashboard, where it is shown with the configs' fields."""
        self.task = task
        self._hparams = dict(hparams or {})
        self.config = config
        self.optimizer_config = optimizer_config
        self.runtime = runtime
        self.strategy = strategy or strategy_lib.make_strategy(runtime)
        self.num_replicas = self.strategy.num_replicas_in_sync
        # Only the chief writes summaries and JSON files; checkpoint saves are collective (engine/checkpoints.py).
        self.is_chief, self.worker_index = strategy_lib.worker_role(self.strategy)
        self.num_workers = strategy_lib.num_workers(self.strategy)
        self._agreement = strategy_lib.Agreement(self.strategy)
        # Checks the batch geometry before anything touches model_dir.
        self.per_replica_batch_size = config.per_replica_batch_size(self.num_replicas)
        self.precision = precision.resolve_precision(runtime.precision)
        precision.set_policy(self.precision)
        tf_keras.utils.set_random_seed(runtime.seed)

        with self.strategy.scope():
            self.model = task.build_model()
            # Dropout is always keyed (exact resume); fusion makes its kernel and the activations XLA islands.
            self.fuse_elementwise = fusion.resolve_fuse_elementwise(runtime.fuse_elementwise)  # "auto": CPU only
            self.fused_layers = (fusion.fuse_elementwise(self.model) if self.fuse_elementwise
                                 else {"dropout": dropout.rebind(self.model, xla=False)})
            self.optimizer = optimization.make_optimizer(
                optimizer_config, config.train_steps, loss_scale=self.precision == "mixed_float16")
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.metrics = list(task.build_metrics())
            self.weight_average = (averaging.WeightAverage(self.model.trainable_variables, optimizer_config.ema_decay)
                                   if optimizer_config.ema_decay else None)
        self._model_holds_average = False
        self._train_iterator = None
        self._train_loop = None
        self._eval_step = None
        self._summaries = summaries.Summaries(config.model_dir, enabled=self.is_chief)
        self._preempted = threading.Event()
        self.train_history: list[dict] = []  # one dict per loop: step and the logged values
        self._first_loop = (0, 0.0)
        self._rate = summaries.RecentRate()  # for the console line's ETA
        self._profiling = 0  # while a trace runs: the step it started at
        self._peak_flops: Optional[float] = None  # measured when training is set up

    # ----------------------------------------------------------------------------------- training

    def _setup_training(self) -> Optional[str]:
        """Builds checkpointing, input and the compiled loop; restores the latest checkpoint. Returns its path."""
        cfg = self.config
        self._check_input_geometry()
        # MFU needs the device's peak; measured once (about a second) only if the Task can count its FLOPs, and
        # only for training (an evaluation-only Trainer, as launch.evaluate's, never pays for it).
        if self.task.train_flops_per_example():
            # A GPU/TPU's datasheet peak times its devices, or this CPU's measured one; None for an unknown device.
            self._peak_flops, peak_text = precision.peak_flops(
                self.precision, num_replicas=self.num_replicas, num_workers=self.num_workers,
                override_tflops=self.runtime.peak_tflops)
            logging.info("MFU peak: %s", peak_text)
        with self.strategy.scope():
            self.optimizer.build(self.model.trainable_variables)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, global_step=self.global_step)
        if self.weight_average is not None:
            # Saved inside averaged_weights(): `model` holds the averages (what export and predict load),
            # `weight_average` the raw weights training continues from.
            self.checkpoint.weight_average = self.weight_average
        dataset_fn = functools.partial(self.task.build_inputs, "train")
        per_replica_batch = self.per_replica_batch_size * cfg.grad_accum_steps
        if strategy_lib.is_tpu(self.strategy):
            # A TPU compiles the step once per input shape: refuse, before any compile, shapes not from a fixed set.
            inputs.check_static_shapes(dataset_fn(batch_size=per_replica_batch, input_context=None).element_spec,
                                       task_name=self.task.name)
        iterator_in_checkpoint = inputs.is_default_strategy(self.strategy)
        if iterator_in_checkpoint:
            # The input iterator is part of the state: a resumed run continues on the very next batch.
            self._train_iterator = inputs.train_iterator(self.strategy, dataset_fn, per_replica_batch)
            self.checkpoint.train_iterator = self._train_iterator
        self.saver = checkpoints.Saver(self.checkpoint, cfg.model_dir, max_to_keep=cfg.max_to_keep,
                                       is_chief=self.is_chief, worker_index=self.worker_index,
                                       step_counter=self.global_step)
        restored = checkpoints.restore_latest(self.checkpoint, self.saver.manager)
        if restored and self.weight_average is not None:
            with self.strategy.scope():
                self.weight_average.swap()  # back to raw weights in the model, averages aside
        if self.is_chief:  # only now: a resume that fails (geometry, corrupt checkpoint) leaves model_dir untouched
            path = os.path.join(cfg.model_dir, TRAIN_STEPS_FILE)
            if files.read_json(path) != {"train_steps": cfg.train_steps}:
                files.write_json(path, {"train_steps": cfg.train_steps})
        if not iterator_in_checkpoint:
            self._train_iterator = inputs.train_iterator(
                self.strategy, dataset_fn, per_replica_batch, skip_updates=int(self.global_step.numpy()))
        self.best = (checkpoints.BestCheckpoint(self.checkpoint, cfg.model_dir, cfg.best_metric, cfg.best_metric_mode,
                                                is_chief=self.is_chief, worker_index=self.worker_index)
                     if cfg.best_metric else None)
        self.train_step = step_lib.TrainStep(
            task=self.task, model=self.model, optimizer=self.optimizer, grad_accum_steps=cfg.grad_accum_steps,
            clip_norm=self.optimizer_config.clip_norm, jit_compile=self.runtime.jit_compile,
            weight_average=self.weight_average, seed=self.runtime.seed)
        self._train_loop = step_lib.make_train_loop(
            self.strategy, self.train_step, stop_on_nonfinite=cfg.nonfinite_policy == "raise")
        return restored

    def _check_input_geometry(self) -> None:
        """A resumed run must read its input in the same batches, or its saved position means nothing."""
        cfg = self.config
        geometry = {"global_batch_size": cfg.global_batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                    "replicas": self.num_replicas}
        path = os.path.join(cfg.model_dir, "input_geometry.json")
        saved = files.read_json(path)
        if saved is not None:
            changed = {k: (saved.get(k), v) for k, v in geometry.items() if saved.get(k) != v}
            if changed and tf.train.latest_checkpoint(cfg.model_dir):
                described = ", ".join(f"{k}: saved {old}, now {new}" for k, (old, new) in changed.items())
                raise ValueError(
                    f"{cfg.model_dir} was trained with another input geometry ({described}); resuming would not "
                    "continue its data stream. Use the saved --global_batch_size/--grad_accum_steps/replicas or "
                    "a new --model_dir.")
        if self.is_chief and saved != geometry:
            files.write_json(path, geometry)

    @property
    def train_loop_tracing_count(self) -> int:
        """How often the train loop function was traced (1 after any number of loops, if all is well)."""
        return self._train_loop.experimental_get_tracing_count() if self._train_loop else 0

    def train(self) -> dict:
        """Trains to config.train_steps (resuming from model_dir), evaluating and saving as configured."""
        try:
            return self._train()
        except _PEER_ERRORS as error:
            if self.num_workers == 1:
                raise
            text = str(error)
            peers = sorted(set(re.sub(r"/replica:\d+", "", p) for p in re.findall(r"/job:\w+/\S*?task:\d+", text)))
            # The first line that says what happened ("... tasks are unhealthy", "Connection reset by peer").
            reasons = [line.strip() for line in text.splitlines()
                       if re.search(r"aborted by|unhealthy|reset by peer|[Tt]imeout|timed out|closed", line)]
            raise LostWorkerError(
                f"worker {self.worker_index} lost contact with {', '.join(peers) or 'another worker'} "
                f"({type(error).__name__}: {(reasons or [text.strip().splitlines()[0]])[0][:160]}); the last "
                f"checkpoint is {self.saver.latest_checkpoint}: restart all workers to resume from it") from error

    def _train(self) -> dict:
        cfg = self.config
        restored = self._setup_training() if self._train_loop is None else None
        step = int(self.global_step.numpy())
        if restored:
            print(f"resumed from {restored} at step {step}", flush=True)
        self._log_run_header(step)
        previous_handler = self._install_sigterm_handler()
        self._last_save_time = time.monotonic()
        last_eval: dict = {}
        evals_without_improvement = 0
        try:
            while step < cfg.train_steps:
                num_steps = self._steps_until_boundary(step)
                self._maybe_profile(step, num_steps, start=True)
                start = time.perf_counter()
                steps_done, loss_sum, grad_norm, skipped, overflows = self._train_loop(
                    self._train_iterator, tf.constant(num_steps, tf.int32))
                steps_done = int(steps_done)  # blocks until the loop has finished
                seconds = time.perf_counter() - start
                self._maybe_profile(step, num_steps, start=False)
                step += steps_done
                self.global_step.assign(step)
                skipped, overflows = int(skipped), int(overflows)
                # fp16 loss-scale overflows are routine (the scale halves and training goes on); others are not.
                if skipped > overflows and cfg.nonfinite_policy == "raise":
                    raise NonFiniteError(
                        f"non-finite loss or gradients at step {step} (the update was not applied; "
                        f"last checkpoint: {self.saver.latest_checkpoint}). "
                        "Lower --learning_rate, check the input, or use --nonfinite_policy=skip.")
                self._log_train(step, steps_done, skipped, overflows, float(loss_sum), float(grad_norm), seconds)
                # One decision for all workers at this step boundary: a SIGTERM to any worker stops them all
                # here, and a save due by the clock (each host's clock differs) happens on all or none.
                stop, save_due_by_time = self._agreement.any(
                    self._preempted.is_set(),
                    cfg.checkpoint_every_secs and time.monotonic() - self._last_save_time >= cfg.checkpoint_every_secs)
                if stop:
                    self._save(step)
                    print(f"SIGTERM: saved step {step} ({self.saver.latest_checkpoint or 'collective save'}); "
                          "exiting", flush=True)
                    return last_eval
                at_end = step >= cfg.train_steps
                eval_due = at_end or (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
                if eval_due and cfg.eval_split:
                    with self.averaged_weights():
                        last_eval = self.evaluate()
                        self._summaries.scalars("eval", step, last_eval)
                        summaries.log_line("eval", step, last_eval)
                        if self.best is not None:
                            improved = self.best.update(step, last_eval)
                            evals_without_improvement = 0 if improved else evals_without_improvement + 1
                        self._save(step)
                    if cfg.early_stopping_patience and evals_without_improvement >= cfg.early_stopping_patience:
                        print(f"early stopping at step {step}: {cfg.best_metric} did not improve for "
                              f"{evals_without_improvement} evaluations (best {self.best.best_value:.4f})", flush=True)
                        if self.is_chief:  # a sidecar stops after this checkpoint instead of waiting for its timeout
                            files.write_json(os.path.join(cfg.model_dir, TRAIN_STEPS_FILE),
                                             {"train_steps": cfg.train_steps, "stopped_at": step})
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
        with self.averaged_weights():
            self.saver.save(step)
        self._last_save_time = time.monotonic()

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within this block the model holds the weight averages (with --ema_decay; else a no-op)."""
        if self.weight_average is None or self._model_holds_average:
            yield
            return
        with self.strategy.scope():
            self.weight_average.swap()
        self._model_holds_average = True
        try:
            yield
        finally:
            with self.strategy.scope():
                self.weight_average.swap()
            self._model_holds_average = False

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

    def _log_train(self, step: int, steps_done: int, skipped: int, overflows: int, loss_sum: float,
                   grad_norm: float, seconds: float) -> None:
        applied = steps_done - skipped
        values = {
            "loss": loss_sum / applied if applied else float("nan"),
            "learning_rate": optimization.current_learning_rate(self.optimizer),
            "grad_norm": grad_norm,
            "steps/sec": steps_done / seconds,
            "examples/sec": steps_done * self.config.global_batch_size / seconds,
            "skipped_updates": skipped,
        }
        if isinstance(self.optimizer, tf_keras.mixed_precision.LossScaleOptimizer):
            values["loss_scale"] = float(self.optimizer.loss_scale)
            values["loss_scale_overflows"] = overflows
        flops = self.task.train_flops_per_example()
        if flops and self._peak_flops:
            values["mfu"] = flops * values["examples/sec"] / self._peak_flops
        if not self.train_history:
            self._first_loop = (steps_done, seconds)
        elif len(self.train_history) == 1:
            # The first loop paid for tracing (and XLA compilation): the excess over a steady loop.
            first_steps, first_seconds = self._first_loop
            values["compile_seconds"] = max(first_seconds - first_steps * seconds / steps_done, 0.0)
        self.train_history.append(dict(values, step=step))
        self._summaries.scalars("train", step, values)
        rate = self._rate.mark(step)
        eta = (self.config.train_steps - step) / rate if rate else None
        # `train | step: N |` stays first: tests and scripts look for it.
        progress = summaries.progress_fields(step, self.config.train_steps, eta)
        summaries.log_line("train", step, dict(progress, **values))

    def _log_run_header(self, step: int) -> None:
        cfg = self.config
        params = self.model.count_params()
        tokens = (f"global batch {cfg.global_batch_size} = {self.num_replicas} replicas x "
                  f"{cfg.grad_accum_steps} micro-batches x {self.per_replica_batch_size}")
        print(f"{self.task.name}: {params:,} parameters | {tokens} | precision {self.precision} | "
              f"xla {self.runtime.jit_compile} | "
              f"XLA-fused layers {self.fused_layers if self.fuse_elementwise else 'off'} | "
              f"weight average {self.optimizer_config.ema_decay or 'off'} | "
              f"strategy {type(self.strategy).__name__}", flush=True)
        if step == 0:
            config_text = "\n".join(f"{k}: {v}" for c in (cfg, self.optimizer_config, self.runtime)
                                    for k, v in dataclasses.asdict(c).items())
            self._summaries.text("train", 0, "config", config_text)
            self._summaries.scalars("train", 0, {"parameters": float(params)})
            hparams = {k: v for c in (cfg, self.optimizer_config, self.runtime)
                       for k, v in dataclasses.asdict(c).items()}
            hparams.update(self._hparams)  # launch flags win: the names a user typed
            self._summaries.hparams(hparams)

    def _maybe_profile(self, step: int, num_steps: int, *, start: bool) -> None:
        """A profiler trace of the loops covering steps profile_steps = (first, last), counted from 1, into
        model_dir/train/plugins/profile (TensorBoard's Profile tab, with tensorboard-plugin-profile), as Keras'
        TensorBoard callback writes it. `step` is the step before the loop of `num_steps`. Chief only."""
        if not self.config.profile_steps or not self.is_chief:
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

    # --------------------------------------------------------------------------------- evaluation

    def restore(self, path: Optional[str] = None) -> str:
        """Loads model weights only (for evaluation/prediction) from a checkpoint file or model_dir."""
        path = path or tf.train.latest_checkpoint(self.config.model_dir)
        if path and tf.io.gfile.isdir(path):
            path = tf.train.latest_checkpoint(path)
        if not path:
            raise checkpoints.CheckpointError(f"no checkpoint found in {self.config.model_dir}")
        tf.train.Checkpoint(model=self.model).restore(path).expect_partial()
        if self.weight_average is not None:
            # The checkpoint's model weights are already the averages: evaluating them must not swap them out.
            with self.strategy.scope():
                self.weight_average.reset_to_weights()
        return path

    def predict_outputs(self, split: Optional[str] = None) -> tuple[dict, dict]:
        """Runs the eval step over a split; returns (in-graph metric results, host outputs without padding)."""
        split = split or self.config.eval_split
        if self._eval_step is None:
            self._eval_step = step_lib.make_eval_step(
                self.strategy, self.task, self.model, self.metrics, jit_compile=self.runtime.jit_compile)
        dataset = inputs.distribute_eval_inputs(
            self.strategy, functools.partial(self.task.build_inputs, split), self.config.eval_batch_size)
        for metric in self.metrics:
            metric.reset_state()
        gathered = defaultdict(list)
        progress = summaries.BatchProgress("eval", self._eval_batches(split))  # a line per ~10 s, if that long
        for done, batch in enumerate(dataset, 1):
            for name, value in self._eval_step(batch).items():
                gathered[name].append(value.numpy())
            progress.update(done)
        host = {}
        for name, parts in gathered.items():
            if name in ("_loss_sum", "_weight_sum"):
                host[name] = float(np.sum(parts))
            else:
                host[name] = np.concatenate([np.atleast_1d(p) for p in parts])
        if "_mask" in host:
            keep = host.pop("_mask") > 0
            host = {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in host.items()}
        results = {m.name: float(m.result()) for m in self.metrics}
        weight = host.pop("_weight_sum", 0.0)
        results["loss"] = host.pop("_loss_sum", 0.0) / weight if weight else float("nan")
        return results, host

    def _eval_batches(self, split: str) -> Optional[int]:
        """Global batches in one evaluation of `split` (for progress output), if the Task counts its examples."""
        num_examples = getattr(self.task, "num_examples", None)
        return -(-num_examples(split) // self.config.eval_batch_size) if num_examples else None

    def evaluate(self, split: Optional[str] = None) -> dict:
        """Metrics on a split: in-graph metrics, mean loss, and the Task's host-side postprocess.

        With --ema_decay this evaluates the averaged weights, as the checkpoints hold them."""
        split = split or self.config.eval_split
        with self.averaged_weights():
            results, host = self.predict_outputs(split)
        results.update(self.task.postprocess(host, split, write_files=self.is_chief) or {})
        return results
