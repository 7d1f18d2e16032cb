"""Every flagfile under configs/ is a valid launch.train command line: absl parses it with the program's own flag
definitions (unknown names and bad enum or number values are refused), without starting TensorFlow."""
import glob
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

FLAGFILES = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.flags")))

# Parses each flagfile into a copy of launch.train's flags; prints {path: error} for those that fail.
PARSE_ALL = """
import copy, json, sys
from absl import flags
import launch.train  # noqa: F401  (defines the program's flags)
errors = {}
for path in sys.argv[1:]:
    try:
        copy.deepcopy(flags.FLAGS)(["launch.train", "--flagfile=" + path, "--model_dir=unused"])
    except flags.Error as error:
        errors[path] = str(error)
print(json.dumps(errors))
"""


def test_there_are_configs_for_each_task_at_three_scales():
    names = {os.path.basename(path) for path in FLAGFILES}
    for task in ("sst2", "squad", "conll"):
        assert {f"{task}_cpu_smoke.flags", f"{task}_gpu8.flags", f"{task}_tpu_v4_32.flags"} <= names


def test_every_flagfile_parses_with_launch_train_flags():
    run = subprocess.run([sys.executable, "-c", PARSE_ALL, *FLAGFILES], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {}


def test_bad_flagfiles_are_caught(tmp_path):
    (tmp_path / "typo.flags").write_text("--task=sst2\n--global_batch_sise=32\n")
    (tmp_path / "value.flags").write_text("--task=sst2\n--precision=float64\n")
    run = subprocess.run([sys.executable, "-c", PARSE_ALL, str(tmp_path / "typo.flags"), str(tmp_path / "value.flags")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert "global_batch_sise" in errors[str(tmp_path / "typo.flags")]
    assert "precision" in errors[str(tmp_path / "value.flags")]
