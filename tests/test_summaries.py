"""What a user watching a run sees: the console line's progress and ETA, evaluation progress, and in TensorBoard
the run's settings as hparams (read back with the hparams plugin's own parsing) and a profiler trace of the
requested steps (found where TensorBoard's profile plugin looks)."""
import functools
import os
import re
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_asset_util
from tensorboard.plugins.hparams import metadata as hparams_metadata

from engine import summaries
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig
from engine.strategy import make_strategy
from engine.trainer import Trainer
from engine_helpers import ToyTask


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_duration_and_progress_fields():
    assert [summaries.format_duration(s) for s in (0, 4.6, 59.4, 60, 192, 3599, 3600, 7500, 86400 + 3 * 3600)] == [
        "0s", "5s", "59s", "1m00s", "3m12s", "59m59s", "1h00m", "2h05m", "1d03h"]
    assert summaries.progress_fields(120, 600, 192.0) == {"progress": "120/600 (20%)", "eta": "3m12s"}
    assert summaries.progress_fields(599, 600, None) == {"progress": "599/600 (99%)"}  # floor: 100% only at the end
    assert summaries.progress_fields(600, 600, 0.0) == {"progress": "600/600 (100%)", "eta": "0s"}


def test_train_line_keeps_its_prefix_for_parsers():
    values = dict(summaries.progress_fields(120, 600, 192.0), loss=0.4123, **{"steps/sec": 3.14159})
    line = summaries.format_line("train", 120, values)
    assert line == "train | step: 120 | progress: 120/600 (20%) | eta: 3m12s | loss: 0.4123 | steps/sec: 3.142"
    # What tests/launch_jobs.py and others parse.
    assert line.startswith("train | step: 120 |") and line.split()[3] == "120"


def test_recent_rate_is_over_the_last_loops_by_the_wall_clock():
    clock = FakeClock()
    rate = summaries.RecentRate(window=2, clock=clock)
    clock.now += 10
    assert rate.mark(10) is None  # the first loop: mostly tracing, no ETA from it
    clock.now += 2
    assert rate.mark(20) == pytest.approx(5.0)  # 10 steps in 2 s
    clock.now += 3  # an evaluation happened in between: the wall clock counts it
    assert rate.mark(30) == pytest.approx(20 / 5)
    clock.now += 2
    assert rate.mark(40) == pytest.approx(20 / 5)  # window 2: the last two loops only
    clock.now += 2
    assert rate.mark(50) == pytest.approx(20 / 4)


def test_batch_progress_prints_at_most_every_ten_seconds(capsys):
    clock = FakeClock()
    progress = summaries.BatchProgress("eval", 100, clock=clock)
    printed = []
    for done in range(1, 101):
        clock.now += 0.5  # 2 batches/s: 50 s in all
        line = progress.update(done)
        if line:
            printed.append(line)
    assert printed == ["eval | batch: 20/100 (20%) | eta: 40s", "eval | batch: 40/100 (40%) | eta: 30s",
                       "eval | batch: 60/100 (60%) | eta: 20s", "eval | batch: 80/100 (80%) | eta: 10s",
                       "eval | batch: 100/100 (100%) | eta: 0s"]
    assert capsys.readouterr().out.splitlines() == printed
    quick = summaries.BatchProgress("eval", None, clock=clock)
    assert [quick.update(i) for i in range(1, 50)] == [None] * 49  # a short pass says nothing
    clock.now += 11
    assert quick.update(50) == "eval | batch: 50"


