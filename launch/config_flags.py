"""Launch flags derived from the config dataclasses, and configs built back from the parsed flags.

An option is declared once, on its config field (engine/options.py: help, flag name, choices, launch default);
every launch program defines the flags it takes from here, so train, evaluate, predict and export agree on each
name, type, default and help text (tests/test_config_flags.py checks they do not drift).

A flag may stand for a field of several configs (--seed: the runtime's and each Task's; --max_seq_length: each
Task's): its help is their distinct texts, and for a Task option left unset (None) each Task keeps its own
default, which the help lists. Nothing here imports TensorFlow, so `--help` stays fast.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from absl import flags

from engine import options
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from launch import common_flags
from tasks import registry

# Configs whose fields are launch flags: (label, class). A Task option's flag defaults to None ("the Task's
# default") unless the field declares a launch_default; an engine option's flag to its field's default.
ENGINE_CONFIGS = (("", RuntimeConfig), ("", TrainerConfig), ("", OptimizerConfig))
TASK_CONFIGS = tuple(registry.CONFIGS.items())


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One launch flag: what absl needs to define it, merged from every config field it sets."""
    name: str
    kind: str            # bool | int | float | str | enum | list | bool_or_auto
    default: Any
    help: str
    choices: tuple = ()
    item: Optional[type] = None   # list flags: the element type of the tuple field
    fields: tuple = ()            # ((config class, field name), ...)


def _kind(field: dataclasses.Field) -> str:
    if field.metadata.get("kind"):
        return field.metadata["kind"]
    if field.metadata.get("choices"):
        return "enum"
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    inner = re.fullmatch(r"Optional\[(.*)\]", annotation)
    annotation = inner.group(1) if inner else annotation
    if annotation in ("bool", "int", "float", "str"):
        return annotation
    if annotation.startswith("tuple"):
        return "list"
    return type(options.field_default(field)).__name__  # e.g. EncoderInit, a str by default


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _unset_note(task_defaults: Sequence[tuple[str, Any]]) -> str:
    """' (unset: 128 for classification, conll_ner; 384 for squad)': each Task's own default of the field."""
    by_value: dict[str, list[str]] = {}
    for label, value in task_defaults:
        if value not in (None, (), ""):
            by_value.setdefault(_shown(value), []).append(label)
    if not by_value:
        return ""
    if len(by_value) == 1 and len(next(iter(by_value.values()))) == len(task_defaults):
        return f" (unset: {next(iter(by_value))})"
    return " (unset: " + "; ".join(f"{value} for {', '.join(labels)}" for value, labels in by_value.items()) + ")"


@functools.lru_cache(maxsize=None)
def specs() -> dict[str, FlagSpec]:
    """Every config-derived flag by name, merged over all configs that have a field for it."""
    grouped: dict[str, list[tuple[str, type, dataclasses.Field]]] = {}
    for label, config_cls in ENGINE_CONFIGS + TASK_CONFIGS:
        for field in options.flag_fields(config_cls):
            grouped.setdefault(options.flag_name(field), []).append((label, config_cls, field))
    merged = {}
    for name, group in grouped.items():
        kinds = {_kind(f) for _, _, f in group}
        defaults = []
        for label, _, field in group:
            declared = "launch_default" in field.metadata
            defaults.append(options.launch_default(field) if declared or not label else None)
        if len(kinds) != 1 or any(d != defaults[0] for d in defaults):
            raise TypeError(f"--{name}: its config fields disagree on the flag's type {sorted(kinds)} or default "
                            f"{defaults}; declare a launch_default or rename one")
        texts = list(dict.fromkeys(f.metadata["help"] for _, _, f in group if f.metadata["help"]))
        text = " ".join(texts)
        if defaults[0] is None:
            text += _unset_note([(label, options.field_default(f)) for label, _, f in group if label])
        choices = tuple(dict.fromkeys(c for _, _, f in group for c in f.metadata["choices"]))
        items = {f.metadata["item"] for _, _, f in group}
        merged[name] = FlagSpec(name, kinds.pop(), defaults[0], text, choices, items.pop() if len(items) == 1 else None,
                                tuple((cls, f.name) for _, cls, f in group))
    return merged


def task_flag_names() -> list[str]:
    """The flags of the Task configs, in declaration order."""
    return [name for name, spec in specs().items() if any(cls in registry.CONFIGS.values() for cls, _ in spec.fields)]


def config_flag_names(config_cls: type) -> list[str]:
    return [options.flag_name(f) for f in options.flag_fields(config_cls)]


def define(names: Iterable[str], flag_values: flags.FlagValues = flags.FLAGS,
           defaults: Optional[Mapping[str, Any]] = None) -> None:
    """Defines the flags `names` (config-derived, see specs()) into `flag_values`; `defaults` overrides a
    program's default (launch.soup evaluates with a larger batch), the rest as the configs declare them."""
    for name in names:
        spec = specs()[name]
        default = (defaults or {}).get(name, spec.default)
        if isinstance(default, tuple):
            default = list(map(str, default))
        kwargs = {"flag_values": flag_values}
        if spec.kind == "bool":
            flags.DEFINE_bool(name, default, spec.help, **kwargs)
        elif spec.kind == "int":
            flags.DEFINE_integer(name, default, spec.help, **kwargs)
        elif spec.kind == "float":
            flags.DEFINE_float(name, default, spec.help, **kwargs)
        elif spec.kind == "str":
            flags.DEFINE_string(name, default, spec.help, **kwargs)
        elif spec.kind == "enum":
            flags.DEFINE_enum(name, default, list(spec.choices), spec.help, **kwargs)
        elif spec.kind == "list":
            flags.DEFINE_list(name, default, spec.help, **kwargs)
        elif spec.kind == "bool_or_auto":
            flags.DEFINE_flag(flags.Flag(common_flags.BoolOrAutoParser(), flags.ArgumentSerializer(), name, default,
                                         spec.help, boolean=True), flag_values=flag_values)
        else:
            raise TypeError(f"--{name}: no flag type for a {spec.kind} field; declare kind= on it")


def value(name: str, raw: Any) -> Any:
    """A parsed flag value as its config field holds it: lists as tuples of the field's element type."""
    spec = specs().get(name)
    if not isinstance(raw, list):
        return raw
    item = spec.item if spec is not None and spec.item is not None else str
    try:
        return tuple(item(v) for v in raw)
    except ValueError:
        raise ValueError(f"--{name}={','.join(raw)}: expected comma-separated {item.__name__} values") from None


def launch_values(flag_values: flags.FlagValues, exclude: Iterable[str] = ()) -> dict:
    """Every flag's value (lists as typed tuples), as tasks.registry.build_task takes them."""
    excluded = set(exclude)
    return {name: value(name, raw) for name, raw in flag_values.flag_values_dict().items() if name not in excluded}


def build(config_cls: type, flag_values: flags.FlagValues, **overrides) -> Any:
    """`config_cls` from the parsed flags that are its fields (unset ones keep the field default) and `overrides`."""
    kwargs = {}
    for field in options.flag_fields(config_cls):
        name = options.flag_name(field)
        if name in flag_values and flag_values[name].value is not None:
            kwargs[field.name] = value(name, flag_values[name].value)
    kwargs.update(overrides)
    return config_cls(**kwargs)
