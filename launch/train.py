"""Fine-tunes a BERT encoder on a Task with the engine's Trainer.

  python -m launch.train --task=sst2 --model_dir=runs/sst2 --train_steps=600
  python -m launch.train --flagfile=configs/sst2_demo.flags --model_dir=runs/sst2_demo

Every option is a field of a config (engine/config.py: RuntimeConfig, TrainerConfig, OptimizerConfig; each
Task's config.py), declared there once with its help; launch/config_flags.py makes them this program's flags
and builds the configs back from the parsed values. Only what no config holds (--task, the data files,
--model_dir, --train_epochs, --mode, --cpu_devices) is defined here or in launch/common_flags.py.
"""
from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags, logging  # noqa: E402

from launch import common_flags, config_flags, errors  # noqa: E402

FLAGS = flags.FLAGS

# Launch-only flags; every option of the configs (engine/config.py, each Task's config.py) is a flag too,
# defined from its field by launch/config_flags.py with the field's help and default.
common_flags.define_task(default="sst2")
common_flags.define_data(train=True)
flags.DEFINE_string("model_dir", None, "Checkpoints and TensorBoard logs; an existing run resumes.")
flags.mark_flag_as_required("model_dir")
common_flags.define_cpu_devices()
flags.DEFINE_float("train_epochs", None, "Epochs over the training set; sets --train_steps.")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train"],
                  "train_and_eval: evaluate at --eval_every_steps and the end. train: no evaluation here (checkpoints "
                  "are still saved at those steps), for an evaluation sidecar: launch.evaluate --mode=continuous_eval "
                  "(e.g. on a TPU VM, whose devices should only train).")
config_flags.define(config_flags.specs())


def main(argv):
    del argv
    from engine import files, strategy as strategy_lib  # noqa: PLC0415
    from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig  # noqa: PLC0415
    from engine.trainer import Trainer  # noqa: PLC0415
    from tasks import registry  # noqa: PLC0415

    runtime = config_flags.build(RuntimeConfig, FLAGS)
    if FLAGS.cpu_devices:
        strategy_lib.split_cpu(FLAGS.cpu_devices)
    # First TF work of the program: MultiWorkerMirroredStrategy configures the collectives at startup and
    # refuses once any other op (tokenizing for --train_epochs, say) has run.
    strategy = strategy_lib.make_strategy(runtime)
    strategy_built = time.monotonic()  # start-up ends here; preparing the Task's input is data (the `time |` line)
    values = config_flags.launch_values(FLAGS)  # flag name -> value, lists as tuples
    task, eval_split = registry.build_task(FLAGS.task, values)
    train_steps = FLAGS.train_steps
    if FLAGS.train_epochs:
        num_examples = task.num_examples("train")
        train_steps = math.ceil(FLAGS.train_epochs * num_examples / FLAGS.global_batch_size)
        print(f"{FLAGS.train_epochs} epochs of {num_examples} examples = {train_steps} updates", flush=True)
    if not train_steps:
        raise app.UsageError("set --train_steps or --train_epochs")
    train_only = FLAGS.mode == "train"
    if train_only and (FLAGS.best_metric or FLAGS.early_stopping_patience):
        print("--mode=train does not evaluate: --best_metric and --early_stopping_patience are left to the "
              "evaluation sidecar (launch.evaluate --mode=continuous_eval --best_metric=...)", flush=True)
    try:
        profile_steps = tuple(int(s) for s in FLAGS.profile_steps or ())
    except ValueError:
        raise ValueError(f"--profile_steps={','.join(FLAGS.profile_steps)}: expected two step numbers, "
                         "START,END") from None
    warmup = FLAGS.warmup_steps if FLAGS.warmup_steps is not None else int(0.1 * train_steps)
    trainer_config = config_flags.build(
        TrainerConfig, FLAGS, model_dir=FLAGS.model_dir, train_steps=train_steps, profile_steps=profile_steps,
        eval_split="" if train_only else eval_split, best_metric="" if train_only else FLAGS.best_metric,
        early_stopping_patience=0 if train_only else FLAGS.early_stopping_patience)
    optimizer_config = config_flags.build(OptimizerConfig, FLAGS, warmup_steps=warmup,
                                          clip_norm=FLAGS.clip_norm or None)
    # This program's flags that have a value (not absl's or TensorFlow's own) as TensorBoard hparams, beside the
    # configs they became. absl files the flags of `python -m launch.train` under the script's path.
    own_flags = {f.name for module, defined in FLAGS.flags_by_module_dict().items()
                 if module == sys.argv[0] or module.startswith("launch.") for f in defined}
    hparams = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v  # lists as the command line takes them
               for k, v in values.items() if k in own_flags and v is not None}
    trainer = Trainer(task, trainer_config, optimizer_config, runtime, strategy=strategy, hparams=hparams)
    # The task and model flags go with the checkpoints, so launch.predict/export need only --model_dir: at once
    # for a new run (usable while it trains), and for a resumed one after training (a resume that fails leaves
    # model_dir untouched). Files other than checkpoints are the chief's alone.
    flags_path = os.path.join(FLAGS.model_dir, registry.MODEL_FLAGS_FILE)
    if trainer.is_chief and files.read_json(flags_path) is None:
        registry.save_model_flags(FLAGS.model_dir, FLAGS.task, values)
    metrics = trainer.train()
    if trainer.is_chief:
        registry.save_model_flags(FLAGS.model_dir, FLAGS.task, values)
    if metrics:
        if trainer.is_chief:
            files.write_json(os.path.join(FLAGS.model_dir, "eval_results.json"), metrics)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        print(f"final {eval_split} metrics: {summary}", flush=True)
    trainer.print_time_split(strategy_built=strategy_built)  # time | total | start-up | data | compile | train | eval
    logging.info("done")


if __name__ == "__main__":
    errors.run(main)