def test_hparams_profile_and_console_progress_of_a_run(tmp_path, capsys):
    """12 steps in loops of 5, a trace of steps 3-7: loops end at 2 and 7 so that the trace holds exactly those."""
    model_dir = str(tmp_path / "run")
    config = TrainerConfig(model_dir=model_dir, train_steps=12, global_batch_size=8, steps_per_loop=5,
                           eval_split="validation", eval_every_steps=0, profile_steps=(3, 7))
    runtime = RuntimeConfig(precision="float32")
    trainer = Trainer(ToyTask(), config, OptimizerConfig(learning_rate=1e-2), runtime,
                      strategy=make_strategy(runtime), hparams={"task": "toy", "max_seq_length": 16, "head": None})
    final_eval = trainer.train()
    assert [h["step"] for h in trainer.train_history] == [2, 7, 12]
    out = capsys.readouterr().out
    train_lines = [line for line in out.splitlines() if line.startswith("train | step:")]
    assert [line.split(" | ")[2] for line in train_lines] == [
        "progress: 2/12 (16%)", "progress: 7/12 (58%)", "progress: 12/12 (100%)"]
    assert [" | eta: " in line for line in train_lines] == [False, True, True]  # none from the first loop
    assert f"profiled steps 3-7 into {os.path.join(model_dir, 'train', 'plugins', 'profile')}" in out

    # The trace, where TensorBoard's profile plugin looks for it: <run>/plugins/profile/<session>/*.xplane.pb.
    sessions = plugin_asset_util.ListAssets(os.path.join(model_dir, "train"), "profile")
    assert len(sessions) == 1, sessions
    traced = os.listdir(os.path.join(model_dir, "train", "plugins", "profile", sessions[0].rstrip("/")))
    assert any(name.endswith(".xplane.pb") for name in traced), traced

    # The hparams session is model_dir itself; its subfolders' scalars are the metrics (eval/accuracy, ...).
    root = event_accumulator.EventAccumulator(model_dir)
    root.Reload()
    content = root.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    assert list(content) == [hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    values = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    assert values["task"] == "toy" and values["max_seq_length"] == 16 and values["head"] == "None"
    assert values["learning_rate"] == pytest.approx(1e-2) and values["train_steps"] == 12
    assert values["global_batch_size"] == 8 and values["precision"] == "float32"
    assert values["profile_steps"] == "(3, 7)" and values["model_dir"] == model_dir
    evaluation = event_accumulator.EventAccumulator(os.path.join(model_dir, "eval"))
    evaluation.Reload()
    assert {"accuracy", "loss", "host_accuracy"} <= set(evaluation.Tags()["tensors"])
    assert [e.step for e in evaluation.Tensors("accuracy")] == [12]

    # What the HParams dashboard shows for a --logdir holding the run: one session, model_dir, with the final
    # metrics of its train/ and eval/ folders (the plugin's own handlers over TensorBoard's data provider).
    session = _hparams_dashboard(str(tmp_path))
    assert session["sessions"] == ["run"] and session["hparams"]["task"] == "toy"
    final = trainer.train_history[-1]
    assert session["metrics"][("eval", "accuracy")] == (pytest.approx(final_eval["accuracy"]), 12)
    assert session["metrics"][("train", "loss")] == (pytest.approx(final["loss"]), 12)


def _hparams_dashboard(logdir: str) -> dict:
    """The HParams plugin's experiment and (single) session group for `logdir`: hparams, sessions, and each metric's
    (value, step) as the dashboard's table shows it."""
    from tensorboard import context  # noqa: PLC0415
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer  # noqa: PLC0415
    from tensorboard.plugins import base_plugin  # noqa: PLC0415
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups  # noqa: PLC0415
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    backend = backend_context.Context(base_plugin.TBContext(logdir=logdir, multiplexer=multiplexer,
                                                            data_provider=provider))
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=10, aggregation_type=api_pb2.AGGREGATION_AVG,
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_RUNNING])
    groups = list_session_groups.Handler(context.RequestContext(), backend, "", request).run().session_groups
    assert len(groups) == 1, groups
    group = groups[0]
    return {"sessions": [s.name for s in group.sessions],
            "hparams": {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in group.hparams.items()},
            "metrics": {(m.name.group, m.name.tag): (m.value, m.training_step) for m in group.metric_values}}


