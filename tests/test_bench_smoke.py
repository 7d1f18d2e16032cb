"""Smoke runs of bench/engine_vs_fit.py and bench/vs_pytorch.py (engine side): a 2-layer hidden-64 encoder, a few steps.

Benchmarks are not tests: nothing here looks at speed, only that every configuration trains and yields
finite positive throughputs, and that the analytical FLOP count is the formula it claims to be.
"""
import math
import os
import subprocess
import sys

from conftest import DATA_DIR, REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import engine_vs_fit  # noqa: E402


def test_flops_per_example_is_three_forward_passes():
    setup = engine_vs_fit.make_setup(quick=False)
    h, i, s, layers = 384, 1536, 128, 6  # MiniLM's shape at seq 128
    forward = layers * s * (2 * (4 * h * h + 2 * h * i) + 4 * s * h)
    assert engine_vs_fit.train_flops_per_example(setup) == 3 * forward
    assert 8e9 < 3 * forward < 9e9  # 8.6 GFLOP per training example


def test_quick_run_gives_finite_positive_throughputs(tmp_path):
    setup = engine_vs_fit.make_setup(quick=True, num_examples=64)
    output = tmp_path / "results.md"
    result = engine_vs_fit.run_benchmark(
        setup, DATA_DIR, precisions=["float32"], steps_per_execution=[2], jits=[False], steps=2, rounds=1,
        engine_fusion=["fused", "stock"], fit_fusion=["stock", "fused"], output=str(output))
    rows = result["rows"]
    assert [r["config"] for r in rows] == ["fit spe=2", "fit spe=2 fused", "engine", "engine unfused"]
    for row in rows:
        for key in ("wall", "cpu", "mfu", "mfu_cpu"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["config"], key, row[key])
    assert all(math.isfinite(p) and p > 0 for pair in result["peaks"].values() for p in pair)
    assert result["flops_per_example"] == engine_vs_fit.train_flops_per_example(setup)
    assert any(line.startswith("float32: like-for-like engine") and "/ fit spe=2 =" in line for line in result["lines"])
    assert any("engine (fused) / engine unfused" in line for line in result["lines"])
    assert any("fit spe=2 fused / fit spe=2" in line for line in result["lines"])
    assert "| float32 | engine |" in output.read_text()


# bench/vs_pytorch.py (`make bench`) in a subprocess: its flags overlap launch.train's, and it must run as the CLI.
# torch is hidden (sys.modules["torch"] = None makes `import torch` fail), as on an install without the bench
# extra: the engine side runs alone and the bench says in one line that the PyTorch rows are skipped.
VS_PYTORCH_WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None
sys.argv = ["bench/vs_pytorch.py"] + sys.argv[1:]
runpy.run_path("bench/vs_pytorch.py", run_name="__main__")
"""


def test_vs_pytorch_engine_side_prints_its_ratio_lines(tmp_path):
    output = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "-c", VS_PYTORCH_WITHOUT_TORCH, "--quick", "--rounds=1", "--steps=1", "--num_examples=32",
         "--precisions=float32", "--grad_accum_steps=2", "--eval_examples=8", "--serving_batch_size=4",
         "--latency_calls=2", f"--data_dir={DATA_DIR}", f"--output={output}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
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
                     "| serving batch 4 | SavedModel batch 4 |", "| serving batch 1 | SavedModel batch 1 |"):
        assert expected in text, (expected, text)
    assert "pytorch" not in text.split("- peer:")[1].split("\n", 1)[1]  # no PyTorch rows without the extra


def test_engine_tasks_and_launchers_never_import_torch():
    code = ("import sys\nimport engine.trainer, tasks.classification.task, tasks.squad.task, tasks.ner.task, tasks.serving, "
            "tasks.encoders.hub, tasks.squad.serving, tasks.ner.serving, launch.train\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
