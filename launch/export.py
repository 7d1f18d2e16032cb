"""Exports SavedModels. Today: a BERT encoder + its raw-text preprocessor in the TF Hub interface.

  python -m launch.export --encoder=minilm --export_dir=exports/minilm
  python -m launch.export --encoder=encoders/bert_base --export_dir=exports/bert_base --seq_length=256

Writes EXPORT_DIR/encoder (use with hub.KerasLayer(..., trainable=True)) and EXPORT_DIR/preprocessor
(raw strings in; `tokenize` and `bert_pack_inputs` as TF Hub's bert_en_uncased_preprocess).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags, logging  # noqa: E402


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defined on demand, not at import, so tests can import several launchers (their names overlap)."""
    flags.DEFINE_string("encoder", None, "Encoder to export: 'minilm', a HF folder, a converted/TF1 checkpoint "
                        "folder, or a TF Hub handle/SavedModel (any --init_encoder value).", flag_values=flag_values)
    flags.DEFINE_string("export_dir", None, "Output folder; gets encoder/ and preprocessor/ SavedModels.",
                        flag_values=flag_values)
    flags.DEFINE_string("vocab_file", None, "WordPiece vocab (default: the encoder's own).", flag_values=flag_values)
    flags.DEFINE_bool("lower_case", True, "Whether the preprocessor lower-cases and strips accents (uncased "
                      "models).", flag_values=flag_values)
    flags.DEFINE_integer("seq_length", 128, "The preprocessor's default sequence length (callers may override).",
                         flag_values=flag_values)
    flags.mark_flag_as_required("export_dir", flag_values=flag_values)


def export_encoder(*, init, export_dir: str, vocab_file: str | None = None, lower_case: bool = True,
                   seq_length: int = 128) -> dict[str, str]:
    """Exports `make_encoder(init)` and its preprocessor under `export_dir`; returns their paths."""
    from tasks import encoders, hub  # noqa: PLC0415 - TensorFlow loads after flag parsing

    encoder, own_vocab = encoders.make_encoder(init)
    vocab_file = vocab_file or own_vocab
    if vocab_file is None:
        raise ValueError(f"encoder {init!r} has no vocab of its own (random init?); pass --vocab_file")
    paths = {"encoder": os.path.join(export_dir, "encoder"), "preprocessor": os.path.join(export_dir, "preprocessor")}
    hub.save_encoder(encoder, paths["encoder"], vocab_file=vocab_file, lower_case=lower_case)
    hub.save_preprocessor(paths["preprocessor"], vocab_file=vocab_file, lower_case=lower_case,
                          seq_length=seq_length)
    return paths


def run(flag_values: flags.FlagValues) -> dict[str, str]:
    """Dispatches on the parsed flags; a Task's serving export (--task) belongs next to the encoder branch."""
    if flag_values.encoder is None:
        raise app.UsageError("nothing to export: pass --encoder")
    paths = export_encoder(init=flag_values.encoder, export_dir=flag_values.export_dir,
                           vocab_file=flag_values.vocab_file, lower_case=flag_values.lower_case,
                           seq_length=flag_values.seq_length)
    logging.info("export | encoder: %s | preprocessor: %s", paths["encoder"], paths["preprocessor"])
    return paths


def main(argv: list[str]) -> None:
    del argv
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
