"""Fine-tunes a BERT encoder on a Task with the engine's Trainer.

  python -m launch.train --task=sst2 --model_dir=runs/sst2 --train_steps=600
  python -m launch.train --flagfile=configs/sst2.flags

Flags live here and nowhere else; they become frozen configs (field name = flag name).
"""
from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags, logging  # noqa: E402

from launch import common_flags, errors  # noqa: E402

FLAGS = flags.FLAGS

# --- what to train
flags.DEFINE_string("task", "sst2", "Task: sst2 | classification | squad | conll_ner.")
flags.DEFINE_string("data_dir", None, "Folder with sst2/, squad/, conll2003/ (default $DATA_DIR or ../shared/data).")
flags.DEFINE_string("train_data", None, "Training file (overrides the task's default under --data_dir).")
flags.DEFINE_string("eval_data", None, "Evaluation file (overrides the task's default under --data_dir).")
flags.DEFINE_string("init_encoder", "minilm",
                    "Pretrained encoder: 'minilm' (bundled all-MiniLM-L6-v2), a Hugging Face folder, "
                    "a converted TF2 checkpoint folder, or a TF Hub handle/SavedModel path.")
flags.DEFINE_string("vocab_file", None, "WordPiece vocab (default: the encoder's own).")
common_flags.define_lower_case()
flags.DEFINE_integer("max_seq_length", None, "Tokens per sequence (task default if unset).")
flags.DEFINE_string("model_dir", None, "Checkpoints and TensorBoard logs; an existing run resumes.")
flags.mark_flag_as_required("model_dir")

# --- where and how
flags.DEFINE_enum("strategy", "default", ["default", "one_device", "mirrored", "multi_worker_mirrored", "tpu"],
                  "tf.distribute strategy.")
flags.DEFINE_string("tpu", "", "TPU name or address for --strategy=tpu.")
flags.DEFINE_integer("num_gpus", 0, "GPUs for --strategy=mirrored (0: all).")
flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into this many logical devices (e.g. 2 with "
                     "--strategy=mirrored tries data parallelism on a laptop; 0: one device).")
flags.DEFINE_float("collective_timeout_secs", 0, "--strategy=multi_worker_mirrored: fail a collective that a "
                   "worker never joins after this long (a crashed worker is detected within seconds anyway; 0: no "
                   "limit).")
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
                  "auto: mixed_bfloat16 on TPU and on Ampere+ GPUs, mixed_float16 on older GPUs, on the CPU bf16 only "
                  "where it is native (else float32).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the forward/backward step (measure: helps on some CPUs).")


flags.DEFINE_flag(flags.Flag(
    common_flags.BoolOrAutoParser(), flags.ArgumentSerializer(), "fuse_elementwise", "auto",
    "Run the model's Dropout and Activation layers as small XLA kernels (engine/fusion.py). auto: on for the CPU, "
    "where it is measured faster; off on GPU/TPU, where XLA and cuDNN fuse anyway.", boolean=True))
flags.DEFINE_float("peak_tflops", 0, "MFU: peak dense TFLOP/s of one GPU or TPU device (or of one host's CPU) for the "
                   "run's precision (0: a built-in table of A100/H100/V100/T4 and TPU v2-v6e, or the CPU's measured "
                   "matmul peak; unknown devices report no MFU).")
flags.DEFINE_integer("seed", 0, "Initialisation and shuffling seed.")

# --- loop
flags.DEFINE_integer("global_batch_size", 32, "Examples per optimizer update over replicas and micro-batches.")
flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches accumulated per update.")
flags.DEFINE_integer("train_steps", None, "Optimizer updates (or use --train_epochs).")
flags.DEFINE_float("train_epochs", None, "Epochs over the training set; sets --train_steps.")
flags.DEFINE_integer("steps_per_loop", 50, "Updates per compiled loop call (one log line each).")
flags.DEFINE_integer("eval_every_steps", 0, "0: evaluate at the end only.")
flags.DEFINE_integer("eval_batch_size", 64, "Evaluation batch (padded, exact).")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Also save every this many steps (0: at every evaluation, the end, "
                     "and by --checkpoint_every_secs).")
flags.DEFINE_float("checkpoint_every_secs", 600, "Also save when this long has passed since the last save, so a "
                   "hard kill loses at most that much (0: off).")
