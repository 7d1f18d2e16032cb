"""Evaluates launch.train checkpoints: one checkpoint, or every checkpoint of a run as it trains (a sidecar).

  python -m launch.evaluate --checkpoint=runs/sst2                      # its latest checkpoint, validation split
  python -m launch.evaluate --checkpoint=runs/ner/ckpt-1200 --split=test
  python -m launch.evaluate --checkpoint=runs/sst2/best --eval_data=other_dev.tsv --eval_name=other
  python -m launch.evaluate --mode=continuous_eval --model_dir=gs://bucket/runs/sst2 --best_metric=accuracy

One checkpoint (`--mode=eval`, the default): prints `eval | step: N | <metrics>` (the line launch.train prints
for an evaluation) and writes the metrics as JSON (`--output_json`, default
`<checkpoint folder>/<eval_name>_<split>-<step>.json`).

A sidecar (`--mode=continuous_eval`), beside `launch.train --mode=train` (a TPU VM's devices train, another
machine evaluates, as with Model Garden's continuous_eval): waits for the checkpoints of --model_dir
(`tf.train.checkpoints_iterator`) and evaluates each once, oldest first (one kept after a newer one appeared is
not skipped), writing TensorBoard summaries at the checkpoint's step into model_dir/<eval_name> (default
model_dir/eval, beside train/), the latest results to model_dir/<eval_name>/eval_results.json (a restarted
sidecar resumes after that step) and, with --best_metric, the best checkpoint to model_dir/best (with another
--eval_name: model_dir/best_<eval_name>). It exits 0 after evaluating the final step's checkpoint (--train_steps,
default the one launch.train saved in model_dir/train_steps.json) or when no new checkpoint has appeared for
--timeout_secs. Keep --max_to_keep of the training large enough that checkpoints outlive their evaluation.

--task and the flags that shape the model default to those launch.train saved with the run (model_flags.json);
data flags (--eval_data, --data_dir, ...) and --class_weights (the eval loss) are not saved: pass them again.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

from engine.config import RuntimeConfig  # noqa: E402  (light: no TensorFlow)
from launch import common_flags, config_flags, errors  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "eval", ["eval", "continuous_eval"],
                  "eval: one checkpoint (--checkpoint). continuous_eval: every new checkpoint of --model_dir, until "
                  "the final one or --timeout_secs without a new one.")
flags.DEFINE_string("checkpoint", None, "--mode=eval: a checkpoint (runs/x/ckpt-400, runs/x/best/ckpt-300) or a "
                    "launch.train model_dir (its latest checkpoint).")
flags.DEFINE_string("model_dir", None, "--mode=continuous_eval: the launch.train model_dir to follow.")
flags.DEFINE_string("split", None, "Split to evaluate (default: the task's evaluation split, `validation`; "
                    "conll_ner also has `test`).")
flags.DEFINE_string("eval_name", "eval", "Name of this evaluation: its TensorBoard folder model_dir/<eval_name> "
                    "and results file names (e.g. eval_test for a second sidecar on --split=test).")
flags.DEFINE_string("output_json", None, "--mode=eval: where to write the metrics (default "
                    "<checkpoint folder>/<eval_name>_<split>-<step>.json).")
flags.DEFINE_float("timeout_secs", 3600, "--mode=continuous_eval: stop when no new checkpoint appeared for this long.")
common_flags.define_cpu_devices()
common_flags.define_task()
common_flags.define_data()
# The options of the configs, with the help and defaults declared on their fields (launch/config_flags.py): where
# and how (as launch.train; multi_worker_mirrored: --mode=eval only), the evaluation, and the Task's (default: as
# launch.train saved them with the run; data flags and --class_weights, which weight the eval loss, are not saved).
config_flags.define([name for name in config_flags.config_flag_names(RuntimeConfig)
                     if name not in ("peak_tflops", "seed")])
config_flags.define(["eval_batch_size", "best_metric", "best_metric_mode", "train_steps"])
config_flags.define([name for name in config_flags.task_flag_names()
                     if name not in ("max_train_sentences", "group_by_length", "seed")])

_OWN_FLAGS = ("mode", "checkpoint", "split", "eval_name", "output_json", "timeout_secs", "train_steps",
              "best_metric", "best_metric_mode", "verbose_errors")


def checkpoint_step(path: str) -> int:
    """The training step of a checkpoint: the N of ckpt-N (the Trainer saves step N so), else its global_step."""
    import tensorflow as tf  # noqa: PLC0415
    found = re.search(r"-(\d+)$", path)
    if found:
        return int(found.group(1))
    try:
        return int(tf.train.load_checkpoint(path).get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE"))
    except (tf.errors.OpError, ValueError, KeyError):
        return 0


def kept_checkpoints(model_dir: str) -> list[str]:
    """The checkpoints model_dir's CheckpointManager keeps, oldest first (as full paths)."""
    import tensorflow as tf  # noqa: PLC0415
    state = tf.train.get_checkpoint_state(model_dir)
    paths = list(state.all_model_checkpoint_paths) if state else []
    return [p if os.path.isabs(p) or "://" in p else os.path.join(model_dir, p) for p in paths]


