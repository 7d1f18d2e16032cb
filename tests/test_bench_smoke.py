"""Smoke run of bench/engine_vs_fit.py's code path: a 2-layer hidden-64 encoder, a few steps.

Benchmarks are not tests: nothing here looks at speed, only that every configuration trains and yields
finite positive throughputs, and that the analytical FLOP count is the formula it claims to be.
"""
import math
import os
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