flags.DEFINE_integer("max_to_keep", 3, "Latest checkpoints kept.")
flags.DEFINE_string("best_metric", "", "Keep the best checkpoint by this eval metric (e.g. accuracy).")
flags.DEFINE_enum("best_metric_mode", "max", ["max", "min"], "Whether larger best_metric is better.")
flags.DEFINE_integer("early_stopping_patience", 0, "Stop after this many evaluations without improvement.")
flags.DEFINE_enum("nonfinite_policy", "skip", ["skip", "raise"], "Non-finite loss/gradients: skip or stop.")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train"],
                  "train_and_eval: evaluate at --eval_every_steps and the end. train: no evaluation here (checkpoints "
                  "are still saved at those steps), for an evaluation sidecar: launch.evaluate --mode=continuous_eval "
                  "(e.g. on a TPU VM, whose devices should only train).")
flags.DEFINE_list("profile_steps", None, "START,END: a profiler trace of steps START to END (from 1) into "
                  "model_dir/train/plugins/profile, for TensorBoard's Profile tab (tensorboard-plugin-profile).")

# --- optimizer
flags.DEFINE_enum("optimizer", "adamw", ["adamw", "lamb"], "adamw, or lamb for large global batches (a per-layer "
                  "trust ratio ||w|| / ||update||; same weight-decay exclusions).")
flags.DEFINE_float("learning_rate", 5e-5, "Peak learning rate.")
flags.DEFINE_float("layer_decay", None, "Layer-wise learning-rate decay, e.g. 0.9: encoder layer l of L learns at "
                   "decay^(L - l) times --learning_rate, the embeddings at decay^(L + 1), the head at 1 (default off).")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup updates (default 10% of train_steps).")
flags.DEFINE_float("weight_decay", 0.01, "AdamW/LAMB decoupled weight decay (not on LayerNorm and biases).")
flags.DEFINE_float("clip_norm", 1.0, "Clip the global gradient norm (0: off).")
flags.DEFINE_float("ema_decay", None, "Keep an exponential moving average of the weights with this decay (e.g. "
                   "0.999) and evaluate, checkpoint and export it instead of the last weights.")

# --- classification (field names of tasks.classification.task.ClassificationConfig)
flags.DEFINE_list("text_columns", None, "TSV column(s) with the text: one, or two for sentence pairs.")
flags.DEFINE_string("label_column", None, "TSV column with the label.")
flags.DEFINE_list("label_names", None, "String labels in class-id order (default: integer labels).")
flags.DEFINE_integer("num_classes", None, "Classes, for integer labels.")
flags.DEFINE_enum("head", None, ["softmax", "sigmoid", "crf"],
                  "Classifier head; sigmoid is binary only; crf (default) or softmax for conll_ner.")
flags.DEFINE_enum("pooling", None, ["cls", "mean"], "classification: pooled [CLS] output (default) or the masked "
                  "mean of the token vectors (how sentence-transformers encoders such as all-MiniLM were trained).")
flags.DEFINE_list("class_weights", None, "Loss weight per class, for imbalanced data.")
flags.DEFINE_integer("group_by_length", None, "classification, conll_ner: sort training examples by length within "
                     "windows of this many batches and cut each batch to its longest sequence (default 16 for "
                     "classification, 0 for conll_ner; 0: pad every batch to --max_seq_length).")

# --- task-specific flags of other tasks go below this line (field names of their config dataclasses)

# --- conll_ner (field names of tasks.ner.task.TaggingConfig; also uses --head, --predictions_dir)
flags.DEFINE_bool("iob2_constraints", None, "conll_ner CRF: forbid I-X after anything but B-X/I-X (default on).")
flags.DEFINE_integer("max_words", None, "conll_ner: words per window (default max_seq_length - 2).")
flags.DEFINE_bool("casing_features", None, "conll_ner: add a word-shape embedding (capitalisation) to the word-piece "
                  "embeddings (default: on for an uncased Model Garden encoder, off for a Hub one).")
flags.DEFINE_integer("max_train_sentences", None, "conll_ner: first N training sentences (smoke runs).")
flags.DEFINE_integer("max_eval_sentences", None, "conll_ner: first N evaluation sentences (smoke runs).")

# --- squad (field names of tasks.squad.task.SquadConfig)
flags.DEFINE_string("squad_file", None, "SQuAD v1.1 JSON (default <data_dir>/squad/dev-v1.1.json, split by article).")
flags.DEFINE_integer("doc_stride", None, "SQuAD: tokens between the starts of overlapping context windows.")
flags.DEFINE_integer("max_query_length", None, "SQuAD: question tokens kept.")
flags.DEFINE_integer("n_best_size", None, "SQuAD: start and end candidates per window when decoding.")
flags.DEFINE_integer("max_answer_length", None, "SQuAD: longest answer in tokens.")
flags.DEFINE_integer("max_examples", None, "SQuAD: first N questions of each split (smoke runs).")
flags.DEFINE_string("cache_dir", None, "SQuAD feature cache (default ~/.cache/bert_engine/squad).")
flags.DEFINE_string("predictions_dir", None, "SQuAD: where predictions_<split>.json go (default --model_dir).")


