"""Issue 14, time to accuracy: `make demo`'s recipe run by the engine and by PyTorch + HF, back to back.

  python bench/time_to_accuracy.py --data_dir=../shared/data             # `make bench-tta`: one round, seed 0
  python bench/time_to_accuracy.py --rounds=2    # ours, peer, then peer, ours: the order alternates by round
  python bench/time_to_accuracy.py --seeds=0,1,2  # one round per seed (both sides get --seed), accuracy compared
                                                  # on the mean over the seeds

Each side is a fresh process timed from outside, start to exit, so its wall time is the whole time to its
dev accuracy (start-up, data, training, both evaluations):
  ours:  python -m launch.train --flagfile=configs/sst2_demo.flags --data_dir=D --model_dir=<scratch>
         (accuracy from the run's eval_results.json)
  peer:  python bench/pytorch_sst2_demo.py --data_dir=D --output_json=<scratch>  (the same recipe in PyTorch)
The target: the same dev accuracy (within 0.5 points) and our wall time <= 0.8x the peer's. One SST-2 run's
accuracy moves by about a point with its seed (dropout masks, data order, the head's initialisation; the two
sides draw them from different generators), so with several seeds the accuracies compared are each side's mean
over the same seeds, with the gap's standard error (one run's sd is about 0.5 points: three seeds leave an error of
about 0.4, fifteen 0.18); with one seed, that seed's. The load average before each run is printed: on a machine
shared with other jobs, the rounds say more than any one of them.
The peer needs the bench extra (`pip install -e '.[bench]'`); without it this says so and stops.
Nothing is written into the repository; --work_dir holds the runs (a new temporary folder by default).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from engine.host import cpu_model_name  # noqa: E402  (reads /proc; imports no TensorFlow)

PEER_SCRIPT = os.path.join("bench", "pytorch_sst2_demo.py")
NO_PEER = ("PyTorch side: NOT RUN, the bench extra is not installed ({missing} in {python}). "
           "Install it with `{python} -m pip install torch==2.13.0` (the CPU wheel), then "
           "`{python} -m pip install -e '.[bench]'`, and run `make bench-tta` again.")


def missing_peer_modules() -> list[str]:
    """The bench extra's modules that do not import here (found without importing them: seconds saved)."""
    def importable(name: str) -> bool:
        if name in sys.modules:  # None there means "hidden", as tests/test_bench_smoke.py hides torch
            return sys.modules[name] is not None
        return importlib.util.find_spec(name) is not None
    return [name for name in ("torch", "transformers") if not importable(name)]


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg", encoding="utf-8").read().split()[:3])
    except OSError:
        return "unknown"


def round_folder(work_dir: str, index: int) -> str:
    """Where round `index` (from 0) keeps its runs."""
    return os.path.join(work_dir, f"round{index + 1}")


def run(name: str, command: list[str], log_path: str) -> float:
    """Runs `command` from the repository root with its output in `log_path`; returns its wall seconds."""
    print(f"{name}: load average {load_average()} | {shlex.join(command)}", flush=True)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{name} failed (exit {code}) after {wall:.0f}s; end of {log_path}:\n{tail}")
    return wall


