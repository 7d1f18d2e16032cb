"""Smoke runs of bench/engine_vs_fit.py and bench/vs_pytorch.py (engine side): a 2-layer hidden-64 encoder, a few
steps; of bench/cut_inference.py, bench/matmul_kernels.py and bench/native_switch_ab.py (TensorFlow side); of
bench/pytorch_sst2_demo.py (the PyTorch peer of `make bench-tta`) and bench/lockstep.py (skipped without the
bench extra).

Benchmarks are not tests: nothing here looks at speed, only that every configuration trains and yields
finite positive throughputs, and that the analytical FLOP count is the formula it claims to be.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA_DIR, REPO_ROOT
from subprocess_runs import failure_text, run_once_more_after_a_crash

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import engine_vs_fit  # noqa: E402
import engine  # noqa: E402
from engine import host  # noqa: E402


def test_flops_per_example_is_three_forward_passes():
    setup = engine_vs_fit.make_setup(quick=False, last_layer_cls_only=False)
    h, i, s, layers = 384, 1536, 128, 6  # MiniLM's shape at seq 128
    forward = layers * s * (2 * (4 * h * h + 2 * h * i) + 4 * s * h)
    assert engine_vs_fit.train_flops_per_example(setup) == 3 * forward
    assert 8e9 < 3 * forward < 9e9  # 8.6 GFLOP per training example
    # The default classifier's last layer computes [CLS] only (engine/first_position.py): its projections, Wk q,
    # Wv and FFN once, and each of the 12 heads scores and mixes every token's 384-wide input.
    cls_only = 5 * s * (2 * (4 * h * h + 2 * h * i) + 4 * s * h) + 2 * (4 * h * h + 2 * h * i) + 4 * s * h * 12
    assert engine_vs_fit.train_flops_per_example(engine_vs_fit.make_setup(quick=False)) == pytest.approx(3 * cls_only)


# The quick benchmark in a subprocess of its own, rerun once after a crash: in a fresh clone's `make test` it
# once died by SIGSEGV inside the stock `model.fit` (2026-12-06), the TensorFlow heap corruption that
# run_once_more_after_a_crash describes, and in-process that ended the whole suite.
QUICK_ENGINE_VS_FIT = """
import json, sys
sys.path.insert(0, "bench")
import engine_vs_fit
setup = engine_vs_fit.make_setup(quick=True, num_examples=64)
result = engine_vs_fit.run_benchmark(
    setup, sys.argv[1], precisions=["float32"], steps_per_execution=[2], jits=[False], steps=2, rounds=1,
    engine_fusion=["fused", "stock"], fit_fusion=["stock", "fused"], output=sys.argv[2])
result["rows"] = [{k: row[k] for k in ("config", "wall", "cpu", "mfu", "mfu_cpu")} for row in result["rows"]]
result["expected_flops"] = engine_vs_fit.train_flops_per_example(setup)
print("RESULT " + json.dumps({k: result[k] for k in ("rows", "lines", "peaks", "flops_per_example", "expected_flops")},
                             default=float))