def task_values() -> dict:
    """Flag values as plain Python values for tasks.registry (tuples for lists, floats parsed)."""
    values = {}
    for name, value in FLAGS.flag_values_dict().items():
        if isinstance(value, list):
            value = tuple(float(v) for v in value) if name == "class_weights" else tuple(value)
        values[name] = value
    return values


def main(argv):
    del argv
    from engine import files, strategy as strategy_lib  # noqa: PLC0415
    from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig  # noqa: PLC0415
    from engine.trainer import Trainer  # noqa: PLC0415
    from tasks import registry  # noqa: PLC0415

    runtime = RuntimeConfig(strategy=FLAGS.strategy, tpu=FLAGS.tpu, num_gpus=FLAGS.num_gpus,
                            precision=FLAGS.precision, jit_compile=FLAGS.jit_compile,
                            fuse_elementwise=FLAGS.fuse_elementwise, peak_tflops=FLAGS.peak_tflops, seed=FLAGS.seed,
                            collective_timeout_secs=FLAGS.collective_timeout_secs)
    if FLAGS.cpu_devices:
        strategy_lib.split_cpu(FLAGS.cpu_devices)
    # First TF work of the program: MultiWorkerMirroredStrategy configures the collectives at startup and
    # refuses once any other op (tokenizing for --train_epochs, say) has run.
    strategy = strategy_lib.make_strategy(runtime)
    strategy_built = time.monotonic()  # start-up ends here; preparing the Task's input is data (the `time |` line)
    task, eval_split = registry.build_task(FLAGS.task, task_values())
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
    trainer_config = TrainerConfig(
        model_dir=FLAGS.model_dir, train_steps=train_steps, global_batch_size=FLAGS.global_batch_size,
        grad_accum_steps=FLAGS.grad_accum_steps, steps_per_loop=FLAGS.steps_per_loop,
        eval_every_steps=FLAGS.eval_every_steps, eval_batch_size=FLAGS.eval_batch_size,
        eval_split="" if train_only else eval_split,
        checkpoint_every_steps=FLAGS.checkpoint_every_steps, checkpoint_every_secs=FLAGS.checkpoint_every_secs,
        max_to_keep=FLAGS.max_to_keep, best_metric="" if train_only else FLAGS.best_metric,
        best_metric_mode=FLAGS.best_metric_mode,
        early_stopping_patience=0 if train_only else FLAGS.early_stopping_patience,
        nonfinite_policy=FLAGS.nonfinite_policy, profile_steps=profile_steps)
    optimizer_config = OptimizerConfig(optimizer=FLAGS.optimizer, layer_decay=FLAGS.layer_decay,
                                       learning_rate=FLAGS.learning_rate, warmup_steps=warmup,
                                       weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm or None,
                                       ema_decay=FLAGS.ema_decay)
    # This program's flags that have a value (not absl's or TensorFlow's own) as TensorBoard hparams, beside the
    # configs they became. absl files the flags of `python -m launch.train` under the script's path.
    own_flags = {f.name for module, defined in FLAGS.flags_by_module_dict().items()
                 if module == sys.argv[0] or module.startswith("launch.") for f in defined}
    hparams = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v  # lists as the command line takes them
               for k, v in task_values().items() if k in own_flags and v is not None}
    trainer = Trainer(task, trainer_config, optimizer_config, runtime, strategy=strategy, hparams=hparams)
    # The task and model flags go with the checkpoints, so launch.predict/export need only --model_dir: at once
    # for a new run (usable while it trains), and for a resumed one after training (a resume that fails leaves
    # model_dir untouched). Files other than checkpoints are the chief's alone.
    flags_path = os.path.join(FLAGS.model_dir, registry.MODEL_FLAGS_FILE)
    if trainer.is_chief and files.read_json(flags_path) is None:
        registry.save_model_flags(FLAGS.model_dir, FLAGS.task, task_values())
    metrics = trainer.train()
    if trainer.is_chief:
        registry.save_model_flags(FLAGS.model_dir, FLAGS.task, task_values())
    if metrics:
        if trainer.is_chief:
            files.write_json(os.path.join(FLAGS.model_dir, "eval_results.json"), metrics)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        print(f"final {eval_split} metrics: {summary}", flush=True)
    trainer.print_time_split(strategy_built=strategy_built)  # time | total | start-up | data | compile | train | eval
    logging.info("done")


if __name__ == "__main__":
    errors.run(main)