class Evaluator:
    """The engine's Trainer used for evaluation only: build the Task's model once, then restore and evaluate."""

    def __init__(self, strategy, run_dir: str, first_checkpoint: str):
        from engine.config import TrainerConfig  # noqa: PLC0415
        from engine.trainer import Trainer  # noqa: PLC0415
        from tasks import registry  # noqa: PLC0415
        from engine import checkpoints  # noqa: PLC0415

        registry.fill_unset_flags(FLAGS, first_checkpoint)
        if FLAGS.task is None:
            raise app.UsageError(f"--task is needed: {first_checkpoint} has no {registry.MODEL_FLAGS_FILE} from "
                                 "launch.train beside it")
        values = config_flags.launch_values(FLAGS, exclude=_OWN_FLAGS)
        values["model_dir"] = run_dir  # squad writes predictions_<split>.json there unless --predictions_dir
        task, eval_split = registry.build_task(FLAGS.task, values)
        self.split = FLAGS.split or eval_split
        if FLAGS.eval_data and self.split != eval_split:
            raise ValueError(f"--eval_data replaces the {eval_split} split's file; it does not go with "
                             f"--split={self.split} (give one of the two)")
        config = TrainerConfig(model_dir=run_dir, train_steps=1, global_batch_size=FLAGS.eval_batch_size,
                               eval_batch_size=FLAGS.eval_batch_size, eval_split=self.split)
        runtime = config_flags.build(RuntimeConfig, FLAGS)
        self.trainer = Trainer(task, config, runtime=runtime, strategy=strategy)
        # Once: refuse a checkpoint of another model (Trainer.restore loads whatever matches, for speed).
        shown = " ".join(f"--{k}={v}" for k, v in sorted(values.items()) if v is not None and k in registry.MODEL_FLAGS)
        checkpoints.restore_model(self.trainer.model, first_checkpoint, expected=f"--task={FLAGS.task} {shown}")

    def evaluate(self, checkpoint: str) -> tuple[int, dict]:
        """(step, metrics) of one checkpoint on the split; prints the line launch.train prints for an evaluation."""
        from engine import summaries  # noqa: PLC0415
        path = self.trainer.restore(checkpoint)
        step = checkpoint_step(path)
        metrics = self.trainer.evaluate(self.split)
        summaries.log_line("eval", step, metrics)
        return step, metrics


def _make_strategy():
    from engine import strategy as strategy_lib  # noqa: PLC0415
    if FLAGS.cpu_devices:
        strategy_lib.split_cpu(FLAGS.cpu_devices)
    # First TF work of the program, as in launch.train (MultiWorkerMirroredStrategy requires it).
    return strategy_lib.make_strategy(config_flags.build(RuntimeConfig, FLAGS))


def evaluate_once(strategy) -> dict:
    import tensorflow as tf  # noqa: PLC0415
    from engine import files  # noqa: PLC0415
    from engine import checkpoints  # noqa: PLC0415
    if not FLAGS.checkpoint:
        raise app.UsageError("--mode=eval needs --checkpoint (a checkpoint or a launch.train model_dir)")
    # A missing checkpoint fails before a model is built. tf.io.gfile: the model_dir may be gs://.
    if tf.io.gfile.isdir(FLAGS.checkpoint):
        run_dir, path = FLAGS.checkpoint, tf.train.latest_checkpoint(FLAGS.checkpoint)
        if not path:
            raise FileNotFoundError(f"--checkpoint={FLAGS.checkpoint}: no checkpoint in this folder (expected a "
                                    "launch.train --model_dir, or a checkpoint prefix such as <model_dir>/ckpt-100)")
    else:
        path = checkpoints.resolve_checkpoint(FLAGS.checkpoint)
        run_dir = os.path.dirname(path)
    evaluator = Evaluator(strategy, run_dir, path)
    step, metrics = evaluator.evaluate(path)
    if evaluator.trainer.is_chief:
        output = FLAGS.output_json or os.path.join(os.path.dirname(path),
                                                   f"{FLAGS.eval_name}_{evaluator.split}-{step}.json")
        files.write_json(output, dict(metrics, step=step, checkpoint=path, split=evaluator.split))
        print(f"wrote {output}", flush=True)
    return metrics


