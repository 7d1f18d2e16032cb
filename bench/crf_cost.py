"""What the CRF costs: its forward+backward as a share of a whole MiniLM training step, and examples/s
of the CRF head vs the softmax head, on real CoNLL-2003 batches through the engine's Trainer.

  .venv/bin/python bench/crf_cost.py [--batch_size=32] [--max_seq_length=128] [--steps_per_loop=5] [--jit_compile]

Whole step: the Trainer's own compiled train loop (as `Trainer.train()` runs it), `steps_per_loop` updates
per call. CRF alone: log-likelihood and its gradient wrt emissions and transitions on emissions of the
very shape the step sees ([batch, words, tags]), in a tf.function (XLA when --jit_compile). The three
are interleaved round by round (CRF step, softmax step, CRF alone) and medians over rounds are
reported after a warm-up round, so load from other processes on a shared CPU hits all of them alike;
the load average is printed before and after so a busy run can be recognised.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from engine import host  # noqa: E402
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from tasks.ner import crf  # noqa: E402
from tasks.ner.task import TaggingConfig, TaggingTask  # noqa: E402


def cpu_model() -> str:
    return f"{host.cpu_model_name()} | {os.cpu_count()} logical CPUs"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class StepRunner:
    """A Trainer for one head; `run()` times one call of its compiled loop (seconds per update)."""

    def __init__(self, head: str, args):
        config = TaggingConfig(encoder="minilm", head=head, max_seq_length=args.max_seq_length,
                               max_train_sentences=args.train_sentences)
        trainer_config = TrainerConfig(model_dir=tempfile.mkdtemp(prefix=f"crf_cost_{head}_"), train_steps=10 ** 9,
                                       steps_per_loop=args.steps_per_loop, global_batch_size=args.batch_size,
                                       eval_split="")
        self.steps = args.steps_per_loop
        self.trainer = Trainer(TaggingTask(config), trainer_config, OptimizerConfig(learning_rate=5e-5),
                               RuntimeConfig(precision="float32", jit_compile=args.jit_compile))
        # train() always runs to train_steps; interleaving heads needs the loop train() calls, one window at
        # a time (bench/engine_vs_fit.py does the same).
        self.trainer.setup()

    def run(self) -> float:
        trainer = self.trainer
        start = time.perf_counter()
        steps_done, *_ = trainer._train_loop(trainer._train_iterator, tf.constant(self.steps, tf.int32))  # pylint: disable=protected-access
        int(steps_done)  # blocks until the loop has finished
        return (time.perf_counter() - start) / self.steps


def crf_timer(task: TaggingTask, args) -> Callable[[], float]:
    """A function timing CRF log-likelihood forward+backward on one batch of step-shaped emissions (seconds).

    The word mask is that of a random batch of real training windows: the forward algorithm runs up to
    the batch's longest sentence, so lengths matter."""
    arrays = task.split_data("train").arrays
    rng = np.random.default_rng(0)
    rows = rng.choice(len(arrays["word_mask"]), size=args.batch_size, replace=False)
    mask = tf.constant(arrays["word_mask"][rows].astype(bool))
    batch, words = mask.shape
    num_tags = len(task.config.labels)
    emissions = tf.constant(rng.normal(size=[batch, words, num_tags]), tf.float32)
    tags = tf.constant(arrays["tags"][rows], tf.int32)
    print(f"CRF-alone batch: longest sentence {int(arrays['word_mask'][rows].sum(1).max())} of {words} word slots")
    layer = crf.CRF(num_tags, **dict(zip(("allowed_transitions", "allowed_start"),
                                         crf.iob2_constraints(TaggingConfig().labels))))
    layer.build(None)

    @tf.function(jit_compile=args.jit_compile)
    def forward_backward(emissions):
        with tf.GradientTape() as tape:
            tape.watch(emissions)
            loss = -tf.reduce_sum(layer.log_likelihood(emissions, tags, mask))
        return tape.gradient(loss, [emissions] + layer.trainable_variables)

    forward_backward(emissions)  # trace / compile

    def run() -> float:
        start = time.perf_counter()
        for _ in range(args.crf_repeats):
            result = forward_backward(emissions)
        _ = result[0].numpy()
        return (time.perf_counter() - start) / args.crf_repeats
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--steps_per_loop", type=int, default=5)
    parser.add_argument("--train_sentences", type=int, default=2000, help="CoNLL train sentences to tokenize")
    parser.add_argument("--crf_repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--jit_compile", action="store_true")
    args = parser.parse_args()

    print(f"cpu: {cpu_model()} | tensorflow {tf.__version__} | load avg before: {load()}", flush=True)
    print(f"batch {args.batch_size} x {args.max_seq_length} sub-tokens ({args.max_seq_length - 2} word slots), "
          f"MiniLM-L6-H384, float32, xla {args.jit_compile}", flush=True)
    runners = {"crf": StepRunner("crf", args), "softmax": StepRunner("softmax", args)}
    crf_alone = crf_timer(runners["crf"].trainer.task, args)
    timings = {"crf": [], "softmax": [], "crf_alone": []}
    for round_index in range(args.rounds + 1):  # round 0 traces and warms up
        for name, runner in runners.items():
            seconds = runner.run()
            if round_index:
                timings[name].append(seconds)
        if round_index:
            timings["crf_alone"].append(crf_alone())
    seconds = {name: statistics.median(values) for name, values in timings.items()}
    print(f"rounds: {args.rounds} x {args.steps_per_loop} updates per head; per-round ms/step: "
          + "; ".join(f"{k} {[round(1e3 * v) for v in values]}" for k, values in timings.items() if k != "crf_alone"))
    print(f"load avg after: {load()}")
    print(f"crf forward+backward alone: {1e3 * seconds['crf_alone']:.2f} ms/batch")
    for head in ("crf", "softmax"):
        print(f"{head:>7} head: {1e3 * seconds[head]:.0f} ms/step, {args.batch_size / seconds[head]:.1f} examples/s")
    print(f"CRF share of the CRF-head step: {100 * seconds['crf_alone'] / seconds['crf']:.2f}% (target <= 5%); "
          f"step time crf/softmax: {seconds['crf'] / seconds['softmax']:.3f}")


if __name__ == "__main__":
    main()