"""


def test_quick_run_gives_finite_positive_throughputs(tmp_path):
    output = tmp_path / "results.md"
    run = run_once_more_after_a_crash([sys.executable, "-c", QUICK_ENGINE_VS_FIT, DATA_DIR, str(output)],
                                      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, failure_text(run.stderr)
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rows = result["rows"]
    assert [r["config"] for r in rows] == ["fit spe=2", "fit spe=2 fused", "engine", "engine unfused"]
    for row in rows:
        for key in ("wall", "cpu", "mfu", "mfu_cpu"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["config"], key, row[key])
    assert all(math.isfinite(p) and p > 0 for pair in result["peaks"].values() for p in pair)
    assert result["flops_per_example"] == result["expected_flops"]
    assert any(line.startswith("float32: like-for-like engine") and "/ fit spe=2 =" in line for line in result["lines"])
    assert any("engine (fused) / engine unfused" in line for line in result["lines"])
    assert any("fit spe=2 fused / fit spe=2" in line for line in result["lines"])
    assert "| float32 | engine |" in output.read_text()


# bench/vs_pytorch.py (`make bench`) in a subprocess: its flags overlap launch.train's, and it must run as the CLI.
# torch is hidden (sys.modules["torch"] = None makes `import torch` fail), as on an install without the bench
# extra: the engine side runs alone and the bench says in one line that the PyTorch rows are skipped.
def test_a_crashed_bench_subprocess_runs_once_more_with_a_warning_and_a_failure_does_not(tmp_path):
    marker = tmp_path / "crashed_once"
    crash_first_time = (f"import os, sys, pathlib\nm = pathlib.Path({str(marker)!r})\n"
                        "if not m.exists():\n    m.touch(); sys.stderr.write('F check failed\\n'); "
                        "sys.stderr.write('Fatal Python error: Aborted\\n'); sys.stderr.flush(); os.abort()\n")
    with pytest.warns(UserWarning, match="killed by signal 6.*F check failed"):
        result = run_once_more_after_a_crash([sys.executable, "-c", crash_first_time], capture_output=True, text=True)
    assert result.returncode == 0
    runs = tmp_path / "runs"
    fail = f"import pathlib\np = pathlib.Path({str(runs)!r})\np.write_text(p.read_text() + 'x' if p.exists() else 'x')\nraise SystemExit(3)"
    assert run_once_more_after_a_crash([sys.executable, "-c", fail], capture_output=True, text=True).returncode == 3
    assert runs.read_text() == "x"  # an ordinary failure is not rerun


VS_PYTORCH_WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None
sys.argv = ["bench/vs_pytorch.py"] + sys.argv[1:]
runpy.run_path("bench/vs_pytorch.py", run_name="__main__")
"""


