"""Exact continuation of `launch.train` after SIGTERM and kill -9, on a small BERT with dropout 0.1 (the masks are
keyed by seed, update, replica, micro-batch and layer; see engine/dropout.py): per-step losses and the final
weights and optimizer state equal the uninterrupted run, on the default strategy (input iterator in the
checkpoint) and mirrored over two logical CPUs with gradient accumulation 2 (input re-read and skipped), the
latter training on the real tokens only."""
import random
import signal

import pytest
import tensorflow as tf

from launch_jobs import Job, assert_same_run, run_job, sst2_args, sst2_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return sst2_workspace(tmp_path_factory.mktemp("resume_data"))


# The second geometry also trains on tokens only (--skip_padding_in_training): its dropout masks have the shape
# of each batch's token count, and must come back the same after a restart too.
@pytest.mark.parametrize("geometry", [{}, {"strategy": "mirrored", "cpu_devices": 2, "grad_accum_steps": 2,
                                           "skip_padding_in_training": True}],
                         ids=["default", "mirrored_accumulation_on_tokens"])
def test_sigterm_then_kill_9_then_resume_equals_the_uninterrupted_run(geometry, workspace, tmp_path):
    expected = run_job(sst2_args(workspace, tmp_path / "expected", **geometry), tmp_path, "expected")
    # launch.train's last line says where the time went (tests/test_summaries.py checks that its parts add up).
    assert [line for line in expected.output().splitlines() if line.startswith("time | total: ")], expected.describe()
    args = sst2_args(workspace, tmp_path / "run", **geometry)

    # SIGTERM between checkpoints (every 10 steps): saved at the next step boundary, exit 0.
    job = Job(args, tmp_path, "sigterm")
    job.wait_for_step(random.Random().randint(3, 8))
    job.signal(0, signal.SIGTERM)
    assert job.wait() == [0], job.describe()
    stopped = [line for line in job.output().splitlines() if line.startswith("SIGTERM: saved step")]
    assert stopped, job.describe()
    stopped_at = int(stopped[0].split()[3])
    assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith(f"ckpt-{stopped_at}")

    # Resume, then kill -9 after step 22: steps since the checkpoint at 20 are lost and must be redone identically.
    job = Job(args, tmp_path, "kill9")
    job.wait_for_step(22)
    job.signal(0, signal.SIGKILL)
    assert job.wait() == [-signal.SIGKILL]
    assert f"resumed from {tmp_path / 'run'}/ckpt-{stopped_at} at step {stopped_at}" in job.output()

    job = run_job(args, tmp_path, "restart")
    assert f"resumed from {tmp_path / 'run'}/ckpt-20 at step 20" in job.output(), job.describe()
    assert_same_run(tmp_path / "run", tmp_path / "expected", steps=40)
