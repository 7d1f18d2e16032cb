"""Two `launch.train` worker processes under MultiWorkerMirroredStrategy (TF_CONFIG on loopback ports), tiny BERT
with dropout 0.1 on SST-2/SQuAD/CoNLL slices: the same updates, losses and evaluation as one process, only the
chief writing files, SIGTERM to one worker stopping both at one step, a killed worker ending the other, and
restarts continuing exactly."""
import os
import random
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import DATA_DIR
from launch_jobs import Job, assert_same_run, eval_results, run_job, sst2_args, sst2_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return sst2_workspace(tmp_path_factory.mktemp("mw_data"))


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory):
    """Two workers, gradient accumulation 2, 40 updates, a checkpoint every 10, evaluation at the end."""
    folder = tmp_path_factory.mktemp("mw_uninterrupted")
    job = run_job(sst2_args(workspace, folder / "run", grad_accum_steps=2), folder, "uninterrupted", num_workers=2)
    return folder / "run", job


def _final_line(output: str) -> str:
    return [line for line in output.splitlines() if line.startswith("final validation metrics")][-1]


def test_two_workers_equal_one_process_on_two_devices_and_only_the_chief_writes(workspace, uninterrupted, tmp_path):
    run_dir, job = uninterrupted
    # The same global batches, replica for replica, and dropout keyed by replica: a single process mirrored over
    # two logical CPUs must give the same losses, weights, optimizer state and evaluation.
    single = run_job(sst2_args(workspace, tmp_path / "single", grad_accum_steps=2, strategy="mirrored",
                               cpu_devices=2), tmp_path, "single")
    assert_same_run(run_dir, tmp_path / "single", steps=40)
    assert eval_results(run_dir) == pytest.approx(eval_results(tmp_path / "single"), abs=1e-6)
    # Both workers report the whole dev set's metrics (gathered), identical to each other.
    assert _final_line(job.output(0)) == _final_line(job.output(1)) == _final_line(single.output(0))
    # Chief-only files: one events file per phase, and no worker's temporary checkpoint folder left.
    assert len(tf.io.gfile.glob(str(run_dir / "train" / "events.out.tfevents.*"))) == 1
    assert len(tf.io.gfile.glob(str(run_dir / "eval" / "events.out.tfevents.*"))) == 1
    assert not tf.io.gfile.glob(str(run_dir / "workertemp_*"))
    assert {os.path.basename(p) for p in tf.io.gfile.glob(str(run_dir / "ckpt-*.index"))} == {
        "ckpt-20.index", "ckpt-30.index", "ckpt-40.index"}


def test_sigterm_to_one_worker_then_kill_9_then_restart_continues_exactly(workspace, uninterrupted, tmp_path):
    expected_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    args = sst2_args(workspace, run_dir, grad_accum_steps=2)

    # SIGTERM to the non-chief at a random step: both agree at the next step boundary, save it and exit 0.
    sigterm_step = random.Random().randint(3, 12)
    job = Job(args, tmp_path, "sigterm", num_workers=2)
    job.wait_for_step(sigterm_step, worker=1)
    job.signal(1, signal.SIGTERM)
    assert job.wait() == [0, 0], job.describe()
    saved = [[line for line in job.output(i).splitlines() if line.startswith("SIGTERM: saved step")]
             for i in (0, 1)]
    assert saved[0] and saved[1], job.describe()
    stopped_at = int(saved[0][0].split()[3])
    assert int(saved[1][0].split()[3]) == stopped_at, saved
    assert sigterm_step <= stopped_at < 40, (sigterm_step, stopped_at)
    assert tf.train.latest_checkpoint(str(run_dir)).endswith(f"ckpt-{stopped_at}")

    # Restart, then kill -9 the non-chief after step 22: the chief must exit non-zero, naming the lost worker,
    # within 2 minutes (the coordination service notices a dead peer in seconds).
    job = Job(args, tmp_path, "kill9", num_workers=2)
    job.wait_for_step(22, worker=0)
    job.signal(1, signal.SIGKILL)
    killed_at = time.monotonic()
    code = job.wait(timeout=120)[0]
    assert time.monotonic() - killed_at < 120
    chief_output = job.output(0)
    assert code == 1, chief_output[-3000:]
    error_line = chief_output.strip().splitlines()[-1]
    assert "error:" in error_line and "task:1" in error_line and "restart all workers" in error_line, error_line
    assert "Traceback" not in chief_output
    last_logged = max(int(line.split()[3]) for line in chief_output.splitlines() if line.startswith("train | step:"))

    # Restart once more: it resumes from the last checkpoint (20: saved by steps), redoes the lost steps.
    job = run_job(args, tmp_path, "restart", num_workers=2)
    resumed = [line for line in job.output(0).splitlines() if line.startswith("resumed from")]
    assert resumed and resumed[0].endswith("at step 20"), job.describe()
    assert last_logged > 20
    assert_same_run(run_dir, expected_dir, steps=40)
    assert eval_results(run_dir) == pytest.approx(eval_results(expected_dir), abs=1e-6)


