"""Launch-only flags that several programs share (not config fields), defined once here so their names, defaults
and help agree. The options of the configs are defined by launch/config_flags.py from their fields.

Each `define_*` takes the FlagValues to define into (launch/export.py defines on demand, so tests can define its
flags into a fresh FlagValues).
"""
from __future__ import annotations

from absl import flags

from tasks import registry


def define_task(flag_values: flags.FlagValues = flags.FLAGS, default: str | None = None) -> None:
    """--task; without a default (predict, export, evaluate) it is the one launch.train saved with the model."""
    saved = "" if default else " (default: as launch.train saved it with the model, model_flags.json)"
    flags.DEFINE_enum("task", default, list(registry.SPECS), f"The Task (tasks/registry.py){saved}.",
                      flag_values=flag_values)


def define_data(flag_values: flags.FlagValues = flags.FLAGS, train: bool = False) -> None:
    """--data_dir and --eval_data (and --train_data for a program that trains)."""
    flags.DEFINE_string("data_dir", None, "Folder with sst2/, squad/, conll2003/ (default $DATA_DIR or "
                        "../shared/data).", flag_values=flag_values)
    if train:
        flags.DEFINE_string("train_data", None, "Training file (overrides the task's default under --data_dir).",
                            flag_values=flag_values)
    flags.DEFINE_string("eval_data", None, "Evaluation file (overrides the task's default under --data_dir).",
                        flag_values=flag_values)


def define_cpu_devices(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into this many logical devices (e.g. 2 with "
                         "--strategy=mirrored tries data parallelism on a laptop; 0: one device).",
                         flag_values=flag_values)


class BoolOrAutoParser(flags.BooleanParser):
    """A boolean flag (--x, --nox, --x=false) that also takes --x=auto (--fuse_elementwise).

    Here, not in launch/train.py, so it can be imported without defining that program's flags."""

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip().lower() == "auto":
            return "auto"
        return super().parse(argument)

    def flag_type(self):
        return "bool or auto"
