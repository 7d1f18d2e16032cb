"""SQuAD training throughput on MiniLM at seq 384, and what the cached-feature input pipeline costs.

  python bench/squad_input.py                      # float32 and mixed_bfloat16, cached vs synthetic
  python bench/squad_input.py --precisions=float32 --repeats=1 --loops=2

Each run is a real engine Trainer on the SquadTask (MiniLM encoder, start/end head, AdamW). Input is
either the task's own pipeline (TFRecord feature cache -> shuffle -> batch -> parse) or "synthetic":
one real batch held in memory and repeated, i.e. an input pipeline that costs nothing. The step
times should agree within a few percent if the cached pipeline keeps up with the model. The first
loop of every run (tracing, shuffle-buffer fill) is not timed; the median over the other loops is
reported. Runs of the two input modes alternate, so load from other processes hits both alike.
The cached pipeline is also timed alone (batches/s without a model), which bounds its share of a
step even when other processes make step times noisy.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Precisions to measure.")
flags.DEFINE_list("inputs", ["cached", "synthetic"], "Input modes to measure.")
flags.DEFINE_integer("batch_size", 8, "Global batch (one replica).")
flags.DEFINE_integer("seq_length", 384, "max_seq_length.")
flags.DEFINE_integer("steps_per_loop", 4, "Steps per timed loop.")
flags.DEFINE_integer("loops", 3, "Timed loops per run (after one untimed warm-up loop).")
flags.DEFINE_integer("repeats", 2, "Runs per (precision, input) pair, alternating input modes.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the step.")
flags.DEFINE_string("encoder", "minilm", "Encoder init (see tasks.encoders.loading.make_encoder).")
flags.DEFINE_integer("pipeline_batches", 300, "Batches to time the cached input pipeline alone (0: skip).")
flags.DEFINE_string("output_json", None, "Also write the results here.")


def _synthetic_task(base):
    """The same Task whose training input is one real batch repeated from memory."""
    import tensorflow as tf  # noqa: PLC0415

    class SyntheticInput(type(base)):
        def build_inputs(self, split, *, batch_size, input_context=None):
            batch = next(iter(super().build_inputs(split, batch_size=batch_size, input_context=input_context)))
            return tf.data.Dataset.from_tensors(batch).repeat()

    task = SyntheticInput(base.config)
    return task


def time_input_pipeline(task, num_batches: int) -> float:
    """Batches/s of the cached pipeline alone (no model): its share of a step, free of model-time noise."""
    iterator = iter(task.build_inputs("train", batch_size=FLAGS.batch_size))
    next(iterator)  # the shuffle buffer fills here
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches / (time.perf_counter() - start)


def run_once(task, precision: str) -> dict:
    """Trains (1 + loops) * steps_per_loop steps; returns timings of the timed loops."""
    from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig  # noqa: PLC0415
    from engine.trainer import Trainer  # noqa: PLC0415

    model_dir = tempfile.mkdtemp(prefix="squad_bench_")
    try:
        config = TrainerConfig(model_dir=model_dir, train_steps=(1 + FLAGS.loops) * FLAGS.steps_per_loop,
                               global_batch_size=FLAGS.batch_size, steps_per_loop=FLAGS.steps_per_loop,
                               eval_split="")
        trainer = Trainer(task, config, OptimizerConfig(learning_rate=3e-5, warmup_steps=0),
                          RuntimeConfig(precision=precision, jit_compile=FLAGS.jit_compile))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        step_seconds = [1.0 / h["steps/sec"] for h in trainer.train_history[1:]]
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    median = statistics.median(step_seconds)
    return {"step_seconds": step_seconds, "median_step_seconds": median,
            "examples_per_second": FLAGS.batch_size / median, "wall_seconds": wall}


def main(argv):
    del argv
    from engine import precision as precision_lib  # noqa: PLC0415
    from tasks.squad import task as squad  # noqa: PLC0415

    base = squad.SquadTask(squad.SquadConfig(encoder=FLAGS.encoder, max_seq_length=FLAGS.seq_length))
    features, record_path = base.features("train")  # build the cache before anything is timed
    header = {"command": " ".join(sys.argv), "cpu": precision_lib.cpu_model_name(), "cpu_count": os.cpu_count(),
              "native_bf16": precision_lib.cpu_has_native_bf16(), "train_features": features.num_features,
              "cache": record_path, "batch_size": FLAGS.batch_size, "seq_length": FLAGS.seq_length}
    print(json.dumps(header), flush=True)
    if FLAGS.pipeline_batches:
        header["input_pipeline_batches_per_second"] = time_input_pipeline(base, FLAGS.pipeline_batches)
        print(f"bench | cached input pipeline alone | {header['input_pipeline_batches_per_second']:.1f} batches/s",
              flush=True)
    tasks = {"cached": lambda: squad.SquadTask(base.config), "synthetic": lambda: _synthetic_task(base)}
    runs: dict[str, list[dict]] = {}
    for precision in FLAGS.precisions:
        for repeat in range(FLAGS.repeats):
            order = FLAGS.inputs if repeat % 2 == 0 else FLAGS.inputs[::-1]
            for mode in order:
                result = run_once(tasks[mode](), precision)
                runs.setdefault(f"{precision}/{mode}", []).append(result)
                print(f"bench | {precision} | {mode} | repeat {repeat} | step {result['median_step_seconds']:.3f} s "
                      f"| {result['examples_per_second']:.2f} examples/s", flush=True)

    summary = {}
    for key, results in runs.items():
        steps = [s for r in results for s in r["step_seconds"]]
        median = statistics.median(steps)
        summary[key] = {"median_step_seconds": median, "examples_per_second": FLAGS.batch_size / median,
                        "loops": len(steps)}
    for precision in FLAGS.precisions:
        cached, synthetic = summary.get(f"{precision}/cached"), summary.get(f"{precision}/synthetic")
        if cached and synthetic:
            overhead = cached["median_step_seconds"] / synthetic["median_step_seconds"] - 1
            summary[f"{precision}/cached_vs_synthetic"] = overhead
    print("\n" + json.dumps({"setup": header, "summary": summary}, indent=1), flush=True)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w", encoding="utf-8") as f:
            json.dump({"setup": header, "summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
