"""launch.evaluate: an evaluation sidecar following a launch.train run as it writes checkpoints (every checkpoint
evaluated once, with the metrics launch.train itself printed, TensorBoard points at the checkpoints' steps, the
best checkpoint kept, exit after the final step), one-shot evaluation of a checkpoint, and the sidecar's timeout;
plus the engine's side of `launch.train --mode=train`: checkpoints where evaluations would have been."""
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from conftest import REPO_ROOT
from engine_helpers import ToyTask, run_training
from launch_jobs import JOB_TIMEOUT_SECS, Job, eval_results, sst2_workspace

STEPS = (10, 20, 30)


def _evaluate(args: list[str], log: str) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-m", "launch.evaluate", *args], cwd=REPO_ROOT, env=dict(os.environ),
                                stdout=out, stderr=subprocess.STDOUT)


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _eval_lines(output: str) -> dict[int, list[str]]:
    """`eval | step: N | ...` lines by step."""
    lines = {}
    for line in output.splitlines():
        if line.startswith("eval | step: "):
            lines.setdefault(int(line.split()[3]), []).append(line)
    return lines


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return sst2_workspace(tmp_path_factory.mktemp("evaluate_data"))


def _data_args(workspace) -> list[str]:
    # Data flags are not saved with the run; the model flags come from its model_flags.json.
    return [f"--eval_data={workspace['dev']}", "--eval_batch_size=24", "--precision=float32"]


@pytest.fixture(scope="module")
def followed_run(workspace, tmp_path_factory):
    """launch.train evaluating at steps 10, 20, 30 (so it prints what the sidecar must reproduce), and a sidecar
    started before the run exists, writing into model_dir/sidecar. Beside them (mostly idle, so started at the same
    time to save a process start-up), a sidecar of a folder that never gets a checkpoint, with a 1 s timeout."""
    folder = tmp_path_factory.mktemp("evaluate_run")
    run_dir = folder / "run"
    logs = {name: str(folder / f"{name}.log") for name in ("sidecar", "timeout")}
    sidecar = _evaluate(["--mode=continuous_eval", f"--model_dir={run_dir}", "--eval_name=sidecar",
                         "--best_metric=accuracy", "--timeout_secs=240", *_data_args(workspace)], logs["sidecar"])
    timeout = _evaluate(["--mode=continuous_eval", f"--model_dir={folder / 'never'}", "--timeout_secs=1"],
                        logs["timeout"])
    train_args = dict(task="sst2", init_encoder=workspace["encoder"], train_data=workspace["train"],
                      eval_data=workspace["dev"], max_seq_length=16, global_batch_size=8, train_steps=STEPS[-1],
                      steps_per_loop=5, eval_every_steps=10, eval_batch_size=24, learning_rate=1e-3,
                      precision="float32", group_by_length=0, seed=3, max_to_keep=5, model_dir=str(run_dir),
                      label_names="negative,positive")
    job = Job([f"--{k}={v}" for k, v in train_args.items()], folder, "train")
    train_codes = job.wait()
    codes = {}
    for name, proc in (("sidecar", sidecar), ("timeout", timeout)):
        try:
            codes[name] = proc.wait(timeout=JOB_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
    assert train_codes == [0], job.describe()
    outputs = {name: (_read(log), codes[name]) for name, log in logs.items()}
    return dict(run_dir=run_dir, train=job.output(0), sidecar=outputs["sidecar"], timeout=outputs["timeout"],
                never=folder / "never")


@pytest.mark.slow
def test_sidecar_evaluates_every_checkpoint_once_like_training_did(followed_run):
    run_dir, train_output = followed_run["run_dir"], followed_run["train"]
    sidecar_output, sidecar_code = followed_run["sidecar"]
    assert sidecar_code == 0, sidecar_output[-3000:]
    assert f"evaluated the final checkpoint (step {STEPS[-1]}); done" in sidecar_output
    sidecar_lines, train_lines = _eval_lines(sidecar_output), _eval_lines(train_output)
    assert sorted(sidecar_lines) == list(STEPS) and all(len(v) == 1 for v in sidecar_lines.values()), sidecar_lines
    # The same model and data: the very line launch.train printed for its evaluation of that step.
    assert sidecar_lines == train_lines

    # TensorBoard: one point per checkpoint step and metric, in model_dir/sidecar (launch.train's eval/ untouched).
    events = event_accumulator.EventAccumulator(str(run_dir / "sidecar"))
    events.Reload()
    assert {"accuracy", "f1", "loss"} <= set(events.Tags()["tensors"])
    for tag in ("accuracy", "f1", "loss"):
        assert [e.step for e in events.Tensors(tag)] == list(STEPS), tag
    assert len(tf.io.gfile.glob(str(run_dir / "eval" / "events.out.tfevents.*"))) == 1

    # Latest results (the restart point) and the best checkpoint by accuracy, first of equals.
    results = json.loads(_read(run_dir / "sidecar" / "eval_results.json"))
    assert results["step"] == STEPS[-1] and results["split"] == "validation"
    final = eval_results(run_dir)  # what launch.train wrote for its final evaluation, full precision
    assert {k: results[k] for k in final} == pytest.approx(final, abs=1e-6)
    accuracy = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("accuracy")}
    best = json.loads(_read(run_dir / "best_sidecar" / "best_metrics.json"))
    assert best["step"] == max(STEPS, key=lambda s: (accuracy[s], -s))
    assert tf.train.latest_checkpoint(str(run_dir / "best_sidecar")).endswith(f"ckpt-{best['step']}")


