"""Flags that several launch programs share, defined once here so their names, defaults and help agree.

Each program calls the `define_*` functions it needs (at import, or on demand for a given FlagValues as
launch/export.py does, so tests can define them into a fresh FlagValues).
"""
from __future__ import annotations

from absl import flags


def define_lower_case(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """--lower_case: how the tokenizer normalises text; it must match the encoder's vocab."""
    flags.DEFINE_bool(
        "lower_case", None, "Whether the tokenizer lower-cases and strips accents before WordPiece: true for "
        "uncased encoders (MiniLM, bert-base-uncased), false for cased ones (bert-base-cased) (default true). "
        "launch.train saves it with the model; predict and export take it from there.", flag_values=flag_values)


class BoolOrAutoParser(flags.BooleanParser):
    """A boolean flag (--x, --nox, --x=false) that also takes --x=auto (launch.train's --fuse_elementwise).

    Here, not in launch/train.py, so it can be imported without defining that program's flags."""

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip().lower() == "auto":
            return "auto"
        return super().parse(argument)

    def flag_type(self):
        return "bool or auto"
