"""Runs `python -m launch.train` as a job of one or several worker processes (TF_CONFIG on loopback ports), and
reads back what a run leaves: per-step losses from its TensorBoard events, tensors from its checkpoints.

Used by the resume and multi-worker tests, which interrupt jobs (SIGTERM, kill -9) and compare them with
uninterrupted ones. The losses are read from the event files, not the console, for their full float32 value.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from conftest import DATA_DIR, REPO_ROOT, write_tiny_encoder_dir

# Keep a job's processes from waiting forever on a broken peer: generous for 2 busy cores, bounded for CI.
JOB_TIMEOUT_SECS = 300


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def sst2_workspace(folder) -> dict:
    """A tiny encoder (2 layers, hidden 64, dropout 0.1) and SST-2 slices: 256 training, 100 dev sentences."""
    folder = str(folder)
    encoder_dir = os.path.join(folder, "encoder")
    os.makedirs(encoder_dir, exist_ok=True)
    write_tiny_encoder_dir(encoder_dir)
    paths = {"encoder": encoder_dir}
    for split, name, rows in (("train", "train.tsv", 256), ("dev", "dev.tsv", 100)):
        with open(os.path.join(DATA_DIR, "sst2", name), encoding="utf-8") as f:
            lines = f.read().splitlines()[:rows + 1]  # the header and `rows` sentences
        paths[split] = os.path.join(folder, name)
        with open(paths[split], "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def sst2_args(workspace: dict, model_dir, **overrides) -> list[str]:
    """launch.train flags for a small, fast SST-2 run with dropout on (every step logged: steps_per_loop=1)."""
    values = dict(task="sst2", init_encoder=workspace["encoder"], train_data=workspace["train"],
                  eval_data=workspace["dev"], max_seq_length=16, global_batch_size=8, train_steps=40,
                  steps_per_loop=1, checkpoint_every_steps=10, eval_batch_size=24, learning_rate=1e-3,
                  precision="float32", group_by_length=0, seed=3, model_dir=str(model_dir))
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


class Job:
    """`launch.train` in `num_workers` processes: one plain process, or a MultiWorkerMirroredStrategy cluster."""

    def __init__(self, args: list[str], log_dir, name: str, num_workers: int = 1):
        self.logs = [os.path.join(str(log_dir), f"{name}_worker{i}.log") for i in range(num_workers)]
        ports = free_ports(num_workers) if num_workers > 1 else []
        self.procs = []
        for i, log in enumerate(self.logs):
            env = dict(os.environ)
            if num_workers > 1:
                env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                               "task": {"type": "worker", "index": i}})
                args = args + ["--strategy=multi_worker_mirrored"]
            with open(log, "w", encoding="utf-8") as out:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=REPO_ROOT,
                                                   env=env, stdout=out, stderr=subprocess.STDOUT))

    def output(self, worker: int = 0) -> str:
        with open(self.logs[worker], encoding="utf-8") as f:
            return f.read()

    def wait(self, timeout: float = JOB_TIMEOUT_SECS) -> list[int]:
        """Exit codes of all workers (killing any still running after `timeout`)."""
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes

    def wait_for_step(self, step: int, worker: int = 0, timeout: float = JOB_TIMEOUT_SECS) -> None:
        """Returns once `worker` has logged training step `step` (polling its log every 20 ms)."""
        deadline = time.monotonic() + timeout
        marker = f"train | step: {step} |"
        while marker not in self.output(worker):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"worker {worker} never logged step {step}:\n{self.output(worker)[-3000:]}")
            time.sleep(0.02)

    def signal(self, worker: int, signum: int) -> None:
        os.kill(self.procs[worker].pid, signum)

    def describe(self) -> str:
        return "\n".join(f"--- worker {i}:\n{self.output(i)[-2500:]}" for i in range(len(self.logs)))


def run_job(args: list[str], log_dir, name: str, num_workers: int = 1) -> Job:
    job = Job(args, log_dir, name, num_workers)
    codes = job.wait()
    assert codes == [0] * num_workers, f"{name}: exit codes {codes}\n{job.describe()}"
    return job


def logged_losses(model_dir) -> dict[int, float]:
    """Training loss per step from the TensorBoard events; a step logged again after a resume keeps its last value."""
    losses = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(str(model_dir), "train", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return losses


def checkpoint_tensors(checkpoint: str) -> dict[str, np.ndarray]:
    """Every saved tensor (weights, optimizer slots, step) except the save counter and the input iterator."""
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(checkpoint)
            if not name.startswith(("save_counter", "_CHECKPOINTABLE", "train_iterator"))}


def assert_same_run(model_dir, expected_dir, *, atol: float = 1e-6, steps: Optional[int] = None) -> None:
    """Per-step losses and final checkpoint tensors equal (fp32 tolerance `atol`)."""
    losses, expected = logged_losses(model_dir), logged_losses(expected_dir)
    assert sorted(losses) == sorted(expected), (sorted(losses), sorted(expected))
    if steps is not None:
        assert sorted(losses) == list(range(1, steps + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                               atol=atol, rtol=0)
    got, want = (checkpoint_tensors(tf.train.latest_checkpoint(str(d))) for d in (model_dir, expected_dir))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=0, err_msg=name)


def eval_results(model_dir) -> dict:
    with open(os.path.join(str(model_dir), "eval_results.json"), encoding="utf-8") as f:
        return json.load(f)