def test_profile_steps_are_checked():
    with pytest.raises(ValueError, match="--profile_steps=0,5"):
        TrainerConfig(model_dir="x", train_steps=10, profile_steps=(0, 5))
    with pytest.raises(ValueError, match="--profile_steps=6,5"):
        TrainerConfig(model_dir="x", train_steps=10, profile_steps=(6, 5))


def test_squad_feature_building_reports_progress_on_stderr(monkeypatch, capsys, tmp_path):
    """Every update printed (the interval set to 0 s): tokenization, windowing and the cache write report on
    stderr, keeping stdout for a program's results (launch.predict's JSON lines)."""
    from tasks.encoders import bert  # noqa: PLC0415
    from tasks.squad import cache as squad_cache  # noqa: PLC0415
    from tasks.squad import data as squad_data
    monkeypatch.setattr(squad_data.summaries, "BatchProgress",
                        functools.partial(summaries.BatchProgress, every_secs=0))
    contexts = [f"The city number {i} was founded in {1800 + i} by settlers." for i in range(600)]
    data = squad_data.data_from_pairs([f"When was city {i} founded?" for i in range(600)], contexts)
    tokenizer = squad_data.OffsetTokenizer(os.path.join(bert.minilm_dir(), "vocab.txt"))
    features = squad_data.build_features(data, tokenizer, squad_data.FeatureSettings(max_seq_length=32),
                                         name="squad features of toy.json (train)")
    squad_cache._write_tfrecord(str(tmp_path / "toy.tfrecord"), features.arrays, name="squad features of toy.json")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [line.split(" | ")[1].split(" (")[0] for line in lines if "tokenized" in line] == [
        "contexts tokenized: 512/600", "contexts tokenized: 600/600",
        "questions tokenized: 512/600", "questions tokenized: 600/600"]
    windowed = [line for line in lines if "questions windowed" in line]
    assert len(windowed) == 600 and windowed[-1].startswith(
        "squad features of toy.json (train) | questions windowed: 600/600 (100%) | eta: 0s")
    cached = [line for line in lines if "windows cached" in line]
    assert cached[-1].startswith(f"squad features of toy.json | windows cached: {features.num_features}/"
                                 f"{features.num_features} (100%)")


def _seconds(text: str) -> float:
    """`9.1s`, `3m10s`, `1h05m` as seconds (engine/timing.format_seconds' output)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", text)
    assert match and text, text
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return 3600 * hours + 60 * minutes + seconds


def test_the_time_line_splits_a_run_into_parts_that_add_up(tmp_path, capsys):
    """What launch.train prints last: start-up, data, compile, train and eval, each >= 0, summing to the total."""
    runtime = RuntimeConfig(precision="float32")
    strategy = make_strategy(runtime)
    strategy_built = time.monotonic()
    task = ToyTask()  # its data is made here, between the strategy and the Trainer, as launch.train prepares a Task
    # Loops end at 2, 3, 5, 6 (compile time from the first two); evaluations at 3 and 6 (the first one traces).
    config = TrainerConfig(model_dir=str(tmp_path), train_steps=6, global_batch_size=8, steps_per_loop=2,
                           eval_split="validation", eval_every_steps=3, eval_batch_size=8)
    trainer = Trainer(task, config, OptimizerConfig(learning_rate=1e-2), runtime, strategy=strategy)
    trainer.train()
    capsys.readouterr()
    parts = trainer.print_time_split(strategy_built=strategy_built)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time | ")]
    assert len(lines) == 1, lines
    fields = dict(field.split(": ") for field in lines[0].split(" | ")[1:])
    assert list(fields) == ["total", "start-up", "data", "compile", "train", "eval"]
    assert list(parts) == list(fields)
    for name, text in fields.items():
        assert _seconds(text) == pytest.approx(parts[name], abs=0.051 if parts[name] < 59.95 else 0.51), name
    assert all(seconds >= 0 for seconds in parts.values()), parts
    assert parts["compile"] > 0 and parts["data"] > 0 and parts["eval"] > 0, parts  # each of them measured
    # Only what follows the last loop is in no part: a few summaries flushed, this test's own lines.
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], abs=0.5), parts
