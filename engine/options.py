"""Options declared once: a config dataclass field that carries its help text and its launch flag.

    learning_rate: float = option(5e-5, "Peak learning rate.")
    encoder: str = option("minilm", "Pretrained encoder ...", flag="init_encoder", model=True)

launch/config_flags.py defines the absl flags of every launch program from these fields (name, type, default,
choices, help) and builds the configs back from the parsed values, so train, evaluate, predict and export
cannot drift apart. Light on purpose (no TensorFlow): `--help` reads it before anything heavy loads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

# `launch_default` left out: the flag's default is the field's default.
SAME = object()


def option(default: Any = dataclasses.MISSING, text: str = "", *, flag: Any = True, launch_default: Any = SAME,
           choices: tuple = (), item: Optional[type] = None, kind: Optional[str] = None, model: bool = False,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help `text` and how it appears on the command line.

    flag: True (flag named as the field), another flag name, or False (not a flag: set by code only).
    launch_default: the flag's default when it differs from the field's; None typically means "unset: the
      field default of the Task at hand, or a value the program computes" (say which in `text`).
    choices: the allowed values (an enum flag). item: the element type of a tuple field (a list flag).
    kind: the flag type when the annotation does not tell it ("bool_or_auto").
    model: the option shapes the model or its inputs, so launch.train saves it with the run
      (model_flags.json) and predict, export and evaluate must use the same value.
    """
    metadata = {"help": text, "flag": flag, "choices": tuple(choices), "item": item, "kind": kind, "model": model}
    if launch_default is not SAME:
        metadata["launch_default"] = launch_default
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_name(field: dataclasses.Field) -> Optional[str]:
    """The launch flag a field is set from, or None if it has none."""
    flag = field.metadata.get("flag")
    if not flag:
        return None
    return field.name if flag is True else flag


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def launch_default(field: dataclasses.Field) -> Any:
    """The flag's default: `launch_default` if declared, else the field's default (None for a required field)."""
    if "launch_default" in field.metadata:
        return field.metadata["launch_default"]
    return field_default(field)


def flag_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields of `config_cls` that are launch flags, in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if flag_name(f)]
