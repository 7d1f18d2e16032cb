"""The options every Task config shares (encoder, vocab, casing, sequence length, seed), declared once here.

Each is a factory of a dataclass field (engine/options.py): one declaration, one help text, one flag, however
many Task configs hold the field. Light (no TensorFlow), so launch programs read it before parsing flags.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine.config import RuntimeConfig
from engine.options import option


def encoder() -> Any:
    return option("minilm", "Pretrained encoder: 'minilm' (bundled all-MiniLM-L6-v2), a Hugging Face folder, a "
                  "converted TF2 checkpoint folder, or a TF Hub handle/SavedModel path.", flag="init_encoder",
                  launch_default="minilm", model=True)


def vocab_file() -> Any:
    return option(None, "WordPiece vocab (default: the encoder's own).", model=True)


def lower_case() -> Any:
    return option(True, "Whether the tokenizer lower-cases and strips accents before WordPiece: true for uncased "
                  "encoders (MiniLM, bert-base-uncased), false for cased ones (bert-base-cased); it must match the "
                  "vocab. launch.train saves it with the model; predict and export take it from there.", model=True)


def max_seq_length(default: int) -> Any:
    return option(default, "Tokens per sequence, with [CLS] and [SEP].", model=True)


def group_by_length(default: int) -> Any:
    return option(default, "Sort training examples by length within windows of this many batches and cut each "
                  "batch to its longest sequence (engine.inputs.group_by_length; 0: pad every batch to "
                  "--max_seq_length).")


def check_group_by_length(value: int) -> None:
    """The check every Task config with a `group_by_length` field runs in __post_init__."""
    if value < 0:
        raise ValueError(f"group_by_length={value}: expected 0 (off) or batches per window")


def seed() -> Any:
    """The runtime's --seed: one flag seeds initialisation and the Task's shuffling."""
    runtime_seed = {f.name: f for f in dataclasses.fields(RuntimeConfig)}["seed"]
    return option(0, runtime_seed.metadata["help"], launch_default=0)