def _single_process_evaluation(task_name: str, values: dict, checkpoint: str) -> dict:
    """Evaluates `checkpoint` in this process (default strategy) as launch.train would build the task."""
    from engine.config import RuntimeConfig, TrainerConfig  # noqa: PLC0415
    from engine.trainer import Trainer  # noqa: PLC0415
    from tasks import registry  # noqa: PLC0415

    task, split = registry.build_task(task_name, values)
    trainer = Trainer(task, TrainerConfig(model_dir=os.path.dirname(checkpoint), train_steps=1,
                                          eval_batch_size=values["eval_batch_size"], eval_split=split),
                      runtime=RuntimeConfig(precision="float32"), strategy=tf.distribute.get_strategy())
    trainer.restore(checkpoint)
    return trainer.evaluate()


@pytest.mark.parametrize("task_name, extra", [
    ("sst2", {}),
    ("squad", {"max_examples": 24, "max_seq_length": 128, "doc_stride": 64}),
    ("conll_ner", {"max_train_sentences": 64, "max_eval_sentences": 40, "max_seq_length": 32}),
])
def test_evaluation_under_two_workers_equals_one_process(task_name, extra, workspace, uninterrupted, tmp_path):
    if task_name == "sst2":
        run_dir, job = uninterrupted
        values = dict(init_encoder=workspace["encoder"], train_data=workspace["train"], eval_data=workspace["dev"],
                      max_seq_length=16, eval_batch_size=24, data_dir=DATA_DIR)
    else:
        run_dir = tmp_path / "run"
        # An eval batch that does not divide the split: the padded last batch must count exactly once.
        values = dict(init_encoder=workspace["encoder"], eval_batch_size=14, data_dir=DATA_DIR,
                      cache_dir=str(tmp_path / "cache"), **extra)
        args = [f"--{k}={v}" for k, v in values.items()] + [
            f"--task={task_name}", f"--model_dir={run_dir}", "--train_steps=2", "--steps_per_loop=2",
            "--global_batch_size=8", "--precision=float32", "--learning_rate=1e-3", f"--predictions_dir={run_dir}"]
        job = run_job(args, tmp_path, task_name, num_workers=2)
    got = eval_results(run_dir)
    assert _final_line(job.output(0)) == _final_line(job.output(1))
    expected = _single_process_evaluation(task_name, values, tf.train.latest_checkpoint(str(run_dir)))
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        # Logits from different batch shapes may differ in the last bits; the metrics must not.
        assert got[name] == pytest.approx(value, abs=1e-5 if name == "loss" else 1e-9), name
    if task_name != "sst2":
        predictions = tf.io.gfile.glob(str(run_dir / "*predictions*"))
        assert len(predictions) == 1, predictions  # written once, by the chief
    assert np.isfinite(got["loss"])
