"""Converts pretrained BERT weights into the TF2 folder `make_encoder` (and --init_encoder) loads.

  python -m launch.convert --from=hf --checkpoint=path/to/hf_bert_folder --output_dir=encoders/minilm
  python -m launch.convert --from=tf1 --checkpoint=uncased_L-12_H-768_A-12/bert_model.ckpt \
      --bert_config=uncased_L-12_H-768_A-12/bert_config.json --output_dir=encoders/bert_base

The output holds bert_config.json, vocab.txt and a `tf.train.Checkpoint(encoder=...)`.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import flags, logging  # noqa: E402

from launch import errors  # noqa: E402


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defined on demand, not at import, so tests can import several launchers (their names overlap)."""
    flags.DEFINE_enum("from", None, ["hf", "tf1"], "Source layout: hf (safetensors BertModel) or tf1 "
                      "(google-research/bert checkpoint).", flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "hf: a folder with model.safetensors or the .safetensors file; "
                        "tf1: the checkpoint prefix (path/bert_model.ckpt).", flag_values=flag_values)
    flags.DEFINE_string("bert_config", None, "config.json (hf) / bert_config.json (tf1); default: next to "
                        "--checkpoint.", flag_values=flag_values)
    flags.DEFINE_string("vocab_file", None, "WordPiece vocab.txt; default: next to --checkpoint.",
                        flag_values=flag_values)
    flags.DEFINE_string("output_dir", None, "Folder to write bert_config.json, vocab.txt and bert_model.ckpt to.",
                        flag_values=flag_values)
    for name in ("from", "checkpoint", "output_dir"):
        flags.mark_flag_as_required(name, flag_values=flag_values)


def run(flag_values: flags.FlagValues) -> str:
    """Converts as the parsed flags say; returns the written checkpoint prefix."""
    from tasks.encoders import convert  # noqa: PLC0415 - after absl parsed the flags, so --help is fast

    converter = {"hf": convert.convert_hf, "tf1": convert.convert_tf1}[flag_values["from"].value]
    prefix = converter(flag_values.checkpoint, flag_values.output_dir, bert_config=flag_values.bert_config,
                       vocab_file=flag_values.vocab_file)
    logging.info("convert | wrote %s (+ bert_config.json, vocab.txt); load it with --init_encoder=%s",
                 prefix, flag_values.output_dir)
    return prefix


def main(argv: list[str]) -> None:
    del argv
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    errors.run(main)  # missing or mismatched files: one line, no traceback
