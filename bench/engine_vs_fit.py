"""Training throughput and MFU of our engine against plain `model.fit`, on this CPU.

  python bench/engine_vs_fit.py --data_dir=../shared/data --output=/tmp/t.md   # 8 min on a quiet 2-core CPU
  python bench/engine_vs_fit.py --quick --steps=2 --rounds=1                   # tiny encoder: a smoke run

Why: the engine wraps the step in a compiled loop with gradient accumulation, non-finite checks and
clipping. This checks that none of that costs throughput against what users do today (`compile` +
`fit`), and how far both are from the CPU's own matmul peak (MFU).

Same model, optimizer and batches on both sides: BertEncoderV2 with MiniLM's shape (6 layers, hidden 384,
12 heads, FFN 1536, random init) and a softmax head on the pooled output, built by
`ClassificationTask.build_model`; AdamW (lr 2e-5, weight decay 0.01 except LayerNorm/bias, global-norm
clip 1.0; the same update, applied by the engine's fused kernels and by fit's stock tf_keras AdamW); real SST-2 sentences tokenized once to seq 128, fed to both from the same in-memory tensors;
batch 32. Configurations, in every --precisions policy:
  fit:    `model.fit`, steps_per_execution in --fit_steps_per_execution, jit_compile in --jit, stock Keras
          layers (plus, with --fit_fusion=stock,fused, the same model with engine/fusion.py's XLA islands);
  engine: `engine.trainer.Trainer`, steps_per_loop = --steps, RuntimeConfig.jit_compile in --jit,
          RuntimeConfig.fuse_elementwise per --engine_fusion (fused: the default; stock: Keras' layers).

This machine is shared, so the measurement is built to survive noisy neighbours: all configurations are
built and warmed up first (the first call traces and compiles: never timed), then every round times one
window of --steps steps of each configuration in turn (order reversed every other round). The table
gives the median window; ratios are medians of same-round ratios. Each window's process CPU time also
gives examples per CPU-second: waiting for a core another job holds costs wall time but no CPU time, so
ratios per CPU-second are a cross-check that contention disturbs far less. The matmul peak is re-measured
every round and the best kept, per wall- and per CPU-second; MFU = FLOPs per example x examples/s / peak,
and "MFU per CPU-s" the same per CPU-second (about what MFU would be with the cores to ourselves).
A configuration more than SLOW_FACTOR x slower than the best of its precision in a one-step probe is
timed by that probe only: it is no contender, and its windows would eat the time budget.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_FACTOR = 3.0

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"),
                    "Folder holding sst2/train.tsv.")
flags.DEFINE_integer("steps", 4, "Timed steps per window; also the engine's steps_per_loop.")
flags.DEFINE_integer("rounds", 3, "Timed windows per configuration, one per round.")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras precision policies.")
flags.DEFINE_list("fit_steps_per_execution", ["1", "4"], "steps_per_execution values for model.fit.")
flags.DEFINE_list("jit", ["false", "true"], "jit_compile values, for fit and the engine alike.")
flags.DEFINE_list("engine_fusion", ["fused", "stock"], "Engine dropout/activation layers: fused (RuntimeConfig "
                  "default, engine/fusion.py) and/or stock.")
flags.DEFINE_list("fit_fusion", ["stock"], "model.fit dropout/activation layers: stock (Keras) and/or fused.")
flags.DEFINE_bool("quick", False, "Tiny encoder (2 layers, hidden 64), seq 32, batch 8: a smoke run.")
flags.DEFINE_bool("last_layer_cls_only", True, "The classifier's last encoder layer computes [CLS] only "
                  "(ClassificationConfig.last_layer_cls_only, the default); false: every position, as HF does.")
flags.DEFINE_integer("num_examples", 1024, "SST-2 training sentences tokenized (then cycled through).")
flags.DEFINE_string("output", None, "Append the markdown results to this file.")


@dataclasses.dataclass(frozen=True)
class Setup:
    encoder: object          # tasks.encoders.bert.BertConfig
    seq_length: int
    batch_size: int
    num_examples: int = 1024
    last_layer_cls_only: bool = True


def make_setup(quick: bool, num_examples: int = 1024, last_layer_cls_only: bool = True) -> Setup:
    from tasks.encoders import bert  # noqa: PLC0415
    if quick:
        return Setup(bert.BertConfig.tiny(), seq_length=32, batch_size=8, num_examples=num_examples,
                     last_layer_cls_only=last_layer_cls_only)
    # BertConfig's defaults are MiniLM's shape (6 x 384, 12 heads, FFN 1536, vocab 30522).
    return Setup(bert.BertConfig(), seq_length=128, batch_size=32, num_examples=num_examples,
                 last_layer_cls_only=last_layer_cls_only)


def train_flops_per_example(setup: Setup) -> float:
    """3 x forward matmul FLOPs (backward = 2 x forward) that the engine computes (bert.encoder_flops_per_token:
    a [CLS]-only last layer counts as engine/first_position.py runs it). Embeddings, pooler, head, LayerNorm,
    softmax are negligible."""
    from tasks.encoders import bert  # noqa: PLC0415
    cfg, s = setup.encoder, setup.seq_length
    return 3.0 * s * bert.encoder_flops_per_token(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, s,
                                                  output_range=1 if setup.last_layer_cls_only else None,
                                                  heads=cfg.num_attention_heads)


# ------------------------------------------------------------------------------------ data and task

def make_task(setup: Setup, data_dir: str):
    """A ClassificationTask (random-init encoder) whose training input is in-memory, pre-tokenized tensors."""
    import tensorflow as tf  # noqa: PLC0415
    from tasks.encoders import bert  # noqa: PLC0415
    from tasks.classification.task import ClassificationConfig, ClassificationTask  # noqa: PLC0415

    class InMemoryTask(ClassificationTask):
        """Tokenizes once; fit and the engine then read the same tensors, so input costs them alike."""

        def __init__(self, config):
            super().__init__(config)
            sentences = self.examples("train").texts[0][:setup.num_examples]
            self.features = {k: v.numpy() for k, v in self.tokenizer.encode(tf.constant(sentences)).items()}
            self.labels = self.examples("train").labels[:setup.num_examples]

        def build_inputs(self, split, *, batch_size, input_context=None):
            dataset = tf.data.Dataset.from_tensor_slices((self.features, self.labels))
            return dataset.repeat().batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    config = ClassificationConfig(
        data_files={"train": os.path.join(data_dir, "sst2", "train.tsv")}, encoder=setup.encoder,
        vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"), max_seq_length=setup.seq_length,
        last_layer_cls_only=setup.last_layer_cls_only,
        group_by_length=0)  # every batch at the full seq_length, as fit sees it
    return InMemoryTask(config)


def optimizer_config():
    from engine.config import OptimizerConfig  # noqa: PLC0415
    # Linear decay over a horizon never reached: a constant rate, the same schedule code on both sides.
    return OptimizerConfig(learning_rate=2e-5, warmup_steps=0, decay_steps=10 ** 9, end_learning_rate=0.0)


# ------------------------------------------------------------------------------------ runners

class FitRunner:
    """`model.compile(AdamW, steps_per_execution, jit_compile)` + `model.fit`, timed per epoch."""

    kind = "fit"

    def __init__(self, task, batch_size: int, precision: str, steps_per_execution: int, jit: bool,
                 fused: bool = False):
        import tf_keras  # noqa: PLC0415
        from engine import fusion, optimization  # noqa: PLC0415

        self.name = f"fit spe={steps_per_execution}" + (" xla" if jit else "") + (" fused" if fused else "")
        self.precision, self.jit = precision, jit
        cfg = optimizer_config()
        tf_keras.mixed_precision.set_global_policy(precision)
        tf_keras.utils.set_random_seed(0)  # the engine's RuntimeConfig.seed: identical initial weights
        try:
            self.model = task.build_model()
        finally:
            tf_keras.mixed_precision.set_global_policy("float32")
        if fused:
            fusion.fuse_elementwise(self.model)
        # tf_keras' AdamW as a Keras user runs it: the update engine.optimization.FusedAdamW applies with fused
        # kernels (the engine's own speed-up, so measured), plus the global-norm clipping the engine does itself.
        optimizer = tf_keras.optimizers.AdamW(
            learning_rate=optimization.make_learning_rate(cfg, 10 ** 9), weight_decay=cfg.weight_decay,
            beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon, global_clipnorm=cfg.clip_norm,
            jit_compile=False)
        optimizer.exclude_from_weight_decay(var_names=list(cfg.exclude_from_weight_decay))
        self.model.compile(optimizer=optimizer,
                           loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           steps_per_execution=steps_per_execution, jit_compile=jit)
        self._dataset = task.build_inputs("train", batch_size=batch_size)

        class EpochTimer(tf_keras.callbacks.Callback):
            # on_epoch_begin comes after fit has built its data handler and iterator: only the loop is timed.
            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter(), time.process_time()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        self._timer = EpochTimer()

    def run(self, steps: int) -> tuple[float, float]:
        """Trains `steps` steps; returns their (wall, CPU) seconds. A shorter run than steps_per_execution
        is one call of `steps` (fit lowers its steps_per_execution variable: no retracing)."""
        self.model.fit(self._dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[self._timer])
        return self._timer.seconds

    def close(self):
        self.model = self._dataset = None  # free the model and its optimizer state


class EngineRunner:
    """`engine.trainer.Trainer` on the same task, timing the Trainer's compiled loop as `train()` does."""

    kind = "engine"

    def __init__(self, task, batch_size: int, precision: str, jit: bool, steps_per_loop: int,
                 fused: bool = True, grad_accum_steps: int = 1):
        import tf_keras  # noqa: PLC0415
        from engine.config import RuntimeConfig, TrainerConfig  # noqa: PLC0415
        from engine.trainer import Trainer  # noqa: PLC0415

        self.name = ("engine" + (" xla" if jit else "") + ("" if fused else " unfused")
                     + (f" accum {grad_accum_steps}x{batch_size // grad_accum_steps}" if grad_accum_steps > 1 else ""))
        self.precision, self.jit = precision, jit
        self._model_dir = tempfile.mkdtemp(prefix="engine_vs_fit_")
        config = TrainerConfig(model_dir=self._model_dir, train_steps=10 ** 9, global_batch_size=batch_size,
                               steps_per_loop=steps_per_loop, eval_split="",
                               grad_accum_steps=grad_accum_steps)
        try:
            self.trainer = Trainer(task, config, optimizer_config(),
                                   RuntimeConfig(precision=precision, jit_compile=jit, fuse_elementwise=fused))
        finally:
            tf_keras.mixed_precision.set_global_policy("float32")  # the Trainer sets the global policy
        # Trainer.train() runs to train_steps and then saves a checkpoint; windows interleaved with other
        # configurations need the loop itself, which is what train() calls and times.
        self.trainer.setup()

    def run(self, steps: int) -> tuple[float, float]:
        import tensorflow as tf  # noqa: PLC0415
        loop, iterator = self.trainer._train_loop, self.trainer._train_iterator  # pylint: disable=protected-access
        start = time.perf_counter(), time.process_time()
        steps_done, *_ = loop(iterator, tf.constant(steps, tf.int32))
        int(steps_done)  # blocks until the loop has finished
        return time.perf_counter() - start[0], time.process_time() - start[1]

    def close(self):
        self.trainer = None
        shutil.rmtree(self._model_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ peak

# The big square, and the model's own shapes: 4096 = 32 x 128 tokens against 384/1536 features.

def matmul_peak_gflops(dtype, shapes=None, samples: int = 5, calls: int = 3) -> tuple[float, float]:
    """Best TF matmul GFLOP/s over `shapes`, per wall-second and per CPU-second of this process; each
    sample times `calls` back-to-back matmuls."""
    import tensorflow as tf  # noqa: PLC0415
    from engine.precision import PEAK_SHAPES  # noqa: PLC0415  (the shapes the Trainer's console MFU uses)
    best_wall = best_cpu = 0.0
    for m, k, n in shapes or PEAK_SHAPES:
        a, b = tf.cast(tf.random.normal([m, k]), dtype), tf.cast(tf.random.normal([k, n]), dtype)
        matmul = tf.function(tf.matmul)
        matmul(a, b).numpy()  # trace; warm oneDNN's primitive cache
        for _ in range(samples):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                matmul(a, b).numpy()
            gflop = calls * 2 * m * k * n / 1e9
            best_wall = max(best_wall, gflop / (time.perf_counter() - wall))
            best_cpu = max(best_cpu, gflop / max(time.process_time() - cpu, 1e-6))
    return best_wall, best_cpu


# ------------------------------------------------------------------------------------ the run

def build_runners(task, setup: Setup, precisions, steps_per_execution, jits, steps: int,
                  engine_fusion=("fused", "stock"), fit_fusion=("stock",)) -> list:
    runners = []
    for precision in precisions:
        for jit in jits:
            runners += [FitRunner(task, setup.batch_size, precision, spe, jit, fused=kind == "fused")
                        for kind in fit_fusion for spe in steps_per_execution]
            runners += [EngineRunner(task, setup.batch_size, precision, jit, steps, fused=kind == "fused")
                        for kind in engine_fusion]
    return runners


def warm_up(runners) -> dict:
    """Runs each runner once untimed (tracing and (XLA) compilation), then one timed step: {runner: (1, *result)}."""
    probe = {}
    for runner in runners:
        start = time.perf_counter()
        runner.run(1)
        probe[runner] = (1, *runner.run(1))
        print(f"warm-up | {runner.precision} | {runner.name} | {time.perf_counter() - start:.1f} s, "
              f"then one step {probe[runner][1]:.2f} s", flush=True)
    return probe


def measure(runners, peaks: dict, *, steps: int, rounds: int, batch_size: int) -> dict:
    """Warm-up, one-step probe, then `rounds` interleaved windows; raises `peaks` to the best seen.

    Returns {runner: [(steps, wall seconds, CPU seconds)]}; `peaks` maps "float32"/"bfloat16" to GFLOP/s
    (per wall-second, per CPU-second).
    """
    import tensorflow as tf  # noqa: PLC0415
    windows = {runner: [] for runner in runners}
    probe = warm_up(runners)
    contenders = []
    for runner in runners:
        fastest = min(probe[r][1] for r in runners if r.precision == runner.precision)
        if probe[runner][1] > SLOW_FACTOR * fastest:
            windows[runner] += [probe[runner], (1, *runner.run(1))]  # two one-step samples: all it gets
            print(f"not a contender ({probe[runner][1] / fastest:.1f}x slower): {runner.precision} | {runner.name}")
        else:
            contenders.append(runner)
    for round_index in range(rounds):
        # Reverse the order every other round, so no configuration always follows the same neighbour.
        for runner in contenders if round_index % 2 == 0 else contenders[::-1]:
            wall, cpu = runner.run(steps)
            windows[runner].append((steps, wall, cpu))
            print(f"round {round_index} | {runner.precision} | {runner.name} | {steps * batch_size / wall:.2f} "
                  f"examples/s | {steps * batch_size / cpu:.2f} examples/CPU-s", flush=True)
        for name, dtype in (("float32", tf.float32), ("bfloat16", tf.bfloat16)):
            peaks[name] = tuple(max(a, b) for a, b in zip(peaks[name], matmul_peak_gflops(dtype)))
        print(f"round {round_index} | matmul peak so far (GFLOP/s per wall-s, per CPU-s): {peaks}", flush=True)
    return windows


def summarize(runners, windows, peaks, *, batch_size: int, flops: float) -> tuple[list, list]:
    """Table rows (medians over windows) and ratio lines.

    A ratio is the median over rounds of the two configurations' ratio within the same round: the load
    of other jobs drifts between rounds far more than between neighbouring windows of one round.
    """
    rows = []
    for runner in runners:
        samples = windows[runner]
        wall = [steps * batch_size / w for steps, w, _ in samples]
        cpu = [steps * batch_size / c for steps, _, c in samples]
        peak_wall, peak_cpu = (p * 1e9 for p in peaks["bfloat16" if "bfloat16" in runner.precision else "float32"])
        rows.append(dict(runner=runner, precision=runner.precision, config=runner.name,
                         windows=f"{len(samples)} x {samples[-1][0]}", wall_samples=wall, cpu_samples=cpu,
                         wall=statistics.median(wall), cpu=statistics.median(cpu)))
        rows[-1].update(mfu=flops * rows[-1]["wall"] / peak_wall, mfu_cpu=flops * rows[-1]["cpu"] / peak_cpu)

    def best(precision, kind, jit=None):
        # fit as users run it today (stock Keras layers); a "fit ... fused" row is reported on its own line.
        pool = [r for r in rows if r["precision"] == precision and r["runner"].kind == kind
                and (jit is None or r["runner"].jit == jit) and not r["config"].endswith(" fused")]
        return max(pool, key=lambda r: r["wall"]) if pool else None

    def paired(a, b, key):
        if len(a[key]) == len(b[key]) and a["windows"] == b["windows"]:  # both timed in the same rounds
            return statistics.median(x / y for x, y in zip(a[key], b[key]))
        return statistics.median(a[key]) / statistics.median(b[key])

    def ratio(a, b):
        return f"{paired(a, b, 'wall_samples'):.3f} (per CPU-s: {paired(a, b, 'cpu_samples'):.3f})"

    lines = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        fit, eng = best(precision, "fit"), best(precision, "engine")
        for row in rows:
            if row["precision"] == precision and fit:
                row["vs_fit"] = paired(row, fit, "wall_samples")
        if fit and eng:
            lines.append(f"{precision}: engine best ({eng['config']}) / fit best ({fit['config']}) = {ratio(eng, fit)}")
        for jit in (False, True):
            f, e = best(precision, "fit", jit), best(precision, "engine", jit)
            if f and e:
                lines.append(f"{precision}: like-for-like {e['config']} / {f['config']} = {ratio(e, f)}")
    by_name = {(r["precision"], r["config"]): r for r in rows}
    for (precision, name), row in by_name.items():
        stock = by_name.get((precision, name + " unfused"))
        if name.startswith("engine") and stock:
            lines.append(f"{precision}: {name} (fused) / {stock['config']} = {ratio(row, stock)}")
        fused_fit = by_name.get((precision, name + " fused"))
        if name.startswith("fit") and fused_fit:
            lines.append(f"{precision}: {fused_fit['config']} / {name} = {ratio(fused_fit, row)}")
    fit32 = best("float32", "fit")
    for precision in dict.fromkeys(r["precision"] for r in rows):
        eng = best(precision, "engine")
        if precision != "float32" and fit32 and eng:
            lines.append(f"{precision}: engine best ({eng['config']}) / fit float32 best ({fit32['config']}) "
                         f"= {ratio(eng, fit32)}")
    return rows, lines


def markdown(rows, lines, header: dict) -> str:
    out = [f"- {k}: {v}" for k, v in header.items()] + [""]
    out += ["| precision | configuration | windows x steps | examples/s | vs fit best (paired) | examples/CPU-s | MFU | "
            "MFU per CPU-s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['precision']} | {r['config']} | {r['windows']} | {r['wall']:.2f} | "
                   f"{r.get('vs_fit', float('nan')):.3f} | {r['cpu']:.2f} | {100 * r['mfu']:.1f}% | "
                   f"{100 * r['mfu_cpu']:.1f}% |")
    return "\n".join(out + [""] + [f"- {line}" for line in lines] + [""])


def run_benchmark(setup: Setup, data_dir: str, *, precisions, steps_per_execution, jits, steps: int,
                  rounds: int, engine_fusion=("fused", "stock"), fit_fusion=("stock",),
                  output: str | None = None, command: str = "") -> dict:
    """The whole benchmark; returns {"rows", "lines", "peaks", "flops_per_example", "markdown"}."""
    from engine import precision as precision_lib  # noqa: PLC0415

    started = time.perf_counter()
    task = make_task(setup, data_dir)
    flops = train_flops_per_example(setup)
    cfg = setup.encoder
    header = {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "CPU": f"{precision_lib.cpu_model_name()}, {os.cpu_count()} cores (shared with other jobs)",
        "native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo)": "yes" if precision_lib.cpu_has_native_bf16() else "no",
        "model": (f"BertEncoderV2 {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
                  f"heads, FFN {cfg.intermediate_size}, softmax head; seq {setup.seq_length}, batch {setup.batch_size}"),
        "training FLOPs per example (3 x forward matmuls)": f"{flops / 1e9:.3f} GFLOP",
        "timing": f"median of {rounds} interleaved windows of {steps} steps after an untimed compile call",
    }
    for k, v in header.items():
        print(f"{k}: {v}", flush=True)
    # Every configuration lives through all rounds (about 1 GB each for MiniLM), so that precisions, too,
    # are compared under the same load, and the peak is measured under the load the models saw.
    runners = build_runners(task, setup, precisions, steps_per_execution, jits, steps, engine_fusion, fit_fusion)
    peaks = {"float32": (0.0, 0.0), "bfloat16": (0.0, 0.0)}
    try:
        windows = measure(runners, peaks, steps=steps, rounds=rounds, batch_size=setup.batch_size)
    finally:
        for runner in runners:
            runner.close()
    header["matmul peak, best over shapes and rounds"] = (
        f"fp32 {peaks['float32'][0]:.0f} GFLOP/s ({peaks['float32'][1]:.0f} per CPU-s), "
        f"bf16 {peaks['bfloat16'][0]:.0f} GFLOP/s ({peaks['bfloat16'][1]:.0f} per CPU-s)")
    header["wall time"] = f"{time.perf_counter() - started:.0f} s"
    rows, lines = summarize(runners, windows, peaks, batch_size=setup.batch_size, flops=flops)
    text = markdown(rows, lines, header)
    print("\n" + text, flush=True)
    if output:
        with open(output, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return {"rows": rows, "lines": lines, "peaks": peaks, "flops_per_example": flops, "markdown": text}


def main(argv):
    del argv
    run_benchmark(
        make_setup(FLAGS.quick, FLAGS.num_examples, FLAGS.last_layer_cls_only), FLAGS.data_dir, precisions=FLAGS.precisions,
        steps_per_execution=[int(s) for s in FLAGS.fit_steps_per_execution],
        jits=[j.lower() in ("1", "true", "yes") for j in FLAGS.jit], steps=FLAGS.steps, rounds=FLAGS.rounds,
        engine_fusion=FLAGS.engine_fusion, fit_fusion=FLAGS.fit_fusion, output=FLAGS.output,
        command=" ".join(["python"] + sys.argv))


if __name__ == "__main__":
    app.run(main)