def summary_lines(log_path: str) -> list[str]:
    """The lines of a run's log worth repeating: its final metrics, time split and throughput."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip() for line in f if line.startswith(("final ", "time |", "examples/s"))]


def run_ours(args, folder: str, seed: int) -> dict:
    model_dir = os.path.join(folder, "ours")
    command = [sys.executable, "-m", "launch.train", f"--flagfile={args.flagfile}", f"--data_dir={args.data_dir}",
               f"--model_dir={model_dir}", f"--seed={seed}"] + shlex.split(args.ours_flags)
    log = os.path.join(folder, "ours.log")
    wall = run("ours", command, log)
    with open(os.path.join(model_dir, "eval_results.json"), encoding="utf-8") as f:
        accuracy = json.load(f)["accuracy"]
    return {"accuracy": accuracy, "wall": wall, "lines": summary_lines(log)}


def run_peer(args, folder: str, seed: int) -> dict:
    output = os.path.join(folder, "peer.json")
    command = [sys.executable, PEER_SCRIPT, f"--data_dir={args.data_dir}", f"--output_json={output}",
               f"--seed={seed}"] + shlex.split(args.peer_flags)
    log = os.path.join(folder, "peer.log")
    wall = run("peer", command, log)
    with open(output, encoding="utf-8") as f:
        result = json.load(f)
    return {"accuracy": result["accuracy"], "wall": wall, "lines": summary_lines(log), "time": result["time"]}


def accuracy_by_seed(rounds: list[tuple[int, float, float]]) -> tuple[dict, float, float]:
    """rounds: (seed, ours' accuracy, the peer's) -> ({seed: (ours, peer)} averaged over that seed's rounds, ours'
    mean over the seeds, the peer's). Each seed counts once however many rounds ran it."""
    seeds = sorted({seed for seed, _, _ in rounds})
    by_seed = {seed: tuple(statistics.fmean(r[side] for r in rounds if r[0] == seed) for side in (1, 2))
               for seed in seeds}
    return (by_seed, statistics.fmean(o for o, _ in by_seed.values()),
            statistics.fmean(p for _, p in by_seed.values()))


def gap_standard_error(by_seed: dict) -> float | None:
    """The standard error of (ours' mean - the peer's) over the seeds of `by_seed` ({seed: (ours, peer)}), or None
    under two seeds. Unpaired: the two sides draw data order, head and dropout from different generators, so one
    seed's two runs are independent draws and only each side's spread over its seeds counts."""
    if len(by_seed) < 2:
        return None
    ours, peer = zip(*by_seed.values())
    return math.sqrt((statistics.variance(ours) + statistics.variance(peer)) / len(by_seed))


def accuracy_line(rounds: list[tuple[int, float, float]]) -> tuple[str, float]:
    """The summary line of the accuracies of `rounds` ((seed, ours, peer) as fractions), and the gap in points:
    over several seeds the gap of the means with its standard error and the per-seed gaps; else the one seed's."""
    by_seed, ours_mean, peer_mean = accuracy_by_seed(rounds)
    gap = 100 * (ours_mean - peer_mean)
    error = gap_standard_error(by_seed)
    if error is None:  # one seed: no error to give
        gap_text, which = f"{gap:+.2f}", f"seed {next(iter(by_seed))}"
    else:  # One run's accuracy moves by about a point with its seed: without the error a gap near 0.5 says little.
        per_seed = ", ".join(f"{s}: {100 * (o - p):+.2f}" for s, (o, p) in by_seed.items())
        gap_text = f"{gap:+.2f} +- {100 * error:.2f} (standard error over {len(by_seed)} seeds)"
        which = f"means over seeds {','.join(map(str, by_seed))}; per seed {per_seed}"
    return (f"accuracy ours - pytorch: {gap_text} points (ours {100 * ours_mean:.2f}%, pytorch {100 * peer_mean:.2f}%, "
            f"{which})"), gap


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"want distinct integers separated by commas, e.g. 0,1,2; got {text!r}")
    return seeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.environ.get("DATA_DIR") or os.path.join(
        os.path.dirname(REPO_ROOT), "shared", "data"))
    parser.add_argument("--rounds", type=int, default=None, help="Rounds; the order alternates: ours first in odd "
                        "ones (default: one per seed).")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="Seeds, comma-separated; round r runs seed "
                        "r mod their number, on both sides. Accuracy is compared on each side's mean over them.")
    parser.add_argument("--flagfile", default="configs/sst2_demo.flags", help="Our recipe (the peer's defaults match "
                        "configs/sst2_demo.flags; change both together).")
    parser.add_argument("--ours_flags", default="", help="Extra launch.train flags (e.g. for a smoke run).")
    parser.add_argument("--peer_flags", default="", help="Extra bench/pytorch_sst2_demo.py flags.")
    parser.add_argument("--work_dir", default=None, help="Scratch folder for the runs, new or empty (default: a new "
                        "temporary one).")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = len(args.seeds)
    if args.rounds < len(args.seeds):
        parser.error(f"--rounds={args.rounds} is fewer than the {len(args.seeds)} --seeds: some would not run")
    if args.work_dir:
        # A round folder with a run in it would make launch.train resume its last checkpoint and train nothing,
        # and the bench would report that as our time to accuracy.
        folders = [round_folder(args.work_dir, r) for r in range(args.rounds)]
        used = [os.path.basename(f) for f in folders if os.path.isdir(f) and os.listdir(f)]
        if used:
            holds = "hold runs" if len(used) > 1 else "holds a run"
            print(f"--work_dir={args.work_dir}: {', '.join(used)} already {holds} (launch.train would resume it "
                  "and time nothing); give a new or empty --work_dir", file=sys.stderr)
            return 2

    missing = missing_peer_modules()
    if missing:
        what = " and ".join(missing) + (" does not import" if len(missing) == 1 else " do not import")
        print(NO_PEER.format(missing=what, python=sys.executable), flush=True)
        return 1
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="tta_")
    print(f"time to accuracy | {cpu_model_name()}, {os.cpu_count()} CPUs | data {args.data_dir} | runs in {work_dir}",
          flush=True)
    rounds = []
    for r in range(args.rounds):
        folder = round_folder(work_dir, r)
        os.makedirs(folder, exist_ok=True)
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        seed = args.seeds[r % len(args.seeds)]
        results = {}
        for side in order:
            results[side] = (run_ours if side == "ours" else run_peer)(args, folder, seed)
            for line in results[side]["lines"]:
                print(f"  {side}: {line}", flush=True)
        ours, peer = results["ours"], results["peer"]
        ratio = ours["wall"] / peer["wall"]
        rounds.append((seed, ours, peer, ratio))
        print(f"round {r + 1}, seed {seed} | ours: accuracy {100 * ours['accuracy']:.2f}%, {ours['wall']:.0f}s | "
              f"pytorch: accuracy {100 * peer['accuracy']:.2f}%, {peer['wall']:.0f}s | "
              f"ours / pytorch wall = {ratio:.2f}", flush=True)
    ratios = [r[3] for r in rounds]
    ratio = statistics.median(ratios)
    print(f"ours / pytorch wall time to accuracy: median {ratio:.2f} over {len(ratios)} round(s) "
          f"({', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
    line, gap = accuracy_line([(s, o["accuracy"], p["accuracy"]) for s, o, p, _ in rounds])
    print(line, flush=True)
    same_accuracy = abs(gap) <= 0.5
    print(f"target | same accuracy (within 0.5 points): {'yes' if same_accuracy else 'NO'} | "
          f"ours <= 0.8x pytorch's wall: {'yes' if ratio <= 0.8 else 'NO'} ({ratio:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
