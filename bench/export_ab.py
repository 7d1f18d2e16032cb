"""Two exported classification SavedModels against each other in one process: batch-1 latency and batch 32.

  .venv/bin/python bench/export_ab.py A_EXPORT B_EXPORT --data_dir=../shared/data [--rounds=16]

For a change to how `launch.export` builds the serving graph: export the same checkpoint before and after it (a
`git worktree` of the older commit runs the older code), then run this with both folders, once in each order.
On these shared machines the same export answers one sentence in 6 ms one minute and 13 ms the next, so the two
are timed in alternating order within each round (a copy against itself reads ~0.99): per round, the p50 of
--sentences single-sentence calls (the first SST-2 dev sentences) and the throughput of --batch_sentences sentences
in batches of 32. Both exports are served as a serving host runs them: oneDNN as TensorFlow's default on this
CPU and the intra-op threads launch.export advises (engine/host.serving_host_environment; TF_ENABLE_ONEDNN_OPTS
or TF_NUM_INTRAOP_THREADS set by you win), printed first; before 2026-12-07 it served them with oneDNN on (the
engine's own default). Prints per-round ratios (B's speed over A's: > 1 means B is faster) and their medians, and
the largest probability difference between the two (exit status 1 above --max_difference: they must answer
alike). bench/RESULTS.md (2026-12-06) used this to measure the export's halves.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

flags.DEFINE_string("data_dir", "../shared/data", "Folder with sst2/dev.tsv.")
flags.DEFINE_integer("rounds", 16, "Alternating rounds.")
flags.DEFINE_integer("sentences", 64, "Single-sentence calls per export and round.")
flags.DEFINE_integer("batch_sentences", 256, "Sentences served in batches of 32 per export and round (0: none).")
flags.DEFINE_float("max_difference", 1e-4, "Largest probability difference allowed between the two exports.")
FLAGS = flags.FLAGS


def _sentences(data_dir: str, count: int) -> list:
    path = os.path.join(data_dir, "sst2", "dev.tsv")
    with open(path, encoding="utf-8") as f:
        rows = f.read().splitlines()[1:count + 1]
    return [row.split("\t")[0] for row in rows]


def _batch1_p50_ms(serve, sentences) -> float:
    import tensorflow as tf  # noqa: PLC0415 - after flag parsing
    latencies = []
    for sentence in sentences:
        text = tf.constant([sentence])
        start = time.perf_counter()
        serve(sentence=text)["probabilities"].numpy()
        latencies.append(time.perf_counter() - start)
    return statistics.median(latencies) * 1e3


def _batch32_per_s(serve, sentences) -> float:
    import tensorflow as tf  # noqa: PLC0415
    start = time.perf_counter()
    for i in range(0, len(sentences), 32):
        serve(sentence=tf.constant(sentences[i:i + 32]))["probabilities"].numpy()
    return len(sentences) / (time.perf_counter() - start)


# Set in the re-run process that serves the two exports (main).
_AS_SERVING_HOST = "BERT_ENGINE_EXPORT_AB_SERVING_HOST"


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("give two export folders: A_EXPORT B_EXPORT")
    if _AS_SERVING_HOST not in os.environ:
        # Importing the engine (for the flags' environment) turned oneDNN on for this process; a serving host keeps
        # TensorFlow's default and its threads as launch.export advises (host.serving_host_environment). Before
        # TensorFlow loads, run again with that environment, TensorFlow's default spelled out (the re-run imports
        # the engine too, which would turn oneDNN on again).
        from engine import host  # noqa: PLC0415
        env = dict(host.serving_host_environment(), **{_AS_SERVING_HOST: "1"})
        env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1" if host.serving_host_runs_onednn() else "0")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)
    print(f"serving host: TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}, "
          f"TF_NUM_INTRAOP_THREADS={os.environ.get('TF_NUM_INTRAOP_THREADS', '(TensorFlow default)')}", flush=True)
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_text  # noqa: F401,PLC0415  (the exports' tokenizer ops)

    sentences = _sentences(FLAGS.data_dir, max(FLAGS.sentences, FLAGS.batch_sentences))
    singles, batched = sentences[:FLAGS.sentences], sentences[:FLAGS.batch_sentences]
    serves = [tf.saved_model.load(folder).signatures["serving_default"] for folder in argv[1:]]
    difference = max(float(abs(serves[0](sentence=tf.constant(chunk))["probabilities"].numpy()
                               - serves[1](sentence=tf.constant(chunk))["probabilities"].numpy()).max())
                     for chunk in ([sentences[0]], sentences[:32]))
    for serve in serves:  # every oneDNN primitive and sentence length once before timing
        _batch1_p50_ms(serve, singles)
        if batched:
            _batch32_per_s(serve, batched)
    single_ratios, batch_ratios = [], []
    for round_index in range(FLAGS.rounds):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        p50, per_s = {}, {}
        for side in order:
            p50[side] = _batch1_p50_ms(serves[side], singles)
            if batched:
                per_s[side] = _batch32_per_s(serves[side], batched)
        single_ratios.append(p50[0] / p50[1])
        line = f"round {round_index + 1}: batch-1 p50 A {p50[0]:.2f} ms, B {p50[1]:.2f} ms"
        if batched:
            batch_ratios.append(per_s[1] / per_s[0])
            line += f"; batch 32 A {per_s[0]:.0f}/s, B {per_s[1]:.0f}/s"
        print(line, flush=True)
    print(f"A: {argv[1]}\nB: {argv[2]}")
    print(f"batch-1 p50 speed-up, B over A: median {statistics.median(single_ratios):.3f} "
          f"(rounds {' '.join(f'{r:.2f}' for r in single_ratios)})")
    if batch_ratios:
        print(f"batch-32 throughput, B over A: median {statistics.median(batch_ratios):.3f} "
              f"(rounds {' '.join(f'{r:.2f}' for r in batch_ratios)})")
    print(f"largest probability difference: {difference:.3g}")
    if difference > FLAGS.max_difference:
        print(f"the two exports answer differently: {difference:.3g} > --max_difference={FLAGS.max_difference}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