@pytest.mark.slow
def test_one_checkpoint_a_missing_one_and_a_restarted_sidecar(followed_run, workspace, tmp_path):
    """The sidecar's best checkpoint (a folder: its latest; its flags from the run beside it) evaluated once; the
    sidecar restarted after the end evaluates nothing again."""
    run_dir, train_output = followed_run["run_dir"], followed_run["train"]
    logs = {name: str(tmp_path / f"{name}.log") for name in ("once", "missing", "again")}
    once = _evaluate([f"--checkpoint={run_dir / 'best_sidecar'}", *_data_args(workspace)], logs["once"])
    missing = _evaluate([f"--checkpoint={tmp_path / 'nothing' / 'ckpt-5'}"], logs["missing"])
    again = _evaluate(["--mode=continuous_eval", f"--model_dir={run_dir}", "--eval_name=sidecar",
                       "--timeout_secs=240", *_data_args(workspace)], logs["again"])
    codes = [once.wait(JOB_TIMEOUT_SECS), missing.wait(JOB_TIMEOUT_SECS), again.wait(JOB_TIMEOUT_SECS)]
    output = _read(logs["once"])
    assert codes[0] == 0, output[-3000:]
    best = json.loads(_read(run_dir / "best_sidecar" / "best_metrics.json"))
    step = best["step"]
    assert _eval_lines(output) == {step: _eval_lines(train_output)[step]}  # what launch.train printed then
    written = json.loads(_read(run_dir / "best_sidecar" / f"eval_validation-{step}.json"))
    assert written["checkpoint"] == str(run_dir / "best_sidecar" / f"ckpt-{step}") and written["step"] == step
    assert {k: written[k] for k in best} == pytest.approx(best, abs=1e-6)
    errors = [line for line in _read(logs["missing"]).splitlines() if line.startswith("launch.evaluate:")]
    assert codes[1] == 1 and errors == [
        f"launch.evaluate: error: checkpoint '{tmp_path / 'nothing' / 'ckpt-5'}': no such folder or checkpoint "
        "(expected a launch.train --model_dir or a prefix with a ckpt-5.index file)"], errors
    again = _read(logs["again"])
    assert codes[2] == 0 and "the final checkpoint (step 30) was evaluated already; done" in again, again[-3000:]
    assert not _eval_lines(again)


@pytest.mark.slow
def test_sidecar_stops_when_no_checkpoint_comes_for_the_timeout(followed_run):
    output, code = followed_run["timeout"]
    assert code == 0 and f"no new checkpoint in {followed_run['never']} for 1 s; done" in output, output[-3000:]


@pytest.mark.slow
def test_launch_train_shows_its_flags_as_hparams(followed_run):
    """The HParams dashboard's session is model_dir: this program's flags that have a value and the configs'
    fields, not the flags TensorFlow's own modules define."""
    from tensorboard.plugins.hparams import metadata  # noqa: PLC0415
    events = event_accumulator.EventAccumulator(str(followed_run["run_dir"]))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    start = metadata.parse_session_start_info_plugin_data(content)
    values = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    assert values["task"] == "sst2" and values["max_seq_length"] == 16 and values["mode"] == "train_and_eval"
    assert values["eval_data"].endswith("dev.tsv") and values["warmup_steps"] == 3  # a config's derived value
    assert values["label_names"] == "negative,positive"  # a list flag, as the command line takes it
    assert "hbm_oom_exit" not in values and "head" not in values  # TensorFlow's flags; flags left unset


def test_without_an_eval_split_checkpoints_are_still_saved_at_the_eval_steps(tmp_path):
    """launch.train --mode=train passes no eval split: a sidecar must still find checkpoints at the eval steps, and
    the final step in train_steps.json."""
    trainer = run_training(ToyTask, global_batch_size=8, train_steps=10, steps_per_loop=3, eval_every_steps=4,
                           checkpoint_every_secs=0, max_to_keep=10, model_dir=str(tmp_path))
    paths = tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths
    assert [os.path.basename(p) for p in paths] == ["ckpt-4", "ckpt-8", "ckpt-10"]
    assert not tf.io.gfile.exists(str(tmp_path / "eval"))
    assert [h["step"] for h in trainer.train_history] == [3, 4, 7, 8, 10]
    assert json.loads(_read(tmp_path / "train_steps.json")) == {"train_steps": 10}  # where the sidecar stops


def test_early_stopping_tells_the_sidecar_where_the_run_ended(tmp_path):
    """A sidecar of a run that stopped early would otherwise wait for its timeout (train_steps never comes)."""
    run_training(ToyTask, global_batch_size=8, train_steps=50, eval_every_steps=1, eval_split="validation",
                 best_metric="accuracy", early_stopping_patience=1, learning_rate=1e-9, model_dir=str(tmp_path))
    assert json.loads(_read(tmp_path / "train_steps.json")) == {"train_steps": 50, "stopped_at": 2}
    # Resumed, it trains on (the early-stopping count starts afresh): the stop no longer holds.
    run_training(ToyTask, global_batch_size=8, train_steps=3, model_dir=str(tmp_path))
    assert json.loads(_read(tmp_path / "train_steps.json")) == {"train_steps": 3}
