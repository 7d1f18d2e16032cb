"""One of our C++ ops on against off (its BERT_ENGINE_NATIVE_* switch): task.predict, as launch.predict runs it.

  .venv/bin/python bench/native_switch_ab.py --precision=mixed_bfloat16 --data_dir=../shared/data [--pairs=7]
  .venv/bin/python bench/native_switch_ab.py --switch=BERT_ENGINE_NATIVE_LAYER_NORM --precision=float32
  .venv/bin/python bench/native_switch_ab.py --quick --pairs=2 --predicts=1 --sentences=8   # smoke run

all-MiniLM-L6-v2 with a [CLS] softmax head (untrained: the cost does not depend on the weights), the first
--sentences SST-2 dev sentences, batch --batch_size, under the Keras policy --precision. Each side runs in a process
of its own, because our switches are read when a graph is traced (engine/native.py) and a process's thread pools
and oneDNN caches carry over between models; the pairs alternate which side goes first. A process traces and
warms up, then times --predicts predicts and reports their median. Prints each pair's speed-up (off / on: > 1
means the op is faster) and their median. Why: the switches exist so that each op's gain can be measured on the
CPU at hand (bench/RESULTS.md, 2026-12-08: the token attention op under mixed bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(args) -> None:
    """Times task.predict in this process with the switch as the environment sets it; prints one JSON line."""
    from engine import fusion, native  # noqa: PLC0415  (the package first: Keras 2 before TensorFlow loads)
    import tf_keras  # noqa: PLC0415
    from tasks.classification.task import ClassificationConfig, ClassificationTask  # noqa: PLC0415
    from tasks.encoders import bert  # noqa: PLC0415

    switches = sorted(library.switch for library in native.LIBRARIES)
    if args.switch not in switches:  # a misspelt switch would time the same code twice
        sys.exit(f"--switch={args.switch} is none of our ops' switches: {', '.join(switches)}")
    tf_keras.mixed_precision.set_global_policy(args.precision)
    task = ClassificationTask(ClassificationConfig(
        data_files={}, encoder=bert.BertConfig.tiny() if args.quick else "minilm",
        vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"), max_seq_length=128, last_layer_cls_only=True))
    model = task.build_model()
    fusion.for_inference(model)  # as launch.predict.restore_model
    with open(os.path.join(args.data_dir, "sst2", "dev.tsv"), encoding="utf-8") as f:
        sentences = [line.split("\t")[0] for line in f.read().splitlines()[1:args.sentences + 1]]
    task.predict(model, sentences, batch_size=args.batch_size)  # tracing and warm-up, not timed
    seconds = []
    for _ in range(args.predicts):
        start = time.perf_counter()
        task.predict(model, sentences, batch_size=args.batch_size)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"median_s": statistics.median(seconds)}), flush=True)


def _run_side(args, enabled: bool) -> float:
    env = dict(os.environ, **{args.switch: "1" if enabled else "0"})
    command = [sys.executable, os.path.abspath(__file__), "--child"] + (["--quick"] if args.quick else []) + [
        f"--{name}={getattr(args, name)}" for name in ("switch", "precision", "data_dir", "sentences", "batch_size",
                                                       "predicts")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"the {'on' if enabled else 'off'} side failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--switch", default="BERT_ENGINE_NATIVE_ATTENTION",
                        help="the op's switch (engine/native.py's LIBRARIES)")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--predicts", type=int, default=5, help="timed predicts per process")
    parser.add_argument("--pairs", type=int, default=7, help="process pairs, alternating which side goes first")
    parser.add_argument("--quick", action="store_true", help="a tiny random encoder (2 x 64): a smoke run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    from engine import host  # noqa: PLC0415  (no TensorFlow here: /proc only)
    print(f"command: python bench/native_switch_ab.py {' '.join(sys.argv[1:])}")
    print(f"CPU: {host.cpu_model_name()}, {os.cpu_count()} cores, native bf16: "
          f"{'yes' if host.cpu_has_native_bf16() else 'no'}; {args.switch} on against off, {args.precision}, "
          f"{args.sentences} sentences, batch {args.batch_size}", flush=True)
    speed_ups = []
    for pair in range(args.pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)
        seconds = {enabled: _run_side(args, enabled) for enabled in order}
        speed_ups.append(seconds[False] / seconds[True])
        print(f"pair {pair + 1} ({'on' if order[0] else 'off'} first): off {seconds[False] * 1e3:.0f} ms, "
              f"on {seconds[True] * 1e3:.0f} ms, speed-up {speed_ups[-1]:.3f}", flush=True)
    print(f"speed-up with the op (off / on), median of {args.pairs} pairs: {statistics.median(speed_ups):.3f} "
          f"(pairs {min(speed_ups):.2f}-{max(speed_ups):.2f})")


if __name__ == "__main__":
    main()
