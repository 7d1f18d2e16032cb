"""Averages the weights of several fine-tuned runs of one model into one model (a uniform "model soup").

  for seed in 0 1 2; do
    python -m launch.train --flagfile=configs/sst2_full_epoch.flags --seed=$seed --model_dir=runs/sst2_s$seed
  done
  python -m launch.soup --model_dirs=runs/sst2_s0,runs/sst2_s1,runs/sst2_s2 --output_dir=runs/sst2_soup

Runs fine-tuned from the same pretrained encoder with different seeds land in one basin, so the mean of
their weights is a model that is usually better than each of them, at the inference cost of one
(Wortsman et al., 2022, "Model soups"). The runs must share the task and model flags (launch.train saved
them in each model_dir); their latest checkpoints are averaged. The output_dir holds a checkpoint and the
flags in launch.train's layout, so launch.predict and launch.export take it like any model_dir; the soup
is evaluated on the task's evaluation split and its metrics printed and written to eval_results.json.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

from launch import common_flags, config_flags, errors  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("model_dirs", None, "launch.train model_dirs of the runs to average (two or more).")
flags.DEFINE_string("output_dir", None, "Where the averaged model's checkpoint, flags and metrics go.")
common_flags.define_data()
# From the configs' fields (launch/config_flags.py); the soup is evaluated in bigger batches than a training run.
config_flags.define(["eval_batch_size", "precision"], defaults={"eval_batch_size": 128})
flags.mark_flags_as_required(["model_dirs", "output_dir"])


def shared_model_flags(model_dirs: list[str]) -> dict:
    """The task and model flags all runs were trained with; a clear error naming the run that differs."""
    from tasks import registry  # noqa: PLC0415
    saved = {}
    for model_dir in model_dirs:
        values = registry.load_model_flags(model_dir)
        if not values:
            raise ValueError(f"{model_dir}: no {registry.MODEL_FLAGS_FILE} (not a launch.train model_dir?)")
        saved[model_dir] = values
    first_dir, first = next(iter(saved.items()))
    for model_dir, values in saved.items():
        differing = sorted(k for k in set(first) | set(values) if first.get(k) != values.get(k))
        if differing:
            shown = ", ".join(f"{k}: {first.get(k)!r} vs {values.get(k)!r}" for k in differing)
            raise ValueError(f"{model_dir} was trained with other model flags than {first_dir} ({shown}); "
                             "only runs of the same model can be averaged")
    return first


def average_checkpoints(model, model_dirs: list[str], expected: str) -> list[str]:
    """Loads each run's latest `model` weights (architecture-checked) and sets `model` to their mean."""
    import numpy as np  # noqa: PLC0415
    from engine import checkpoints  # noqa: PLC0415
    total, paths = None, []
    for model_dir in model_dirs:
        paths.append(checkpoints.restore_model(model, checkpoints.resolve_checkpoint(model_dir), expected=expected))
        weights = [np.asarray(w, np.float64) for w in model.get_weights()]
        total = weights if total is None else [t + w for t, w in zip(total, weights)]
    model.set_weights([t / len(model_dirs) for t in total])
    return paths


def main(argv):
    del argv
    import tensorflow as tf  # noqa: PLC0415
    from engine.config import RuntimeConfig, TrainerConfig  # noqa: PLC0415
    from engine.trainer import Trainer  # noqa: PLC0415
    from tasks import registry  # noqa: PLC0415

    if len(FLAGS.model_dirs) < 2:
        raise app.UsageError("--model_dirs: give two or more runs to average")
    values = shared_model_flags(FLAGS.model_dirs)
    task_name = values["task"]
    task_values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    task, eval_split = registry.build_task(
        task_name, dict(task_values, data_dir=FLAGS.data_dir, eval_data=FLAGS.eval_data))
    trainer = Trainer(task, TrainerConfig(model_dir=FLAGS.output_dir, train_steps=1, eval_split=eval_split,
                                          eval_batch_size=FLAGS.eval_batch_size),
                      runtime=config_flags.build(RuntimeConfig, FLAGS))
    shown = " ".join(f"--{k}={','.join(v) if isinstance(v, list) else v}"
                     for k, v in sorted(values.items()) if k != "task")
    paths = average_checkpoints(trainer.model, FLAGS.model_dirs, expected=f"--task={task_name} {shown}")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=trainer.model), FLAGS.output_dir, max_to_keep=1)
    saved = manager.save(checkpoint_number=0)
    registry.save_model_flags(FLAGS.output_dir, task_name, values)
    print(f"soup of {len(paths)} runs ({', '.join(paths)}) -> {saved}", flush=True)
    metrics = trainer.evaluate()
    with open(os.path.join(FLAGS.output_dir, "eval_results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(metrics, soup_of=paths), f, indent=1)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
    print(f"final {eval_split} metrics: {summary}", flush=True)


if __name__ == "__main__":
    errors.run(main)  # input, flag and checkpoint errors: one line, no traceback
