"""User errors in the launch programs are one line, `<program>: error: <file>:<line>: <what>` for input files,
with exit status 1 and no traceback; bugs keep theirs (launch/errors.py). The programs run as users run them,
in subprocesses, on inputs that fail before any model is built (cheap)."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1")


def run(*args, env=ENV):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def start(*args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def last_line(stderr):
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "latin1.txt").write_bytes("a fine sentence\nun caf\u00e9 noir\n".encode("latin-1"))
    (folder / "broken.json").write_text('{"version": "1.1",\n "data": [\n  {"title": "x",, }\n ]}\n')
    (folder / "bad.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tmeh\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def outcomes(bad_files, tmp_path_factory):
    """Each program's (stdout, stderr, returncode) on a bad input, run two at a time."""
    runs = tmp_path_factory.mktemp("runs")
    commands = {
        "predict_not_utf8": ["-m", "launch.predict", "--task=sst2", f"--model_dir={runs}/none",
                             f"--input_file={bad_files / 'latin1.txt'}"],
        "predict_broken_json": ["-m", "launch.predict", "--task=squad", f"--model_dir={runs}/none",
                                f"--input_json={bad_files / 'broken.json'}"],
        "convert_missing": ["-m", "launch.convert", "--from=hf", f"--checkpoint={runs}/no_such_model",
                            f"--output_dir={runs}/converted"],
        "convert_missing_verbose": ["-m", "launch.convert", "--from=hf", f"--checkpoint={runs}/no_such_model",
                                    f"--output_dir={runs}/converted", "--verbose_errors"],
        # --train_epochs counts the training examples, so the TSV is read before any model is built.
        "train_bad_tsv": ["-m", "launch.train", "--task=sst2", f"--train_data={bad_files / 'bad.tsv'}",
                          f"--model_dir={runs}/train", "--train_epochs=1"],
    }
    results, names = {}, list(commands)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
        processes = {name: start(*commands[name]) for name in pair}
        results.update({name: p.communicate(timeout=600) + (p.returncode,) for name, p in processes.items()})
    return results


def test_predict_input_file_not_utf8_names_file_and_line(outcomes, bad_files):
    _, stderr, returncode = outcomes["predict_not_utf8"]
    assert returncode == 1 and "Traceback" not in stderr
    assert last_line(stderr) == (f"launch.predict: error: {bad_files / 'latin1.txt'}:2: not UTF-8 text (byte 0xe9); "
                                 "save the file as UTF-8")


def test_predict_malformed_squad_json_names_file_and_line(outcomes, bad_files):
    _, stderr, returncode = outcomes["predict_broken_json"]
    assert returncode == 1 and "Traceback" not in stderr
    assert last_line(stderr).startswith(f"launch.predict: error: {bad_files / 'broken.json'}:3: malformed JSON")


def test_convert_missing_checkpoint_is_one_line_and_verbose_errors_shows_the_traceback(outcomes):
    _, stderr, returncode = outcomes["convert_missing"]
    assert returncode == 1 and "Traceback" not in stderr
    assert last_line(stderr).startswith("launch.convert: error: ") and "no_such_model" in last_line(stderr)
    _, stderr, returncode = outcomes["convert_missing_verbose"]
    assert returncode != 0 and "Traceback" in stderr and "no_such_model" in last_line(stderr)


def test_train_bad_tsv_names_file_and_line(outcomes, bad_files):
    _, stderr, returncode = outcomes["train_bad_tsv"]
    assert returncode != 0
    where = f"{bad_files / 'bad.tsv'}:3: unknown label 'meh'; expected one of ['negative', 'positive']"
    assert where in last_line(stderr), stderr[-3000:]
    # One line only once launch/train.py runs main through launch.errors (the other launchers do already).
    with open(os.path.join(REPO_ROOT, "launch", "train.py"), encoding="utf-8") as f:
        if "errors.run(main)" in f.read():
            assert returncode == 1 and "Traceback" not in stderr
            assert last_line(stderr) == f"launch.train: error: {where}"


BUGGY_MAIN = textwrap.dedent("""
    import sys
    from launch import errors
    def main(argv):
        raise {error}
    errors.run(main)
""")


@pytest.mark.parametrize("error, one_line", [
    ('ValueError("--head=\'x\': expected softmax or sigmoid")', "error: --head='x': expected softmax or sigmoid"),
    ('FileNotFoundError(2, "No such file or directory", "/data/x.tsv")',
     "error: /data/x.tsv: No such file or directory"),
    ('ValueError("checkpoint does not match:\\n  2 missing variables\\n  1 unexpected")',
     "error: checkpoint does not match:; 2 missing variables; 1 unexpected"),
    ('KeyError("a bug")', None),       # not a user error: the traceback stays
    ('AttributeError("a bug")', None),
])
def test_which_errors_are_one_line(error, one_line):
    result = run("-c", BUGGY_MAIN.format(error=error))
    assert result.returncode == 1
    if one_line is None:
        assert "Traceback" in result.stderr and "a bug" in last_line(result.stderr)
    else:
        assert "Traceback" not in result.stderr and last_line(result.stderr) == f"-c: {one_line}"


def test_usage_errors_keep_absl_behaviour():
    result = run("-c", BUGGY_MAIN.format(error='__import__("absl.app").app.UsageError("give --text")'))
    assert result.returncode == 1 and "Traceback" not in result.stderr and "give --text" in result.stderr
