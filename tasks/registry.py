"""Task names for `--task`, each with its config dataclass and default data files.

A config field that is a launch flag says so on the field, with its help (engine/options.py);
launch/config_flags.py defines the flags of every program from CONFIGS, so adding an option to a
Task is adding a field. Light (TensorFlow loads only when a Task is built), so launch programs read
CONFIGS and MODEL_FLAGS before parsing their flags.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

from engine import options
from tasks import textfiles
from tasks.classification.config import ClassificationConfig
from tasks.ner.config import TaggingConfig
from tasks.squad.config import SquadConfig

if TYPE_CHECKING:
    from engine.task import Task

# Each Task's config, by the task names it serves (sst2 is classification with SST-2's label names).
CONFIGS: dict[str, type] = {"classification": ClassificationConfig, "squad": SquadConfig,
                            "conll_ner": TaggingConfig}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    build: Callable[..., Task]                 # config -> Task
    config_cls: type
    default_files: Callable[[str], dict]       # data_dir -> {split: path}
    eval_split: str = "validation"
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # preset config values
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config values unless a flag sets them


def _classification_spec(**defaults) -> TaskSpec:
    from tasks.classification.task import ClassificationTask  # noqa: PLC0415 (lazy per task: TensorFlow)
    return TaskSpec(ClassificationTask, ClassificationConfig,
                    lambda d: {"train": os.path.join(d, "sst2", "train.tsv"),
                               "validation": os.path.join(d, "sst2", "dev.tsv")}, defaults=defaults)


def _sst2_spec() -> TaskSpec:
    # GLUE's SST-2 labels are 0/1; predictions and the serving export answer with these names.
    return _classification_spec(label_names=("negative", "positive"))


def _squad_spec(**fixed) -> TaskSpec:
    from tasks.squad.task import SquadTask  # noqa: PLC0415
    # No default files: --train_data/--eval_data if given, else one --squad_file (default dev-v1.1.json) that
    # SquadConfig splits by article (tasks/squad/data.py).
    return TaskSpec(SquadTask, SquadConfig, lambda d: {}, fixed=fixed)


def _conll_ner_spec(**fixed) -> TaskSpec:
    from tasks.ner.task import TaggingTask  # noqa: PLC0415
    return TaskSpec(TaggingTask, TaggingConfig,
                    lambda d: {split: os.path.join(d, "conll2003", name) for split, name in
                               (("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt"))},
                    fixed=fixed)


# Launch flags that shape a Task's model or its inputs (fields declared with model=True): export and predict
# must be given the training values, and name them when a checkpoint does not match.
MODEL_FLAGS = tuple(dict.fromkeys(options.flag_name(f) for config_cls in CONFIGS.values()
                                  for f in options.flag_fields(config_cls) if f.metadata["model"]))

# launch.train writes the task and its model flags here, so predict and export need only the model_dir.
MODEL_FLAGS_FILE = "model_flags.json"


def save_model_flags(model_dir: str, task: str, values: Mapping[str, Any]) -> str:
    """Writes {task, model flags that were set} to model_dir/model_flags.json (atomically); returns its path."""
    from engine import files  # noqa: PLC0415 - TensorFlow (tf.io.gfile)
    saved = {"task": task}
    saved.update({k: list(v) if isinstance(v, tuple) else v
                  for k, v in values.items() if k in MODEL_FLAGS and v is not None})
    path = os.path.join(model_dir, MODEL_FLAGS_FILE)
    files.write_json(path, saved)
    return path


def load_model_flags(checkpoint: str) -> dict:
    """The flags launch.train saved for a model_dir or a checkpoint in it (also model_dir/best/ckpt-N); {} if none."""
    import tensorflow as tf  # noqa: PLC0415
    from engine import files  # noqa: PLC0415
    folder = checkpoint if tf.io.gfile.isdir(checkpoint) else os.path.dirname(checkpoint)
    for candidate in (folder, os.path.dirname(folder)):
        path = os.path.join(candidate, MODEL_FLAGS_FILE)
        if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
            try:
                return files.read_json(path)
            except (OSError, ValueError, tf.errors.OpError) as error:
                raise ValueError(f"{path}: unreadable ({error}); pass the task flags instead") from error
    return {}


def fill_unset_flags(flag_values, checkpoint: str) -> None:
    """Sets every flag not given on the command line to the value saved with `checkpoint`."""
    for name, value in load_model_flags(checkpoint).items():
        if name in flag_values and not flag_values[name].present:
            flag_values[name].value = value


SPECS: dict[str, Callable[[], TaskSpec]] = {
    "sst2": _sst2_spec,
    "classification": _classification_spec,
    "conll_ner": _conll_ner_spec,
    "squad": _squad_spec,
}


def build_task(name: str, values: Mapping[str, Any]) -> tuple[Task, str]:
    """Builds Task `name` from launch values (flag name -> value); returns (task, eval split name)."""
    if name not in SPECS:
        raise ValueError(f"--task={name!r}: expected one of {sorted(SPECS)}")
    spec = SPECS[name]()
    files = spec.default_files(values.get("data_dir") or textfiles.default_data_dir())
    if values.get("train_data"):
        files["train"] = values["train_data"]
    if values.get("eval_data"):
        files[spec.eval_split] = values["eval_data"]
    kwargs = dict(spec.defaults)
    for field in dataclasses.fields(spec.config_cls):
        name = options.flag_name(field) or field.name  # e.g. encoder is set by --init_encoder
        if values.get(name) is not None and field.name != "data_files":
            kwargs[field.name] = values[name]
    kwargs.update(spec.fixed)
    if "data_files" in {f.name for f in dataclasses.fields(spec.config_cls)}:
        kwargs["data_files"] = files
    return spec.build(spec.config_cls(**kwargs)), spec.eval_split