def best_folder() -> str:
    """model_dir/best for the evaluation named eval (where launch.train keeps its own), else best_<eval_name>."""
    return "best" if FLAGS.eval_name == "eval" else f"best_{FLAGS.eval_name}"


def final_step(model_dir: str) -> Optional[int]:
    """--train_steps, else what launch.train saved: its train_steps, or the step it stopped early at (read each
    time: a resumed run may train longer)."""
    from engine import files  # noqa: PLC0415
    from engine.trainer import TRAIN_STEPS_FILE  # noqa: PLC0415
    if FLAGS.train_steps:
        return FLAGS.train_steps
    saved = files.read_json(os.path.join(model_dir, TRAIN_STEPS_FILE)) or {}
    return saved.get("stopped_at", saved.get("train_steps"))


def evaluate_continuously(strategy) -> None:
    import tensorflow as tf  # noqa: PLC0415
    from engine import checkpoints, files, strategy as strategy_lib, summaries  # noqa: PLC0415
    model_dir = FLAGS.model_dir
    if not model_dir:
        raise app.UsageError("--mode=continuous_eval needs --model_dir (the launch.train run to follow)")
    if strategy_lib.num_workers(strategy) > 1:
        raise ValueError("--mode=continuous_eval runs on one host (workers would see checkpoints at different "
                         "times); use --strategy=mirrored or tpu, or --mode=eval per checkpoint")
    results_path = os.path.join(model_dir, FLAGS.eval_name, "eval_results.json")
    last_step = (files.read_json(results_path) or {}).get("step", -1)  # a restarted sidecar goes on after it
    if last_step >= 0:
        final = final_step(model_dir)
        if final is not None and last_step >= final:
            print(f"{results_path}: the final checkpoint (step {last_step}) was evaluated already; done", flush=True)
            return
        print(f"{results_path}: checkpoints up to step {last_step} were evaluated; waiting for newer ones", flush=True)
    evaluator = best = writer = None
    print(f"waiting for checkpoints in {model_dir} (timeout {FLAGS.timeout_secs:g} s)", flush=True)
    for _ in tf.train.checkpoints_iterator(model_dir, timeout=FLAGS.timeout_secs):
        # Every kept checkpoint newer than the last evaluated, oldest first: the iterator yields only the
        # newest, and several may have appeared during one evaluation.
        pending = sorted((checkpoint_step(p), p) for p in kept_checkpoints(model_dir))
        for step, path in pending:
            if step <= last_step:
                continue
            if evaluator is None:
                evaluator = Evaluator(strategy, model_dir, path)
                is_chief, worker = evaluator.trainer.is_chief, evaluator.trainer.worker_index
                writer = summaries.Summaries(model_dir, enabled=is_chief)
                if FLAGS.best_metric:  # in model_dir/best(_<eval_name>): predict, export, evaluate find the flags
                    best = checkpoints.BestCheckpoint(
                        tf.train.Checkpoint(model=evaluator.trainer.model), model_dir, FLAGS.best_metric,
                        FLAGS.best_metric_mode, is_chief=is_chief, worker_index=worker, folder=best_folder())
            try:
                step, metrics = evaluator.evaluate(path)
            except tf.errors.NotFoundError as error:  # removed by the trainer's max_to_keep meanwhile
                print(f"warning: {path} was deleted before it could be evaluated ({str(error).splitlines()[0][:200]}); "
                      "keep more with launch.train --max_to_keep", flush=True)
                continue
            last_step = step
            writer.scalars(FLAGS.eval_name, step, metrics)
            if best is not None and best.update(step, metrics):
                print(f"best {FLAGS.best_metric} so far: {best.best_value:.4f} at step {step}", flush=True)
            if evaluator.trainer.is_chief:
                files.write_json(results_path, dict(metrics, step=step, checkpoint=path, split=evaluator.split))
            final = final_step(model_dir)
            if final is not None and step >= final:
                print(f"evaluated the final checkpoint (step {step}); done", flush=True)
                writer.close()
                return
    if writer is not None:
        writer.close()
    print(f"no new checkpoint in {model_dir} for {FLAGS.timeout_secs:g} s; done", flush=True)


def main(argv):
    del argv
    if not re.fullmatch(r"[\w.-]+", FLAGS.eval_name) or FLAGS.eval_name == "train":
        raise ValueError(f"--eval_name={FLAGS.eval_name!r}: expected a folder name other than train (letters, "
                         "digits, _ . -), e.g. eval_test")
    strategy = _make_strategy()
    if FLAGS.mode == "eval":
        evaluate_once(strategy)
    else:
        evaluate_continuously(strategy)


if __name__ == "__main__":
    errors.run(main)
