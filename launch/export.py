"""Exports SavedModels: a BERT encoder + preprocessor for TF Hub, or a fine-tuned Task for serving.

  python -m launch.export --encoder=minilm --export_dir=exports/minilm
  python -m launch.export --encoder=encoders/bert_base --export_dir=exports/bert_base --seq_length=256
  python -m launch.export --task=sst2 --checkpoint=runs/sst2 --export_dir=exports/sst2_serving
  python -m launch.export --task=squad --checkpoint=runs/squad --init_encoder=exports/minilm/encoder \\
      --max_seq_length=384 --export_dir=exports/squad_serving
  python -m launch.export --checkpoint=runs/sst2 --serving_precision=bfloat16 --export_dir=exports/sst2_bf16

--encoder writes EXPORT_DIR/encoder (use with hub.KerasLayer(..., trainable=True)) and EXPORT_DIR/preprocessor
(raw strings in; `tokenize` and `bert_pack_inputs` as TF Hub's bert_en_uncased_preprocess).

--task writes one SavedModel whose `serving_default` signature takes raw strings (see tasks/*/serving.py):
the weights of --checkpoint (a launch.train --model_dir or a checkpoint prefix) in the model that the
task flags describe. --task and the task flags (--init_encoder, --max_seq_length, --label_names, --head, ...)
default to those launch.train saved in the model_dir; flags given here win. Loading it needs
`import tensorflow_text`. Where this CPU's TensorFlow runs Eigen's kernels (no AVX-512 VNNI or AMX) it also
prints a `serving host:` line: the intra-op thread count to serve it with (serving_advice).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags, logging  # noqa: E402

from launch import common_flags, config_flags, errors  # noqa: E402
from tasks import registry  # noqa: E402  (light: TensorFlow loads when a Task is built)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defined on demand, not at import, so tests can import several launchers (their names overlap)."""
    flags.DEFINE_string("encoder", None, "Encoder to export: 'minilm', a HF folder, a converted/TF1 checkpoint "
                        "folder, or a TF Hub handle/SavedModel (any --init_encoder value).", flag_values=flag_values)
    flags.DEFINE_string("export_dir", None, "Output folder; gets encoder/ and preprocessor/ SavedModels.",
                        flag_values=flag_values)
    flags.DEFINE_integer("seq_length", 128, "The preprocessor's default sequence length (callers may override).",
                         flag_values=flag_values)
    flags.mark_flag_as_required("export_dir", flag_values=flag_values)

    # --- a fine-tuned Task for serving
    common_flags.define_task(flag_values)
    flags.DEFINE_string("checkpoint", None, "--task: a launch.train --model_dir (latest checkpoint) or a checkpoint "
                        "prefix such as runs/sst2/ckpt-600.", flag_values=flag_values)
    flags.DEFINE_enum("serving_precision", "float32", ["float32", "bfloat16"],
                      "--task: bfloat16 holds the encoder's dense kernels (Q/K/V, attention output, FFN) in bfloat16 "
                      "and multiplies in bfloat16: half the bytes per call, faster on CPUs with bf16 instructions, "
                      "answers within bf16 rounding of the float32 export (check your dev metric). LayerNorm, "
                      "softmax and the head stay float32.", flag_values=flag_values)
    # The flags that shape the model, from the Task configs (default: as launch.train saved them with the run);
    # --vocab_file and --lower_case also go with --encoder.
    config_flags.define(registry.MODEL_FLAGS, flag_values)


def export_encoder(*, init, export_dir: str, vocab_file: str | None = None, lower_case: bool | None = True,
                   seq_length: int = 128) -> dict[str, str]:
    """Exports `make_encoder(init)` and its preprocessor under `export_dir`; returns their paths."""
    from tasks.encoders import loading  # noqa: PLC0415 - TensorFlow loads after flag parsing
    from tasks.encoders import hub

    lower_case = True if lower_case is None else lower_case  # --lower_case unset: uncased, as MiniLM
    encoder, own_vocab = loading.make_encoder(init)
    vocab_file = vocab_file or own_vocab
    if vocab_file is None:
        raise ValueError(f"encoder {init!r} has no vocab of its own (random init?); pass --vocab_file")
    paths = {"encoder": os.path.join(export_dir, "encoder"), "preprocessor": os.path.join(export_dir, "preprocessor")}
    hub.save_encoder(encoder, paths["encoder"], vocab_file=vocab_file, lower_case=lower_case)
    hub.save_preprocessor(paths["preprocessor"], vocab_file=vocab_file, lower_case=lower_case,
                          seq_length=seq_length)
    return paths


def _task_values(flag_values: flags.FlagValues) -> dict:
    """The task flags as tasks.registry values (tuples for lists); unset flags keep the Task defaults."""
    return {name: config_flags.value(name, flag_values[name].value) for name in registry.MODEL_FLAGS}