def test_vs_pytorch_engine_side_prints_its_ratio_lines(tmp_path):
    output = tmp_path / "bench.md"
    result = run_once_more_after_a_crash(
        [sys.executable, "-c", VS_PYTORCH_WITHOUT_TORCH, "--quick", "--rounds=1", "--steps=1", "--num_examples=32",
         "--precisions=float32", "--grad_accum_steps=2", "--eval_examples=8", "--serving_batch_size=4",
         "--latency_calls=2", f"--data_dir={DATA_DIR}", f"--output={output}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, failure_text(result.stderr)
    lines = result.stdout.splitlines()
    skipped = [line for line in lines if line.startswith("peer: PyTorch peer: skipped")]
    assert len(skipped) == 1 and "pip install -e '.[bench]'" in skipped[0], lines[:20]
    text = output.read_text()
    for expected in ("- ratio | float32: engine / fit spe=1 = ",
                     "- ratio | float32: engine / best peer (fit spe=1) = ",
                     "- ratio | float32: engine accum 2x4 / engine (same global batch) = ",
                     "- target | training float32: engine / best peer >= 1.15: ",
                     "- target | gradient accumulation: engine accum 2x4 / engine >= 0.95: ",
                     "| evaluate | Trainer.evaluate |", "| predict | launch.predict path (task.predict) |",
                     "| serving batch 4 | SavedModel batch 4 |", "| serving batch 1 | SavedModel batch 1 |",
                     "| serving batch 4 bf16 | SavedModel bf16 kernels batch 4 |",
                     "| serving batch 1 bf16 | SavedModel bf16 kernels batch 1 |",
                     "- SavedModel with bf16 kernels vs float32: largest probability difference "):
        assert expected in text, (expected, text)
    assert "pytorch" not in text.split("- peer:")[1].split("\n", 1)[1]  # no PyTorch rows without the extra
    # The SavedModel answers from its own process (savedmodel_process) what launch.predict's path answers here.
    served = re.search(r"largest probability difference SavedModel vs predict ([0-9.e+-]+)", text)
    assert served and float(served.group(1)) < 1e-5, text
    # Its server's thread pools as launch.export advises for this CPU (the same environment as this process's).
    advised = host.serving_intra_op_threads()
    advised = "TensorFlow's default" if advised is None else advised
    assert f"- SavedModel servers' intra-op threads: {advised} (as launch.export advises for this host)" in text, text


def test_vs_pytorch_times_bf16_by_default_only_on_cpus_with_native_bf16(monkeypatch):
    from absl import flags
    from absl.testing import flagsaver
    from engine import precision as precision_lib
    import vs_pytorch
    both = ["float32", "mixed_bfloat16"]
    for native, argv, expected in ((True, [], (both, True)), (False, [], (["float32"], False)),
                                   (False, ["--quick"], (both, True)),  # the smoke run above, on any CPU
                                   (False, ["--precisions=float32,mixed_bfloat16", "--bf16_serving"], (both, True))):
        monkeypatch.setattr(precision_lib, "cpu_has_native_bf16", lambda native=native: native)
        with flagsaver.flagsaver():
            flags.FLAGS.unparse_flags()
            flags.FLAGS(["vs_pytorch.py"] + argv)
            assert vs_pytorch._precisions_for_this_cpu() == expected, (native, argv)


def test_matmul_kernels_bench_times_both_tensorflow_variants_per_shape_and_dtype():
    result = subprocess.run([sys.executable, os.path.join("bench", "matmul_kernels.py"), "--quick", "--nopytorch"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, failure_text(result.stderr)
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| float32 |")
            or line.startswith("| bfloat16 |")]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (f"| {dtype}", shape, variant) for dtype in ("float32", "bfloat16") for shape in ("64x32x32", "64x32x128")
        for variant in ("tf MatMul+BiasAdd (fused)", "tf MatMul")), result.stdout
    assert all(math.isfinite(float(r[3])) and float(r[3]) > 0 for r in rows), result.stdout


def test_engine_tasks_and_launchers_never_import_torch():
    code = ("import sys\nimport engine.trainer, tasks.classification.task, tasks.squad.task, tasks.ner.task, tasks.serving, "
            "tasks.encoders.hub, tasks.squad.serving, tasks.ner.serving, launch.train\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure_text(result.stderr)
    assert result.stdout.strip().splitlines()[-1] == "[]"


# bench/pytorch_sst2_demo.py and bench/time_to_accuracy.py (`make bench-tta`, issue 14: time to accuracy).
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import pytorch_sst2_demo  # noqa: E402  (imports neither torch nor TensorFlow at module level)


def test_peer_learning_rate_schedule_is_the_engines():
    from engine.config import OptimizerConfig  # noqa: PLC0415
    from engine.optimization import make_learning_rate  # noqa: PLC0415
    schedule = make_learning_rate(OptimizerConfig(learning_rate=1e-4, warmup_steps=100), 1000)
    for update in (0, 1, 50, 99, 100, 101, 500, 999, 1000):
        peer = 1e-4 * pytorch_sst2_demo.learning_rate_factor(update, warmup_steps=100, train_steps=1000)
        assert math.isclose(peer, float(schedule(update)), rel_tol=1e-5, abs_tol=1e-10), update  # TF: float32


def test_peer_length_grouping_sorts_windows_and_cuts_batches_to_their_longest():
    import numpy as np  # noqa: PLC0415
    lengths = np.random.default_rng(1).integers(3, 65, size=1000)
    batches = pytorch_sst2_demo.length_grouped_batches(
        lengths, batch_size=8, window_batches=4, multiple=16, full_length=64, rng=np.random.default_rng(0))
    seen = []
    for _ in range(3):  # three windows of 4 batches
        window = [next(batches) for _ in range(4)]
        for indices, width in window:
            assert len(indices) == 8 and width % 16 == 0 and lengths[indices].max() <= width <= 64
            assert width - 16 < lengths[indices].max()  # cut to the longest, rounded up to 16
        ranges = sorted((lengths[i].min(), lengths[i].max()) for i, _ in window)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # a window is sorted, then split
        seen += [int(i) for indices, _ in window for i in indices]
    assert len(set(seen)) == len(seen) == 96  # the first epoch's shuffle: no example twice


@pytest.mark.parametrize("task", ["conll_ner", "squad"])
def test_cut_inference_bench_finds_cut_and_padded_runs_equal(task, tmp_path):
    """bench/cut_inference.py on a tiny encoder: it runs, and its own check (cut vs padded evaluation scores and
    predictions) passes; it exits non-zero when they disagree."""
    result = subprocess.run(
        [sys.executable, "bench/cut_inference.py", f"--task={task}", f"--data_dir={DATA_DIR}", "--quick",
         "--rounds=1", "--eval_examples=24", "--predict_examples=8", f"--cache_dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, failure_text(result.stderr)
    lines = result.stdout.splitlines()
    assert any(line.endswith(": equal") for line in lines), result.stdout
    assert any("cut and padded give the same predictions" in line for line in lines), result.stdout
    assert any(line.startswith("evaluate: cut ") for line in lines) and any(line.startswith("predict: cut ")
                                                                           for line in lines)


def _torch_installed() -> bool:
    import importlib.util  # noqa: PLC0415
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


@pytest.mark.skipif(not _torch_installed(), reason="the bench extra (torch, transformers) is not installed")
def test_quick_peer_holds_the_random_tiny_models_weights():
    """`--quick` compares ours with a HF model of the tiny encoder's shape: it must be the same function, or the
    bench's "largest probability difference ours vs peer" line compares two random models."""
    import torch  # noqa: PLC0415
    import pytorch_peer  # noqa: PLC0415
    setup = engine_vs_fit.make_setup(quick=True, num_examples=8)
    task = engine_vs_fit.make_task(setup, DATA_DIR)
    model = task.build_model()
    peer = pytorch_peer.build_model(pytorch_peer.model_spec(model, encoder_config=setup.encoder)).eval()
    features = {k: v[:8] for k, v in task.features.items()}
    ours = model(features, training=False).numpy()
    with torch.inference_mode():
        theirs = peer(input_ids=torch.from_numpy(features["input_word_ids"]).long(),
                      attention_mask=torch.from_numpy(features["input_mask"]).long(),
                      token_type_ids=torch.from_numpy(features["input_type_ids"]).long()).logits.numpy()
    assert features["input_mask"].sum(1).min() < setup.seq_length, "want padding, so the mask is exercised"
    # A random head gives logits of spread ~1e-3; two different random models differ by about that spread.
    spread, difference = float(ours.std()), float(np.max(np.abs(theirs - ours)))
    assert difference <= 1e-3 * spread, (difference, spread)


@pytest.mark.skipif(not _torch_installed(), reason="the bench extra (torch, transformers) is not installed")
def test_lockstep_engine_and_pytorch_give_the_same_losses_update_for_update():
    """bench/lockstep.py on the real MiniLM, 4 updates in float32, dropout off, the same batches and head: the
    engine's whole training step (fused layers, token layout, C++ kernels, clip, AdamW, schedule) against HF +
    torch's AdamW. With tf_keras' epsilon placement the losses part by more than rounding, so the tolerance
    separates a real difference from float noise."""
    def lockstep(*extra):
        return subprocess.run(
            [sys.executable, "bench/lockstep.py", f"--data_dir={DATA_DIR}", "--updates=4", "--warmup_steps=1",
             "--batch_size=8", "--print_every=1", "--max_loss_difference=1e-5", *extra],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    same = lockstep()
    assert same.returncode == 0, failure_text(same.stderr)
    rows = [line for line in same.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, 2, 3, 4], same.stdout
    assert "largest loss difference" in same.stdout
    keras_epsilon = lockstep("--noepsilon_after_bias_correction")
    assert keras_epsilon.returncode == 1 and "--max_loss_difference" in keras_epsilon.stderr, keras_epsilon.stdout


@pytest.mark.skipif(not _torch_installed(), reason="the bench extra (torch, transformers) is not installed")
def test_pytorch_sst2_demo_trains_and_reports_its_time_split(tmp_path):
    output = tmp_path / "peer.json"
    result = subprocess.run(
        [sys.executable, "bench/pytorch_sst2_demo.py", f"--data_dir={DATA_DIR}", "--train_examples=512",
         "--max_steps=24", "--batch_size=16", "--group_by_length=4", "--warmup_steps=2", "--log_every_steps=8",
         "--eval_every_steps=12", "--eval_examples=64", "--eval_batch_size=32", f"--output_json={output}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, failure_text(result.stderr)
    report = json.loads(output.read_text())
    assert [e["step"] for e in report["evals"]] == [12, 24]
    losses = [h["loss"] for h in report["train_history"]]
    assert [h["step"] for h in report["train_history"]] == [8, 12, 16, 24] and losses[-1] < losses[0], losses
    parts = report["time"]
    assert set(parts) == {"start-up", "data+tokenization", "training", "evaluation", "other", "total"}
    assert math.isclose(sum(v for k, v in parts.items() if k != "total"), parts["total"], abs_tol=1e-6)
    assert all(parts[k] > 0 for k in ("start-up", "training", "evaluation")) and abs(parts["other"]) < 5
    assert 0.0 <= report["accuracy"] <= 1.0 and report["examples_per_sec"] > 0
    lines = result.stdout.splitlines()
    assert f"final validation metrics: accuracy {report['accuracy']:.4f}, f1 {report['f1']:.4f}" in lines
    assert any(line.startswith("time | start-up: ") and "| total: " in line for line in lines)
    assert any(line.startswith("examples/s: ") for line in lines)


TIME_TO_ACCURACY_WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = sys.modules["transformers"] = None  # both hidden: every venv, with the bench extra or not
sys.argv = ["bench/time_to_accuracy.py"] + sys.argv[1:]
runpy.run_path("bench/time_to_accuracy.py", run_name="__main__")
"""


def test_bench_tta_says_when_the_bench_extra_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "-c", TIME_TO_ACCURACY_WITHOUT_TORCH, f"--work_dir={tmp_path}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, (result.stdout, result.stderr[-2000:])
    assert result.stdout.startswith("PyTorch side: NOT RUN, the bench extra is not installed (torch and transformers "
                                    "do not import"), result.stdout
    assert "pip install -e '.[bench]'" in result.stdout and not list(tmp_path.iterdir())  # nothing was run


def test_bench_tta_refuses_a_work_dir_that_already_holds_a_run(tmp_path):
    # A finished run there would be resumed from its last checkpoint and timed as 10 s "to accuracy".
    (tmp_path / "round1" / "ours").mkdir(parents=True)
    (tmp_path / "round1" / "ours.log").write_text("an earlier run\n")
    result = subprocess.run([sys.executable, "-c", TIME_TO_ACCURACY_WITHOUT_TORCH, f"--work_dir={tmp_path}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert result.stderr.strip() == (f"--work_dir={tmp_path}: round1 already holds a run (launch.train would resume "
                                     "it and time nothing); give a new or empty --work_dir")
    assert result.stdout == ""


import time_to_accuracy  # noqa: E402  (standard library only at module level)


def test_bench_tta_compares_accuracy_on_each_sides_mean_over_seeds():
    # Seed 0 ran twice (rounds 1 and 3): it counts once, as its rounds' mean, beside seed 1.
    rounds = [(0, 0.90, 0.88), (1, 0.86, 0.89), (0, 0.88, 0.90)]
    by_seed, ours, peer = time_to_accuracy.accuracy_by_seed(rounds)
    assert list(by_seed) == [0, 1]
    assert by_seed[0] == pytest.approx((0.89, 0.89)) and by_seed[1] == pytest.approx((0.86, 0.89))
    assert ours == pytest.approx((0.89 + 0.86) / 2) and peer == pytest.approx(0.89)
    # By hand: ours' seed means 0.89 and 0.86 have sample variance 2 * 0.015^2 / 1, the peer's 0.89, 0.89 none;
    # the error of the difference of means over 2 seeds is sqrt(0.00045 / 2) = 0.015.
    assert time_to_accuracy.gap_standard_error(by_seed) == pytest.approx(0.015)
    assert time_to_accuracy.gap_standard_error({0: (0.9, 0.8)}) is None
    # The printed summary: the same numbers in points (0.875 - 0.89 = -1.50 +- 1.50), then one seed alone.
    line, gap = time_to_accuracy.accuracy_line(rounds)
    assert gap == pytest.approx(-1.5)
    assert line == ("accuracy ours - pytorch: -1.50 +- 1.50 (standard error over 2 seeds) points (ours 87.50%, "
                    "pytorch 89.00%, means over seeds 0,1; per seed 0: +0.00, 1: -3.00)")
    assert time_to_accuracy.accuracy_line([(4, 0.8813, 0.8842)])[0] == (
        "accuracy ours - pytorch: -0.29 points (ours 88.13%, pytorch 88.42%, seed 4)")


@pytest.mark.parametrize("text", ["", "0,x", "1,1", "0,,2"])
def test_bench_tta_refuses_seeds_that_are_not_distinct_integers(text):
    with pytest.raises(Exception, match="want distinct integers separated by commas"):
        time_to_accuracy.parse_seeds(text)
    assert time_to_accuracy.parse_seeds("2,0,1") == [2, 0, 1]


def test_bench_tta_refuses_fewer_rounds_than_seeds(tmp_path):
    result = subprocess.run([sys.executable, "-c", TIME_TO_ACCURACY_WITHOUT_TORCH, f"--work_dir={tmp_path}",
                             "--seeds=0,1,2", "--rounds=2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert result.stderr.strip().endswith("error: --rounds=2 is fewer than the 3 --seeds: some would not run")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not _torch_installed(), reason="the bench extra (torch, transformers) is not installed")
def test_pytorch_peer_in_a_process_of_its_own_trains_as_the_one_in_process():
    """`make bench` times PyTorch's training in a child process (pytorch_peer.TrainRunnerProcess; in the bench's
    own process PyTorch ran up to a third slower). The child must get the same model, batches and settings: with
    dropout on and the same seed, it computes the same losses as the runner in this process."""
    import torch  # noqa: PLC0415
    import pytorch_peer  # noqa: PLC0415
    setup = engine_vs_fit.make_setup(quick=True, num_examples=16)
    task = engine_vs_fit.make_task(setup, DATA_DIR)
    spec = pytorch_peer.model_spec(task.build_model(), encoder_config=setup.encoder)
    peer = pytorch_peer.build_model(spec)
    assert peer.config.hidden_dropout_prob > 0 and peer.config.attention_probs_dropout_prob > 0
    settings = dict(batch_size=4, precision="float32", compile_model=False, clip_norm=1.0, optimizer_kwargs=dict(
        learning_rate=1e-3, weight_decay=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-6))
    child = pytorch_peer.TrainRunnerProcess(spec, task.features, task.labels, seed=3, **settings)
    try:
        torch.manual_seed(3)
        here = pytorch_peer.TrainRunner(peer, task.features, task.labels, **settings)
        losses = []
        for steps in (1, 2, 1):
            wall, cpu = child.run(steps)
            assert wall > 0 and cpu > 0
            here.run(steps)
            losses.append((child.last_loss, here.last_loss))
        np.testing.assert_allclose(*zip(*losses), rtol=1e-5)
        assert len({round(theirs, 6) for theirs, _ in losses}) == 3, losses  # it trains: the loss moves
    finally:
        assert child.close() == 0


@pytest.mark.skipif(not _torch_installed(), reason="the bench extra (torch, transformers) is not installed")
def test_pytorch_classifier_in_a_process_of_its_own_answers_as_the_one_in_process():
    """`make bench` times the peer's evaluation and batch-1 serving in a child process too: same model, same
    sentences, same probabilities as pytorch_peer.Classifier here; batch 1 gives one latency per sentence."""
    import pytorch_peer  # noqa: PLC0415
    from tasks.encoders import bert  # noqa: PLC0415
    setup = engine_vs_fit.make_setup(quick=True, num_examples=8)
    task = engine_vs_fit.make_task(setup, DATA_DIR)
    spec = pytorch_peer.model_spec(task.build_model(), encoder_config=setup.encoder)
    peer = pytorch_peer.build_model(spec)
    with open(os.path.join(DATA_DIR, "sst2", "dev.tsv"), encoding="utf-8") as f:
        sentences = [line.split("\t")[0] for line in f.read().splitlines()[1:8]]
    child = pytorch_peer.ClassifierProcess(spec, bert.minilm_dir(), sentences, max_length=setup.seq_length,
                                           batch_size=4)
    try:
        for padding, longest_first in (("max_length", False), ("longest", True)):
            here = pytorch_peer.Classifier(peer, bert.minilm_dir(), max_length=setup.seq_length, padding=padding,
                                           longest_first=longest_first).predict(sentences, 4)
            reply = child.predict(padding, longest_first, values=True)
            assert reply["wall"] > 0 and reply["cpu"] > 0
            np.testing.assert_allclose(reply["probabilities"], here, atol=1e-6)
        assert len(child.singles("longest", 3)["latencies"]) == 3
        # bf16 serving: a bf16 copy of the model, the float32 one left as it was.
        float32 = child.predict("longest", False, values=True)["probabilities"]
        bf16 = child.predict("longest", False, precision="bfloat16", values=True)["probabilities"]
        assert 0 < np.abs(np.subtract(bf16, float32)).max() < 0.02
        np.testing.assert_allclose(child.predict("longest", False, values=True)["probabilities"], float32, atol=0)
        assert len(child.singles("longest", 2, precision="bfloat16")["latencies"]) == 2
    finally:
        assert child.close() == 0


PEER_WITHOUT_TORCH_HERE = """
import sys
import numpy as np
sys.path.insert(0, "bench")
import pytorch_peer
from tasks.encoders import bert
have, why = pytorch_peer.available()
assert have, why
head = {"head/kernel": np.full([384, 2], 0.01, np.float32), "head/bias": np.array([0.5, -0.5], np.float32)}
sentences = ["a gripping , funny film .", "dull ."]
child = pytorch_peer.ClassifierProcess({"model_dir": bert.minilm_dir(), "arrays": head}, bert.minilm_dir(),
                                       sentences, max_length=16, batch_size=2)
reply = child.predict("longest", False, values=True)
ids = child.token_ids("max_length")
assert child.close() == 0
print(sorted(name for name in ("torch", "transformers") if name in sys.modules), ids.shape,
      np.asarray(reply["probabilities"]).shape)
"""


@pytest.mark.skipif(not _torch_installed(), reason="the bench extra (torch, transformers) is not installed")
def test_the_bench_process_never_loads_torch_the_peers_process_does():
    """The bench's own process hands the peer plain data (model_spec) and never imports torch or transformers,
    so our timings never share a process with PyTorch's allocator and thread pools. Here the child builds the
    MiniLM peer from its model folder and our head, and answers."""
    result = subprocess.run([sys.executable, "-c", PEER_WITHOUT_TORCH_HERE], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, failure_text(result.stderr)
    assert result.stdout.splitlines()[-1] == "[] (2, 16) (2, 2)", result.stdout


def test_export_ab_times_two_exports_and_checks_they_answer_alike(tmp_path):
    """bench/export_ab.py on a tiny classifier's export against itself: both sides timed per round, ratios printed,
    the same answers; a second, differently initialised export is refused as answering otherwise."""
    import dataclasses  # noqa: PLC0415
    import tf_keras  # noqa: PLC0415
    from launch import export as export_launcher  # noqa: PLC0415
    from tasks.classification.task import ClassificationConfig, ClassificationTask  # noqa: PLC0415
    from tasks.encoders import bert  # noqa: PLC0415

    tiny = dataclasses.replace(bert.BertConfig.tiny(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = ClassificationConfig(data_files={"validation": os.path.join(DATA_DIR, "sst2", "dev.tsv")}, encoder=tiny,
                                  vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"), max_seq_length=32)
    exports = []
    for seed in (0, 1):
        tf_keras.utils.set_random_seed(seed)
        task = ClassificationTask(config)
        exports.append(export_launcher.save_serving_model(task, task.build_model(), str(tmp_path / f"seed{seed}")))

    # As a user starts it: no oneDNN or thread setting of its own (this process's engine import set one).
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", engine.ONEDNN_DEFAULT_MARKER)}

    def run(a, b):
        return subprocess.run([sys.executable, "bench/export_ab.py", a, b, f"--data_dir={DATA_DIR}", "--rounds=2",
                               "--sentences=3", "--batch_sentences=32"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=600, env=env)
    same = run(exports[0], exports[0])
    assert same.returncode == 0, failure_text(same.stderr)
    # Served as a serving host: TensorFlow's oneDNN default, the intra-op threads launch.export advises.
    threads = ("(TensorFlow default)" if host.tensorflow_runs_onednn_by_default()
               else str(max(1, host.usable_cores() // 2)))
    onednn = "1" if host.tensorflow_runs_onednn_by_default() else "0"
    assert (f"serving host: TF_ENABLE_ONEDNN_OPTS={onednn}, TF_NUM_INTRAOP_THREADS={threads}"
            in same.stdout.splitlines()), same.stdout
    assert same.stdout.count("round ") == 2 and "batch-1 p50 speed-up, B over A: median" in same.stdout
    assert "batch-32 throughput, B over A: median" in same.stdout and "largest probability difference: 0" in same.stdout
    other = run(exports[0], exports[1])
    assert other.returncode == 1 and "the two exports answer differently" in other.stderr


def test_batch_1_latency_by_length_takes_each_bucket_median_over_all_rounds():
    import vs_pytorch  # noqa: PLC0415
    word_pieces = [12, 25, 40, 18, 33]
    ours = [[0.010, 0.012, 0.020, 0.011, 0.030], [0.009, 0.014, 0.022, 0.013, 0.026]]  # two rounds, s per call
    theirs = [[0.015, 0.016, 0.021, 0.014, 0.033], [0.013, 0.018, 0.023, 0.016, 0.029]]
    rows = vs_pytorch.latency_by_length(word_pieces, ours, theirs)
    assert [(label, calls) for label, calls, *_ in rows] == [("0-19", 2), ("20-29", 1), ("30+", 2)]
    # Medians over both rounds: ours 0-19 of (10, 11, 9, 13) ms = 10.5, theirs of (15, 14, 13, 16) = 14.5.
    assert rows[0][2:] == pytest.approx((10.5, 14.5, 14.5 / 10.5))
    assert rows[1][2:] == pytest.approx((13.0, 17.0, 17.0 / 13.0))
    assert rows[2][2:] == pytest.approx((24.0, 26.0, 26.0 / 24.0))
    assert vs_pytorch.latency_by_length([5], [[0.001]], [[0.002]])[0][0] == "0-19"


def test_native_switch_ab_times_each_side_in_a_process_of_its_own_and_prints_the_median():
    """bench/native_switch_ab.py on a tiny encoder: both sides run (the switch off and on, alternating first), each
    pair's speed-up and their median are printed; a misspelt switch is refused in one line, not timed."""
    run = subprocess.run(
        [sys.executable, "bench/native_switch_ab.py", "--quick", "--pairs=2", "--predicts=1", "--sentences=8",
         "--precision=mixed_bfloat16", f"--data_dir={DATA_DIR}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, failure_text(run.stderr)
    pairs = [line for line in run.stdout.splitlines() if line.startswith("pair ")]
    assert [line.split("(")[1].split(")")[0] for line in pairs] == ["on first", "off first"]
    median = float(run.stdout.split("median of 2 pairs: ")[1].split()[0])
    assert 0 < median < float("inf")
    misspelt = subprocess.run(
        [sys.executable, "bench/native_switch_ab.py", "--quick", "--pairs=1", "--switch=BERT_ENGINE_NATIVE_ATENTION",
         f"--data_dir={DATA_DIR}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert misspelt.returncode != 0 and "none of our ops' switches" in misspelt.stderr.strip().splitlines()[-1]
