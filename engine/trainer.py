"""The Trainer: the only stateful object. Builds the Task under a strategy and does the work the Controller
(engine/controller.py) schedules: N steps of the compiled train loop, an evaluation, a save, a restore.

Reads top to bottom like the recipe: strategy -> precision -> model and optimizer in scope ->
distributed input -> compiled loops -> checkpoints, evaluation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import time
from collections import defaultdict
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
import tf_keras
from absl import logging

from engine import averaging, checkpoints, dropout, files, fusion, inputs, optimization, precision, summaries, timing
from engine import controller as controller_lib, step as step_lib, strategy as strategy_lib
# Raised by train(); callers import them from here.
from engine.controller import LostWorkerError, NonFiniteError  # noqa: F401
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from engine.task import Task


# Where the run ends, for an evaluation sidecar (launch.evaluate --mode=continuous_eval): {"train_steps": N}, plus
# "stopped_at": step after early stopping.
TRAIN_STEPS_FILE = "train_steps.json"


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """What one call of the compiled train loop did: `steps` updates (some `skipped`, of which `overflows` were
    fp16 loss-scale overflows) ending at global `step`, in `seconds` of wall time."""
    step: int
    steps: int
    loss_sum: float
    grad_norm: float
    skipped: int
    overflows: int
    seconds: float


class Trainer:
    """Runs any Task: `Trainer(task, TrainerConfig(...)).train()`."""

    def __init__(self, task: Task, config: TrainerConfig, optimizer_config: OptimizerConfig = OptimizerConfig(),
                 runtime: RuntimeConfig = RuntimeConfig(), *, strategy: Optional[tf.distribute.Strategy] = None,
                 hparams: Optional[Mapping[str, Any]] = None):
        """`hparams`: what describes the run beyond the configs (the launch flags), for TensorBoard's HParams
        dashboard, where it is shown with the configs' fields."""
        self.times = timing.RunTimes()  # where the run's wall time goes (print_time_split)
        self.task = task
        self.hparams = dict(hparams or {})
        self.config = config
        self.optimizer_config = optimizer_config
        self.runtime = runtime
        self.strategy = strategy or strategy_lib.make_strategy(runtime)
        self.num_replicas = self.strategy.num_replicas_in_sync
        # Only the chief writes summaries and JSON files; checkpoint saves are collective (engine/checkpoints.py).
        self.is_chief, self.worker_index = strategy_lib.worker_role(self.strategy)
        self.num_workers = strategy_lib.num_workers(self.strategy)
        # Checks the batch geometry before anything touches model_dir.
        self.per_replica_batch_size = config.per_replica_batch_size(self.num_replicas)
        self.precision = precision.resolve_precision(runtime.precision)
        precision.set_policy(self.precision)
        tf_keras.utils.set_random_seed(runtime.seed)

        with self.strategy.scope():
            self.model = task.build_model()
            # Dropout is always keyed (exact resume); fusion makes its kernel an XLA island and rewrites other layers.
            self.fuse_elementwise = fusion.resolve_fuse_elementwise(runtime.fuse_elementwise)  # "auto": CPU only
            if runtime.skip_padding_in_training and not self.fuse_elementwise and self.is_chief:
                # Not an error: `make demo`'s flagfile asks for it and should still run on a GPU, where "auto" is off.
                print("note: --skip_padding_in_training is one of --fuse_elementwise's rewrites, which are off here: "
                      "training runs on padded batches", flush=True)
            self.fused_layers = (fusion.fuse_elementwise(
                self.model, skip_padding_in_training=runtime.skip_padding_in_training) if self.fuse_elementwise
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
        self._eval_inputs: dict = {}  # split -> its distributed evaluation batches, built once
        self._controller: Optional[controller_lib.Controller] = None  # decides when to train, evaluate, save, stop
        self.peak_flops: Optional[float] = None  # for MFU; measured when training is set up

    # ----------------------------------------------------------------------------------- training

    def setup(self) -> Optional[str]:
        """Builds checkpointing, input and the compiled loop; restores the latest checkpoint. Returns its path
        (None without one, and on later calls: it runs once)."""
        if self._train_loop is not None:
            return None
        cfg = self.config
        self._check_input_geometry()
        # MFU needs the device's peak; measured once (about a second) only if the Task can count its FLOPs, and
        # only for training (an evaluation-only Trainer, as launch.evaluate's, never pays for it).
        if self.task.train_flops_per_example():
            # A GPU/TPU's datasheet peak times its devices, or this CPU's measured one; None for an unknown device.
            self.peak_flops, peak_text = precision.peak_flops(
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
            with self.times.measure("data"):
                spec = dataset_fn(batch_size=per_replica_batch, input_context=None).element_spec
            inputs.check_static_shapes(spec, task_name=self.task.name)
        iterator_in_checkpoint = inputs.is_default_strategy(self.strategy)
        if iterator_in_checkpoint:
            # The input iterator is part of the state: a resumed run continues on the very next batch.
            with self.times.measure("data"):
                self._train_iterator = inputs.train_iterator(self.strategy, dataset_fn, per_replica_batch)
            self.checkpoint.train_iterator = self._train_iterator
        self.saver = checkpoints.Saver(self.checkpoint, cfg.model_dir, max_to_keep=cfg.max_to_keep,
                                       is_chief=self.is_chief, worker_index=self.worker_index,
                                       step_counter=self.global_step)
        restored = checkpoints.restore_latest(self.checkpoint, self.saver.manager)
        if restored and self.weight_average is not None:
            with self.strategy.scope():
                self.weight_average.swap()  # back to raw weights in the model, averages aside
        self.write_train_steps()  # only now: a resume that fails (geometry, corrupt checkpoint) leaves model_dir as is
        if not iterator_in_checkpoint:
            with self.times.measure("data"):
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
        """Trains to config.train_steps (resuming from model_dir), evaluating and saving as configured: the
        Controller decides when, this Trainer does the work. Returns the last evaluation's metrics."""
        if self._controller is None:
            self._controller = controller_lib.Controller(self)
        return self._controller.run()

    @property
    def train_history(self) -> list[dict]:
        """One dict per train loop: its step and the values logged for it."""
        return self._controller.history if self._controller is not None else []

    def run_loop(self, num_steps: int) -> LoopResult:
        """Runs `num_steps` updates in one call of the compiled loop (fewer if it stops at a non-finite update)."""
        start = time.perf_counter()
        steps_done, loss_sum, grad_norm, skipped, overflows = self._train_loop(
            self._train_iterator, tf.constant(num_steps, tf.int32))
        steps_done = int(steps_done)  # blocks until the loop has finished
        seconds = time.perf_counter() - start
        step = int(self.global_step.numpy()) + steps_done
        self.global_step.assign(step)
        return LoopResult(step=step, steps=steps_done, loss_sum=float(loss_sum), grad_norm=float(grad_norm),
                          skipped=int(skipped), overflows=int(overflows), seconds=seconds)

    def save(self, step: int) -> None:
        """A checkpoint of `step` (collective: every worker calls it), holding the weight averages if any."""
        with self.averaged_weights():
            self.saver.save(step)

    def write_train_steps(self, **extra: int) -> None:
        """model_dir/train_steps.json, where the run ends, for an evaluation sidecar (chief only)."""
        if not self.is_chief:
            return
        path = os.path.join(self.config.model_dir, TRAIN_STEPS_FILE)
        value = dict(train_steps=self.config.train_steps, **extra)
        if files.read_json(path) != value:
            files.write_json(path, value)

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

    def print_time_split(self, *, strategy_built: Optional[float] = None) -> dict:
        """Prints `time | total: ... | start-up: ... | data: ... | compile: ... | train: ... | eval: ...` (where
        the run's wall time went, engine/timing.py) and returns those parts in seconds. `strategy_built`: the
        time.monotonic() at which the program had built its strategy (what it did after, before this Trainer, is
        data: the Task's input); default: start-up until this Trainer was built."""
        parts = self.times.split(started=timing.process_start(), strategy_built=strategy_built)
        print(timing.format_line(parts), flush=True)
        return parts

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
            # That step takes any width unless XLA compiles it (then once per width): tell the Task's inputs.
            self.task.eval_width_multiple = 16 if self.runtime.jit_compile else 1
        first_use = split not in self._eval_inputs
        with self.times.measure("data"), self.times.measure("eval_data"):
            if first_use:
                # Built once and iterated again at every evaluation: rebuilding traced the pipeline's
                # functions each time, ~50 ms per evaluation of 256 SST-2 sentences (bench/RESULTS.md).
                self._eval_inputs[split] = inputs.distribute_eval_inputs(
                    self.strategy, functools.partial(self.task.build_inputs, split), self.config.eval_batch_size)
            batches = iter(self._eval_inputs[split])
        if first_use:
            # One trace for every batch width, from the pipeline's spec (widths unknown): left to itself,
            # tf.function traced the first batch's exact shapes, then relaxed ones, three traces of the whole
            # model in the demo's first evaluation (5.6 s of compiling for a 1.4 s evaluation; bench/RESULTS.md).
            with self.times.measure("eval_compile"):
                self._eval_step.get_concrete_function(self._eval_inputs[split].element_spec)
        for metric in self.metrics:
            metric.reset_state()
        gathered = defaultdict(list)
        progress = summaries.BatchProgress("eval", self._eval_batches(split))  # a line per ~10 s, if that long
        seconds, traced = [], []  # per batch: for the time the batches that traced the step spent compiling
        fetch_start = time.perf_counter()
        for done, batch in enumerate(batches, 1):
            start, traces = time.perf_counter(), self._eval_step.experimental_get_tracing_count()
            if done == 1:  # the first batch's preparation (reading, tokenizing, the pipeline's start) is data too
                self.times.seconds["data"] += start - fetch_start
                self.times.seconds["eval_data"] += start - fetch_start
            for name, value in self._eval_step(batch).items():
                gathered[name].append(value.numpy())
            seconds.append(time.perf_counter() - start)
            # A split's first batch also pays the traced graph's first run (optimization, kernel set-up).
            traced.append(self._eval_step.experimental_get_tracing_count() > traces or (first_use and done == 1))
            progress.update(done)
        steady = [t for t, new in zip(seconds, traced) if not new]
        if steady:
            typical = statistics.median(steady)
            self.times.seconds["eval_compile"] += sum(max(t - typical, 0.0) for t, new in zip(seconds, traced) if new)
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
        with self.times.measure("eval"):
            with self.averaged_weights():
                results, host = self.predict_outputs(split)
            results.update(self.task.postprocess(host, split, write_files=self.is_chief) or {})
        return results