def export_task(*, task: str, values: dict, checkpoint: str, export_dir: str,
                precision: str = "float32") -> str:
    """Builds Task `task` from launch `values`, loads `checkpoint` into its model, writes the serving SavedModel,
    the encoder's dense kernels held as constants in `precision` (float32, or bfloat16: --serving_precision)."""
    from engine import checkpoints  # noqa: PLC0415 - TensorFlow loads after flag parsing

    checkpoints.resolve_checkpoint(checkpoint)  # a missing checkpoint fails before any model is built
    built, _ = registry.build_task(task, values)
    model = built.build_model()
    shown = [f"--{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in sorted(values.items()) if v is not None]
    path = checkpoints.restore_model(model, checkpoint, expected=f"--task={task} ({' '.join(shown)})")
    logging.info("export | task: %s | weights: %s", task, path)
    return save_serving_model(built, model, export_dir, precision)


def save_serving_model(task, model, export_dir: str, precision: str = "float32") -> str:
    """Writes `task`'s serving SavedModel of `model` (restored, not yet rewritten) as --task exports it: the
    export-safe rewrites, the encoder's dense kernels held as constants in `precision`. bench/vs_pytorch.py times
    what this writes."""
    from engine import dense, fusion  # noqa: PLC0415 - TensorFlow loads after flag parsing
    from tasks import serving  # noqa: PLC0415

    fusion.for_inference(model, export_safe=True)  # fused MatMuls and attention, standard TensorFlow ops only
    held = dense.hold_kernels_in(model, precision)  # graph constants, which oneDNN keeps in its own layout
    norms = fusion.hold_layer_norm_parameters(model)  # graph constants: fewer nodes per call
    logging.info("export | %d dense kernels held as %s constants, %d LayerNorms' gamma and beta as constants",
                 held, precision, norms)
    return serving.save(task.serving_module(model), export_dir)


def serving_advice() -> str | None:
    """How to set up the host that serves this process's --task exports, where TensorFlow's default is not the
    best: each product of the export runs as two halves side by side, which TensorFlow's default intra-op pool
    oversubscribes on hosts that run Eigen's kernels (engine/host.serving_intra_op_threads)."""
    from engine import host  # noqa: PLC0415

    threads = host.serving_intra_op_threads()
    if threads is None:
        return None
    return (f"serve it with TF_NUM_INTRAOP_THREADS={threads} in the server's environment (TensorFlow Serving: "
            f"--tensorflow_intra_op_parallelism={threads}; Python: "
            f"tf.config.threading.set_intra_op_parallelism_threads({threads})): its products run as halves side "
            f"by side, which TensorFlow's default intra-op pool oversubscribes on this kind of CPU")


def run(flag_values: flags.FlagValues) -> dict[str, str]:
    """Dispatches on the parsed flags: --encoder (TF Hub encoder + preprocessor) or --task (serving model)."""
    if flag_values.checkpoint and flag_values.encoder is None:
        registry.fill_unset_flags(flag_values, flag_values.checkpoint)  # --task and task flags saved by launch.train
    if flag_values.task is not None:
        if flag_values.encoder is not None:
            raise app.UsageError("--encoder exports an encoder for TF Hub, --task a fine-tuned model: pass one")
        if not flag_values.checkpoint:
            raise app.UsageError(f"--task={flag_values.task} needs --checkpoint (the launch.train --model_dir)")
        path = export_task(task=flag_values.task, values=_task_values(flag_values), checkpoint=flag_values.checkpoint,
                           export_dir=flag_values.export_dir, precision=flag_values.serving_precision)
        logging.info("export | serving model: %s", path)
        return {"serving": path}
    if flag_values.encoder is None:
        raise app.UsageError("nothing to export: pass --encoder, or --task with --checkpoint")
    if flag_values.serving_precision != "float32":
        raise app.UsageError("--serving_precision is for --task exports; an --encoder export is for fine-tuning "
                             "and keeps float32 weights")
    paths = export_encoder(init=flag_values.encoder, export_dir=flag_values.export_dir,
                           vocab_file=flag_values.vocab_file, lower_case=flag_values.lower_case,
                           seq_length=flag_values.seq_length)
    logging.info("export | encoder: %s | preprocessor: %s", paths["encoder"], paths["preprocessor"])
    return paths


def main(argv: list[str]) -> None:
    del argv
    paths = run(flags.FLAGS)
    for name, path in paths.items():
        print(f"{name}: {path}", flush=True)
    advice = serving_advice() if "serving" in paths else None
    if advice:
        print(f"serving host: {advice}", flush=True)


if __name__ == "__main__":
    define_flags()
    errors.run(main)  # input, flag and checkpoint errors: one line, no traceback
