"""One source of options: each launch program's flag that stands for a config field has that field's name, type,
default, choices and help (launch/config_flags.py defines them from engine/options.py metadata), so train,
evaluate, predict and export cannot drift apart; and defining them loads no TensorFlow (a fast --help)."""
import dataclasses
import functools
import json
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO_ROOT
from engine import options
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from launch import config_flags
from tasks import registry

PROGRAMS = ("train", "evaluate", "predict", "export", "soup", "convert")

# Each program's flags as absl defined them, in a fresh process (train, evaluate, predict and soup define theirs
# into absl's global FLAGS at import, under overlapping names).
DUMP = """
import importlib, json, sys
from absl import flags
program = importlib.import_module("launch." + sys.argv[1])
if hasattr(program, "define_flags"):
    program.define_flags()
dumped = {name: {"default": flag.default, "help": flag.help, "enum": list(getattr(flag.parser, "enum_values", None) or [])}
          for name, flag in flags.FLAGS._flags().items()}
print(json.dumps({"flags": dumped, "tensorflow": "tensorflow" in sys.modules}))
"""

# Program defaults that differ from the config's on purpose.
OVERRIDES = {("soup", "eval_batch_size"): 128}
# Flags of the same name that are no config option: launch.convert's vocab.txt of the checkpoint it converts.
UNRELATED = {("convert", "vocab_file")}


@pytest.fixture(scope="module")
def program_flags():
    found = {}
    for program in PROGRAMS:
        run = subprocess.run([sys.executable, "-c", DUMP, program], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=120, check=True)
        found[program] = json.loads(run.stdout.strip().splitlines()[-1])
    return found


def _expected_default(spec):
    return list(map(str, spec.default)) if isinstance(spec.default, tuple) else spec.default


@pytest.mark.parametrize("program", PROGRAMS)
def test_config_flags_have_their_fields_default_and_help(program, program_flags):
    specs = config_flags.specs()
    dumped = program_flags[program]["flags"]
    checked = [name for name in dumped if name in specs and (program, name) not in UNRELATED]
    for name in checked:
        spec, flag = specs[name], dumped[name]
        choices = f"<{'|'.join(spec.choices)}>: " if spec.choices else ""  # absl puts an enum's values first
        assert flag["help"] == choices + spec.help, f"launch.{program} --{name}: help drifted from its config field"
        assert flag["default"] == OVERRIDES.get((program, name), _expected_default(spec)), f"launch.{program} --{name}"
        assert flag["enum"] == list(spec.choices), f"launch.{program} --{name}: choices drifted"
    if program in ("train", "evaluate", "predict", "export"):
        assert checked, f"launch.{program} defines no flag from the configs"


def test_loading_the_flags_loads_no_tensorflow(program_flags):
    assert {p: d["tensorflow"] for p, d in program_flags.items()} == {p: False for p in PROGRAMS}


def test_train_takes_every_option_and_the_model_flags_reach_predict_and_export(program_flags):
    assert set(config_flags.specs()) <= set(program_flags["train"]["flags"])
    for program in ("predict", "export", "evaluate"):
        assert set(registry.MODEL_FLAGS) <= set(program_flags[program]["flags"]), program


def test_every_flag_field_has_help_and_a_merged_flag():
    specs = config_flags.specs()
    configs = [RuntimeConfig, TrainerConfig, OptimizerConfig, *registry.CONFIGS.values()]
    for config_cls in configs:
        for field in options.flag_fields(config_cls):
            text = field.metadata["help"]
            assert text, f"{config_cls.__name__}.{field.name} is a flag without help"
            spec = specs[options.flag_name(field)]
            assert text in spec.help and (config_cls, field.name) in spec.fields
    # The model flags are what the Task configs mark so; launch.train saves them with the run.
    marked = {options.flag_name(f) for c in registry.CONFIGS.values() for f in options.flag_fields(c)
              if f.metadata["model"]}
    assert set(registry.MODEL_FLAGS) == marked and "init_encoder" in marked and "label_column" not in marked


def test_engine_flags_default_to_their_field_and_task_flags_to_the_task():
    specs = config_flags.specs()
    runtime = {f.name: f for f in dataclasses.fields(RuntimeConfig)}
    assert specs["jit_compile"].default is False and specs["precision"].default == "auto"  # launch_default
    assert runtime["precision"].default == "float32"
    assert specs["max_seq_length"].default is None  # each Task keeps its own; the help lists them
    assert "128 for classification, conll_ner; 384 for squad" in specs["max_seq_length"].help
    assert specs["init_encoder"].default == "minilm" and specs["seed"].default == 0
    assert specs["head"].choices == ("softmax", "sigmoid", "crf")


def test_configs_built_from_parsed_flags():
    flag_values = flags.FlagValues()
    config_flags.define(config_flags.specs(), flag_values)
    flag_values(["train", "--precision=float32", "--fuse_elementwise=false", "--global_batch_size=8",
                 "--steps_per_loop=3", "--profile_steps=2,4", "--optimizer=lamb", "--layer_decay=0.9",
                 "--class_weights=1,3"])
    runtime = config_flags.build(RuntimeConfig, flag_values)
    assert runtime == RuntimeConfig(precision="float32", fuse_elementwise=False)
    trainer = config_flags.build(TrainerConfig, flag_values, model_dir="runs/x", train_steps=10)
    assert (trainer.global_batch_size, trainer.steps_per_loop, trainer.profile_steps) == (8, 3, (2, 4))
    optimizer = config_flags.build(OptimizerConfig, flag_values, warmup_steps=1)
    assert (optimizer.optimizer, optimizer.layer_decay, optimizer.clip_norm) == ("lamb", 0.9, 1.0)
    values = config_flags.launch_values(flag_values)
    assert values["class_weights"] == (1.0, 3.0) and values["max_seq_length"] is None
    with pytest.raises(ValueError, match="--class_weights=1,x"):
        config_flags.value("class_weights", ["1", "x"])


def test_every_task_config_refuses_a_negative_group_by_length():
    from tasks.classification.config import ClassificationConfig
    from tasks.ner.config import TaggingConfig
    from tasks.squad.config import SquadConfig
    for config_cls in (functools.partial(ClassificationConfig, data_files={}), TaggingConfig, SquadConfig):
        with pytest.raises(ValueError, match=r"group_by_length=-1: expected 0 \(off\) or batches per window"):
            config_cls(group_by_length=-1)
        assert config_cls(group_by_length=4).group_by_length == 4
