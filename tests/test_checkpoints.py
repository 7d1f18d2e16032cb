"""Checkpoint policy: fallback past a corrupt newest checkpoint, saves by the clock, and a model_dir on a non-local
file system (TF's in-memory ram://), which proves every file goes through tf.io.gfile."""
import os
import uuid

import numpy as np
import tensorflow as tf
from engine_helpers import ToyTask, run_training


def _truncate(path, size=10):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_deletes_nothing(tmp_path, capsys):
    run_training(lambda: ToyTask(shuffle=True), global_batch_size=16, train_steps=2, checkpoint_every_steps=1,
                 model_dir=str(tmp_path))
    newest = tmp_path / "ckpt-2.data-00000-of-00001"
    _truncate(newest)
    capsys.readouterr()
    resumed = run_training(lambda: ToyTask(shuffle=True), global_batch_size=16, train_steps=3,
                           checkpoint_every_secs=0, model_dir=str(tmp_path))
    output = capsys.readouterr().out
    assert f"warning: cannot restore {tmp_path / 'ckpt-2'}" in output and "left untouched" in output
    assert f"resumed from {tmp_path / 'ckpt-1'} at step 1" in output
    assert [h["step"] for h in resumed.train_history] == [2, 3]  # redid step 2 from ckpt-1
    assert os.path.getsize(newest) == 10 and (tmp_path / "ckpt-1.index").exists()
    # The continuation from ckpt-1 is the uninterrupted run.
    straight = run_training(lambda: ToyTask(shuffle=True), global_batch_size=16, train_steps=3,
                            model_dir=str(tmp_path / "straight"))
    for got, want in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_checkpoint_is_saved_when_checkpoint_every_secs_have_passed(tmp_path):
    # A tiny interval: due at every loop boundary, so every step is saved, without any step-based saves.
    run_training(ToyTask, global_batch_size=16, train_steps=3, checkpoint_every_secs=1e-9, max_to_keep=5,
                 model_dir=str(tmp_path / "by_time"))
    assert tf.train.get_checkpoint_state(str(tmp_path / "by_time")).all_model_checkpoint_paths == [
        str(tmp_path / "by_time" / f"ckpt-{step}") for step in (1, 2, 3)]
    run_training(ToyTask, global_batch_size=16, train_steps=3, checkpoint_every_secs=0, max_to_keep=5,
                 model_dir=str(tmp_path / "off"))
    assert tf.train.get_checkpoint_state(str(tmp_path / "off")).all_model_checkpoint_paths == [
        str(tmp_path / "off" / "ckpt-3")]


def test_training_with_model_dir_on_ram_filesystem_writes_nothing_locally(tmp_path, monkeypatch):
    from tasks import registry  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)  # a plain open("ram://...") would create ./ram:/... here
    model_dir = f"ram://runs/{uuid.uuid4().hex}"
    trainer = run_training(ToyTask, global_batch_size=16, train_steps=4, checkpoint_every_steps=2,
                           eval_split="validation", best_metric="accuracy", model_dir=model_dir)
    registry.save_model_flags(model_dir, "toy", {"max_seq_length": 16})
    assert registry.load_model_flags(model_dir) == {"task": "toy", "max_seq_length": 16}
    for name in ("checkpoint", "ckpt-4.index", "input_geometry.json", "best/best_metrics.json", "train", "eval"):
        assert tf.io.gfile.exists(f"{model_dir}/{name}"), name
    assert tf.io.gfile.glob(f"{model_dir}/best/ckpt-*.index")
    assert tf.io.gfile.glob(f"{model_dir}/eval/events.out.tfevents.*")
    # A resumed run reads it all back from there.
    resumed = run_training(ToyTask, global_batch_size=16, train_steps=6, eval_split="validation",
                           best_metric="accuracy", model_dir=model_dir)
    assert [h["step"] for h in resumed.train_history] == [5, 6]
    assert trainer.best.best_value is not None
    assert os.listdir(tmp_path) == []
