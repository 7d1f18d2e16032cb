"""Our engine against `model.fit` and PyTorch + Hugging Face, training and serving, in one interleaved run.

  python bench/vs_pytorch.py --data_dir=../shared/data --rounds=5 --output=/tmp/bench.md   # `make bench`
  python bench/vs_pytorch.py --quick --rounds=1 --steps=1 --eval_examples=16 --latency_calls=2   # smoke run
  python bench/vs_pytorch.py --notraining --full_padding_rows --eval_examples=128   # evaluation/serving only

Why: the peer users would pick instead of this engine is PyTorch with Transformers, not `model.fit`; and
training steps are only half of it: evaluation, prediction and serving are what users run most.

Same weights everywhere: all-MiniLM-L6-v2 (the bundled safetensors; our side converts them, the peer loads
them as BertForSequenceClassification), with the classifier head copied from our model into the peer's
(the bench prints the largest logit difference, and how many sentences HF's tokenizer encodes to other
ids than ours). `--quick`: a tiny random encoder (2 x 64), seq 32, batch 8, for smoke runs.

Training (seq 128, batch 32, the same real SST-2 batches pre-tokenized by our tokenizer, AdamW lr 2e-5,
weight decay 0.01 except LayerNorm/bias, global-norm clip 1.0), in every --precisions policy:
  engine:  engine.trainer.Trainer's compiled loop (steps_per_loop = --steps, XLA-fused elementwise layers,
           the default on this CPU, AdamW as one fused kernel per variable); plus "engine accum KxM": K micro-batches of M = batch / K, same global batch
  fit:     `model.compile(tf_keras AdamW)` + `model.fit`, steps_per_execution 1 (4 is no faster: bench/RESULTS.md)
  pytorch: eager, and `torch.compile` (--torch_compile), bf16 by `torch.autocast`; torch's fused AdamW;
           each in a child process of its own, timed on request (pytorch_peer.TrainRunnerProcess: inside this
           process PyTorch eager trained up to a third slower than alone)
Evaluation and serving (float32, the first --eval_examples SST-2 dev sentences, raw strings in):
  Trainer.evaluate (compiled eval step over the split tokenized once per task + metrics), the launch.predict path
  (`task.predict` on the model restored as launch.predict restores it), and the raw-string SavedModel that
  launch.export writes (batch --serving_batch_size throughput; batch 1 latency over --latency_calls sentences, p50/p99
  per round; served from a process of its own that loads only the SavedModel, savedmodel_process.SavedModelProcess, as
  the peer's), each with engine/fusion.py's rewrites as the Trainer, launch.predict and launch.export apply them. Ours
  cut each batch to its longest sentence; evaluate and predict also run the sentences longest first (answers in input
  order), so batches hold similar lengths; the SavedModel answers the batches it is given. With --full_padding_rows
  ours also padded to the full seq ("... pad 128", as before issue 14). Against the peer in `torch.inference_mode`
  with HF's fast tokenizer on the same sentences (tokenizing inside every call; in a process of its own,
  pytorch_peer.ClassifierProcess), padded to 128 ("pad 128"), to the batch's longest ("pad longest": HF's usual
  `padding=True`), and, for evaluate and predict, longest first as ours ("pad longest, longest first": tokenized once,
  batches padded by `tokenizer.pad`). A target compares with the fastest peer row.
bf16 serving (--bf16_serving, on by default): the SavedModel of launch.export --serving_precision=bfloat16 (the
  blocks' dense kernels held and multiplied in bf16, the rest float32) at batch --serving_batch_size and 1,
  against the peer's model converted to bf16 (`.to(torch.bfloat16)`, as HF's `dtype=torch.bfloat16` serves it),
  pad longest. Each side's bf16 answers are checked against its float32 ones.
  --notraining times evaluation/serving only.

Timing: everything is built and warmed up first (never timed); then every round times each configuration
once, in an order reversed every other round, each evaluation/serving group's configurations back to back (ours
and the peer's). Tables give medians over rounds; a ratio is the median over rounds of the same-round ratio
(other jobs' load drifts between rounds far more than within one), with the per-round values listed. Examples
per CPU-second (process CPU time) are a cross-check under contention.
"""
from __future__ import annotations

import datetime
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

import engine_vs_fit  # noqa: E402
import savedmodel_process  # noqa: E402

FLAGS = flags.FLAGS
# Shared with engine_vs_fit (it defines them on import): --data_dir, --steps, --rounds, --precisions, --quick,
# --num_examples, --last_layer_cls_only, --output; other defaults here. Its --fit_steps_per_execution/--jit/
# --*_fusion are not used.
FLAGS.set_default("steps", 2)
FLAGS.set_default("rounds", 5)
FLAGS.set_default("num_examples", 256)
flags.DEFINE_bool("training", True, "Time training (engine, fit, PyTorch); --notraining: evaluation/serving only.")
flags.DEFINE_bool("fit", True, "Time model.fit.")
flags.DEFINE_bool("pytorch", True, "Time the PyTorch + HF peer (needs `pip install -e .[bench]`).")
flags.DEFINE_bool("torch_compile", True, "Also time torch.compile (slow to compile: minutes on 2 cores).")
flags.DEFINE_integer("grad_accum_steps", 4, "The engine with this many micro-batches per update, in the first "
                     "precision, against one batch (0 or 1: not measured).")
flags.DEFINE_integer("eval_examples", 256, "SST-2 dev sentences for evaluation/prediction/serving (0: none).")
flags.DEFINE_integer("serving_batch_size", 32, "Batch size of evaluation, prediction and batched serving.")
flags.DEFINE_integer("latency_calls", 32, "Batch-1 serving calls per configuration and round.")
flags.DEFINE_bool("bf16_serving", True, "Also time the SavedModel with bf16 kernels (launch.export "
                  "--serving_precision=bfloat16) at batch --serving_batch_size and 1, against the peer's model in bf16.")
flags.DEFINE_integer("serving_intra_op_threads", -1, "Intra-op threads of the SavedModel's server process: -1 as "
                     "launch.export advises for this host (engine/host.serving_intra_op_threads), 0 TensorFlow's "
                     "default (as many as the cores).")
flags.DEFINE_bool("full_padding_rows", False, "Also time our evaluation/predict/serving padded to the full "
                  "sequence length (cut_eval_batches=False: what they did before issue 14), for the gain of cutting.")

NO_PEER = "PyTorch peer: skipped, the bench extra is not installed (pip install -e '.[bench]'): {}"


# ------------------------------------------------------------------------------------ evaluation runners

class Timed:
    """An evaluation/serving configuration timed here: `run()` returns (examples, wall s, CPU s). `latencies` (s per
    call, per round) is filled by RemoteTimed for batch 1, whose calls are timed in their server's process."""

    def __init__(self, group: str, name: str, fn, examples: int, *, kind: str | None = None,
                 shared_from: str | None = None):
        self.group, self.name = group, name
        self.shared_from = shared_from  # a group whose configuration of this name is timed for both (the peer's)
        self.kind = kind or ("torch" if name.startswith("pytorch") else "ours")  # "ours full": padded to seq
        self._fn, self.examples = fn, examples
        self.latencies: list[list[float]] = []  # per run (round) of a batch-1 configuration
        self.word_pieces: list[int] | None = None  # of each batch-1 call's sentence, in call order

    def run(self) -> tuple[int, float, float]:
        start = time.perf_counter(), time.process_time()
        self._fn()
        return self.examples, time.perf_counter() - start[0], time.process_time() - start[1]

    def close(self):
        pass


class RemoteTimed(Timed):
    """A configuration timed in a process of its own (the peer's pytorch_peer.ClassifierProcess, our
    savedmodel_process.SavedModelProcess): `request()` returns its wall and CPU seconds, and per-call latencies
    for batch 1."""

    def __init__(self, group: str, name: str, request, examples: int, process, shared_from: str | None = None,
                 kind: str | None = None):
        super().__init__(group, name, None, examples, shared_from=shared_from, kind=kind)
        self._request, self._process = request, process

    def run(self) -> tuple[int, float, float]:
        reply = self._request()
        if "latencies" in reply:
            self.latencies.append(reply["latencies"])
        return self.examples, reply["wall"], reply["cpu"]

    def close(self):
        self._process.close()  # shared by the peer's configurations; closing twice is harmless


def _write_eval_tsv(data_dir: str, count: int, folder: str) -> tuple[str, list[str], list[int]]:
    """The first `count` SST-2 dev rows in a scratch TSV (outside the repo), and their sentences and labels."""
    with open(os.path.join(data_dir, "sst2", "dev.tsv"), encoding="utf-8") as f:
        header, *rows = f.read().splitlines()
    rows = rows[:count]
    path = os.path.join(folder, "dev.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([header] + rows) + "\n")
    pairs = [row.split("\t") for row in rows]
    return path, [p[0] for p in pairs], [int(p[1]) for p in pairs]


def build_serving(setup, encoder_init, data_dir: str, *, eval_examples: int, batch_size: int, latency_calls: int,
                  folder: str, peer_model_fn=None, full_padding_rows: bool = False, bf16_serving: bool = False,
                  serving_intra_op_threads: int = -1) -> tuple[list, list]:
    """Our evaluation/serving configurations (and the peer's with `peer_model_fn(keras_model)`; with
    `full_padding_rows` ours again padded to the full sequence length; with `bf16_serving` the SavedModel
    exported with bf16 kernels, against the peer's bf16 model); returns (configurations, check lines)."""
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import tf_keras  # noqa: PLC0415
    from engine.config import RuntimeConfig, TrainerConfig  # noqa: PLC0415
    from engine.trainer import Trainer  # noqa: PLC0415
    from tasks.encoders import bert  # noqa: PLC0415
    from engine import checkpoints, fusion  # noqa: PLC0415
    from launch import export as export_launcher  # noqa: PLC0415
    from tasks.classification.task import ClassificationConfig, ClassificationTask  # noqa: PLC0415

    path, sentences, _ = _write_eval_tsv(data_dir, eval_examples, folder)
    vocab_file = os.path.join(bert.minilm_dir(), "vocab.txt")
    config = ClassificationConfig(data_files={"validation": path}, encoder=encoder_init, vocab_file=vocab_file,
                                  max_seq_length=setup.seq_length, last_layer_cls_only=setup.last_layer_cls_only)
    singles = sentences[:latency_calls]
    n = len(sentences)
    configs, checks, trainer, results = [], [], None, {}

    def exported_server(task, prefix, precision, name):
        """The checkpoint at `prefix` exported by launch.export's own code, served from a process of its own."""
        exported = task.build_model()
        checkpoints.restore_model(exported, prefix, expected="bench")
        export_dir = export_launcher.save_serving_model(task, exported, os.path.join(folder, name), precision)
        return savedmodel_process.SavedModelProcess(
            export_dir, sentences, None if serving_intra_op_threads < 0 else serving_intra_op_threads)

    def served_batches(server):
        return np.asarray(server.batches(batch_size, values=True)["probabilities"], np.float32)

    def serving_configs(server, group, name, suffix="", kind=None):
        """Timed batches of batch_size and batch-1 calls of a SavedModel's signature, in its server's process."""
        return [RemoteTimed(f"serving batch {batch_size}{group}", f"{name} batch {batch_size}{suffix}",
                            functools.partial(server.batches, batch_size), n, server, kind=kind),
                RemoteTimed(f"serving batch 1{group}", f"{name} batch 1{suffix}",
                            functools.partial(server.singles, len(singles)), len(singles), server, kind=kind)]

    # Ours as it runs (batches cut to their longest sequence), then, with full_padding_rows, padded to seq_length.
    for cut in (True, False) if full_padding_rows else (True,):
        task = ClassificationTask(config, cut_eval_batches=cut)
        kind, suffix = ("ours", "") if cut else ("ours full", f" pad {setup.seq_length}")
        run = Trainer(task, TrainerConfig(model_dir=os.path.join(folder, f"run_{cut}"), train_steps=1,
                                          global_batch_size=batch_size, eval_batch_size=batch_size),
                      engine_vs_fit.optimizer_config(), RuntimeConfig(precision="float32"))
        tf_keras.mixed_precision.set_global_policy("float32")
        if trainer is None:
            trainer = run
        else:
            run.model.set_weights(trainer.model.get_weights())
        # launch.predict and launch.export restore a checkpoint into a freshly built model: do the same.
        prefix = tf.train.Checkpoint(model=run.model).write(os.path.join(folder, f"ckpt_{cut}", "ckpt"))
        model = task.build_model()
        checkpoints.restore_model(model, prefix, expected="bench")
        fusion.for_inference(model)  # as launch.predict.restore_model
        server = exported_server(task, prefix, tf.float32, f"serving_{cut}")
        configs += [
            Timed("evaluate", "Trainer.evaluate" + suffix, run.evaluate, n, kind=kind),
            Timed("predict", "launch.predict path (task.predict)" + suffix,
                  lambda task=task, model=model: task.predict(model, sentences, batch_size=batch_size), n, kind=kind),
        ] + serving_configs(server, "", "SavedModel", suffix, kind)
        served = served_batches(server)
        results[cut] = (run.evaluate(), task.predict(model, sentences, batch_size=batch_size)[1], served)
        if cut and bf16_serving:  # as launch.export --serving_precision=bfloat16
            server16 = exported_server(task, prefix, tf.bfloat16, "serving_bf16")
            configs += serving_configs(server16, " bf16", "SavedModel bf16 kernels")
            served16 = served_batches(server16)
            checks.append(f"SavedModel with bf16 kernels vs float32: largest probability difference "
                          f"{np.max(np.abs(served16 - served)):.2e}")
        if cut:
            ours = results[cut][1]
            checks.append(f"evaluation sentences: the first {n} of SST-2 dev; our evaluate accuracy "
                          f"{results[cut][0]['accuracy']:.4f} (an untrained head: a consistency check only); "
                          f"largest probability difference SavedModel vs predict {np.max(np.abs(served - ours)):.2e}")
    checks.append(f"SavedModel servers' intra-op threads: {server.intra_op_threads} ("
                  + ("as launch.export advises for this host" if serving_intra_op_threads < 0
                     else "--serving_intra_op_threads") + ")")
    if full_padding_rows:
        (cut_eval, cut_predict, cut_served), (full_eval, full_predict, full_served) = results[True], results[False]
        checks.append(f"cut vs padded to {setup.seq_length}: evaluate accuracy {cut_eval['accuracy']:.4f} vs "
                      f"{full_eval['accuracy']:.4f}, loss difference {abs(cut_eval['loss'] - full_eval['loss']):.2e}; "
                      f"largest probability difference predict {np.max(np.abs(cut_predict - full_predict)):.2e}, "
                      f"SavedModel {np.max(np.abs(cut_served - full_served)):.2e}")
    if peer_model_fn is not None:
        import pytorch_peer  # noqa: PLC0415
        task = ClassificationTask(config)
        # Timed in a process of its own, as the training peer (pytorch_peer._PeerProcess says why).
        remote = pytorch_peer.ClassifierProcess(peer_model_fn(trainer.model), bert.minilm_dir(), sentences,
                                                max_length=setup.seq_length, batch_size=batch_size)
        for padding, longest_first, label in (("max_length", False, f"pad {setup.seq_length}"),
                                              ("longest", False, "pad longest"),
                                              ("longest", True, "pad longest, longest first")):
            # Sorting by length is for whole datasets (evaluate, predict); a server answers the batches it gets.
            groups = ("evaluate", "predict") if longest_first else ("evaluate", "predict", f"serving batch {batch_size}")
            for group in groups:
                # One timing serves these groups (the peer's evaluate and predict are the same loop);
                # it is timed once per round, in the first group, and reused for the others.
                configs.append(RemoteTimed(group, f"pytorch inference_mode {label}",
                                           functools.partial(remote.predict, padding, longest_first), n, remote,
                                           shared_from=None if group == "evaluate" else "evaluate"))
            if not longest_first:
                configs.append(RemoteTimed("serving batch 1", f"pytorch inference_mode {label}",
                                           functools.partial(remote.singles, padding, len(singles)), len(singles),
                                           remote))
        if bf16_serving:  # the peer's usual bf16 serving: the whole model in bf16 (pytorch_peer.Classifier)
            label = "pytorch bf16 model pad longest"
            configs += [
                RemoteTimed(f"serving batch {batch_size} bf16", label,
                            functools.partial(remote.predict, "longest", False, precision="bfloat16"), n, remote),
                RemoteTimed("serving batch 1 bf16", label, functools.partial(
                    remote.singles, "longest", len(singles), precision="bfloat16"), len(singles), remote),
            ]
        # The values come from the process that is timed.
        theirs = np.asarray(remote.predict("max_length", False, values=True)["probabilities"])
        theirs_longest_first = np.asarray(remote.predict("longest", True, values=True)["probabilities"])
        encoded = task.tokenizer.encode(tf.constant(sentences))
        ids_ours = encoded["input_word_ids"].numpy()
        # Each batch-1 call's word-pieces, for the latency by sentence length against the peer.
        word_pieces = encoded["input_mask"].numpy().sum(axis=1)[:len(singles)].tolist()
        for timed in configs:
            if timed.group == "serving batch 1":
                timed.word_pieces = word_pieces
        ids_theirs = remote.token_ids("max_length")
        same_ids = int(np.sum(np.all(ids_ours == ids_theirs, axis=1)))
        checks.append(f"same weights: HF tokenizer gives our token ids for {same_ids}/{n} sentences; "
                      f"largest probability difference ours vs peer {np.max(np.abs(ours - theirs)):.2e}")
        checks.append("the peer longest first vs in batches of input order: largest probability difference "
                      f"{np.max(np.abs(theirs_longest_first - theirs)):.2e}")
        if bf16_serving:
            theirs16 = np.asarray(remote.predict("longest", False, precision="bfloat16", values=True)["probabilities"])
            checks.append(f"the peer's bf16 model vs its float32 one: largest probability difference "
                          f"{np.max(np.abs(theirs16 - theirs)):.2e}")
    return configs, checks


# Word-piece ranges for the batch-1 latency by sentence length (latency_by_length).
LENGTH_BUCKETS = ((0, 19), (20, 29), (30, 10**6))


def latency_by_length(word_pieces: list, ours: list, theirs: list) -> list:
    """Per LENGTH_BUCKETS range with calls in it: (label, calls per round, our median ms, the peer's median ms,
    the peer's over ours), over every round's batch-1 calls (`ours`, `theirs`: per round, s per call, in the
    order of `word_pieces`). Where a lead at p50 turns into a miss at p99: the slowest calls are the longest."""
    rows = []
    for low, high in LENGTH_BUCKETS:
        picked = [i for i, n in enumerate(word_pieces) if low <= n <= high]
        if not picked:
            continue
        mine = statistics.median(run[i] for run in ours for i in picked) * 1e3
        peer = statistics.median(run[i] for run in theirs for i in picked) * 1e3
        label = f"{low}-{high}" if high < 10**6 else f"{low}+"
        rows.append((label, len(picked), mine, peer, peer / mine))
    return rows


# ------------------------------------------------------------------------------------ the run

def _side_by_side(configs: list) -> list:
    """The configurations with each group's together (ours first, then the peer's, as built), so that a round times
    both sides of a ratio within a second or two of each other rather than after all of ours: on these shared
    machines one side's speed moved 1.5-2x between minutes (bench/RESULTS.md, 2026-12-06)."""
    first_seen: dict = {}
    for config in configs:
        first_seen.setdefault(config.group, len(first_seen))
    return sorted(configs, key=lambda config: first_seen[config.group])  # stable: the built order within a group


def _paired(a: list, b: list) -> tuple[float, list]:
    per_round = [x / y for x, y in zip(a, b)]
    return statistics.median(per_round), per_round


def _ratio_line(label: str, a: list, b: list, cpu: tuple | None = None) -> str:
    ratio, per_round = _paired(a, b)
    text = f"{label} = {ratio:.3f} (rounds: {', '.join(f'{r:.2f}' for r in per_round)})"
    if cpu:
        text += f" (per CPU-s: {_paired(*cpu)[0]:.3f})"
    return text


def _cpu_description() -> str:
    from engine import precision as precision_lib  # noqa: PLC0415
    name = precision_lib.cpu_model_name()
    return (f"{name}, {os.cpu_count()} cores, native bf16 (avx512_bf16/amx_bf16): "
            f"{'yes' if precision_lib.cpu_has_native_bf16() else 'no'}")


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_benchmark(*, quick: bool, data_dir: str, precisions, steps: int, rounds: int, training: bool = True,
                  fit: bool = True, pytorch: bool = True, torch_compile: bool = True, grad_accum_steps: int = 4,
                  num_examples: int = 256, eval_examples: int = 256, serving_batch_size: int = 32,
                  latency_calls: int = 32, full_padding_rows: bool = False, bf16_serving: bool = True,
                  serving_intra_op_threads: int = -1, last_layer_cls_only: bool = True, output: str | None = None,
                  command: str = "") -> dict:
    """The whole benchmark; returns {"train", "serving", "lines", "markdown"}."""
    import dataclasses  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    from tasks.encoders import bert  # noqa: PLC0415

    started = time.perf_counter()
    setup = engine_vs_fit.make_setup(quick, num_examples, last_layer_cls_only)
    encoder_init = setup.encoder if quick else "minilm"
    flops = engine_vs_fit.train_flops_per_example(setup)
    header = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "CPU": _cpu_description(),
        "load at start": _load(),
        "model": (f"{'tiny random encoder' if quick else 'all-MiniLM-L6-v2'} "
                  f"({setup.encoder.num_hidden_layers} layers, hidden {setup.encoder.hidden_size}), softmax head on "
                  f"{'[CLS], ours computing the last layer for [CLS] only' if last_layer_cls_only else '[CLS]'}; "
                  f"seq {setup.seq_length}, batch {setup.batch_size}"),
        "timing": f"{rounds} interleaved rounds" + (f"; training windows of {steps} steps" if training else
                                                      "; evaluation/serving only (--notraining)")
                  + " after untimed warm-up calls",
    }
    lines: list[str] = []
    have_torch, why = (False, "--nopytorch")
    if pytorch:
        import pytorch_peer  # noqa: PLC0415  (imports no torch by itself)
        have_torch, why = pytorch_peer.available()
    if have_torch:
        header["peer"] = f"{why}, each timed in a process of its own (this one never loads torch)"
    else:
        header["peer"] = NO_PEER.format(why)
    for k, v in header.items():
        print(f"{k}: {v}", flush=True)

    folder = tempfile.mkdtemp(prefix="vs_pytorch_")
    train_task = engine_vs_fit.make_task(dataclasses.replace(setup, encoder=encoder_init), data_dir) if training else None
    opt = engine_vs_fit.optimizer_config()

    def peer_model(keras_model):  # plain data: the peer's process builds the torch model
        if quick:
            return pytorch_peer.model_spec(keras_model, encoder_config=setup.encoder)
        return pytorch_peer.model_spec(keras_model, model_dir=bert.minilm_dir())

    # --- configurations (all built before any timing)
    serving_configs, checks = [], []
    if eval_examples:
        serving_configs, checks = build_serving(
            setup, encoder_init, data_dir, eval_examples=eval_examples, batch_size=serving_batch_size,
            latency_calls=latency_calls, folder=folder, peer_model_fn=peer_model if have_torch else None,
            full_padding_rows=full_padding_rows, bf16_serving=bf16_serving,
            serving_intra_op_threads=serving_intra_op_threads)
    runners = []
    for precision in precisions if training else ():
        if fit:
            runners.append(engine_vs_fit.FitRunner(train_task, setup.batch_size, precision, 1, False))
        runners.append(engine_vs_fit.EngineRunner(train_task, setup.batch_size, precision, False, steps))
        if grad_accum_steps > 1 and precision == precisions[0]:
            runners.append(engine_vs_fit.EngineRunner(train_task, setup.batch_size, precision, False, steps,
                                                      grad_accum_steps=grad_accum_steps))
        if have_torch:
            spec = peer_model(runners[-1].trainer.model if not fit else runners[0].model)  # one for both variants
            for compiled in ([False, True] if torch_compile else [False]):
                runners.append(pytorch_peer.TrainRunnerProcess(  # in a process of its own: see there
                    spec, train_task.features, train_task.labels, batch_size=setup.batch_size,
                    precision=precision, compile_model=compiled, clip_norm=opt.clip_norm,
                    optimizer_kwargs=dict(learning_rate=opt.learning_rate, weight_decay=opt.weight_decay,
                                          beta_1=opt.beta_1, beta_2=opt.beta_2, epsilon=opt.epsilon)))
    for line in checks:
        print(line, flush=True)

    # --- warm-up: tracing, XLA islands, torch.compile; a one-step probe drops hopeless configurations
    windows = {r: [] for r in runners}
    probe = engine_vs_fit.warm_up(runners)
    contenders = []
    for runner in runners:
        fastest = min(probe[r][1] for r in runners if r.precision == runner.precision)
        # The engine and the fastest configuration of each kind (fit, torch) are always timed in the rounds,
        # however slow their probe: a loaded machine can slow one side's single step several-fold. Only a
        # kind's slower variants (torch.compile 3x slower than eager, say) are left at their probe steps.
        best_of_kind = min((r for r in runners if r.precision == runner.precision and r.kind == runner.kind),
                           key=lambda r: probe[r][1])
        kept = runner is best_of_kind or runner.name == "engine"  # the engine: every ratio's numerator
        if not kept and probe[runner][1] > engine_vs_fit.SLOW_FACTOR * fastest:
            windows[runner] = [probe[runner], (1, *runner.run(1))]
            print(f"not a contender ({probe[runner][1] / fastest:.1f}x slower): {runner.precision} | {runner.name}")
        else:
            contenders.append(runner)
    timed_serving = _side_by_side([c for c in serving_configs if c.shared_from is None])
    for config in timed_serving:
        start = time.perf_counter()
        config.run()
        config.latencies.clear()
        print(f"warm-up | {config.group} | {config.name} | {time.perf_counter() - start:.1f} s", flush=True)
    serving_samples = {c: [] for c in serving_configs}
    peaks = {"float32": (0.0, 0.0), "bfloat16": (0.0, 0.0)}

    # --- interleaved rounds
    try:
        for round_index in range(rounds):
            order = 1 if round_index % 2 == 0 else -1
            for runner in contenders[::order]:
                wall, cpu = runner.run(steps)
                windows[runner].append((steps, wall, cpu))
                print(f"round {round_index} | {runner.precision} | {runner.name} | "
                      f"{steps * setup.batch_size / wall:.2f} examples/s | "
                      f"{steps * setup.batch_size / cpu:.2f} examples/CPU-s", flush=True)
            for config in timed_serving[::order]:
                sample = config.run()
                serving_samples[config].append(sample)
                print(f"round {round_index} | {config.group} | {config.name} | {sample[0] / sample[1]:.2f} "
                      f"examples/s", flush=True)
            for config in serving_configs:  # the peer's shared timings, copied into the other groups
                if config not in timed_serving:
                    twin = next(c for c in timed_serving if c.name == config.name and c.group == config.shared_from)
                    serving_samples[config].append(serving_samples[twin][-1])
            for name, dtype in (("float32", tf.float32), ("bfloat16", tf.bfloat16)):
                peaks[name] = tuple(max(a, b) for a, b in zip(peaks[name], engine_vs_fit.matmul_peak_gflops(dtype)))
    finally:
        for runner in runners:
            runner.close()
        for config in serving_configs:
            config.close()
        shutil.rmtree(folder, ignore_errors=True)
    header["load at end"] = _load()
    header["matmul peak (best over rounds)"] = (f"fp32 {peaks['float32'][0]:.0f} GFLOP/s, "
                                               f"bf16 {peaks['bfloat16'][0]:.0f} GFLOP/s")
    header["wall time"] = f"{time.perf_counter() - started:.0f} s"

    # --- training summary
    train_rows = []
    for runner in runners:
        samples = windows[runner]
        wall = [s * setup.batch_size / w for s, w, _ in samples]
        cpu = [s * setup.batch_size / c for s, _, c in samples]
        peak = peaks["bfloat16" if "bfloat16" in runner.precision else "float32"][0] * 1e9
        train_rows.append(dict(runner=runner, precision=runner.precision, config=runner.name, wall_samples=wall,
                               cpu_samples=cpu, wall=statistics.median(wall), cpu=statistics.median(cpu),
                               mfu=flops * statistics.median(wall) / peak if peak else float("nan"),
                               contender=runner in contenders))

    def row(precision, name):
        return next((r for r in train_rows if r["precision"] == precision and r["config"] == name), None)

    def paired_line(label, a, b):
        if not a["contender"] or not b["contender"]:
            return f"{label} = {a['wall'] / b['wall']:.3f} (ratio of medians: one side had only probe steps)"
        return _ratio_line(label, a["wall_samples"], b["wall_samples"], (a["cpu_samples"], b["cpu_samples"]))

    targets = []
    for precision in precisions:
        eng = row(precision, "engine")
        peers = [r for r in train_rows if r["precision"] == precision and r["runner"].kind in ("fit", "torch")]
        for peer in peers:
            lines.append(paired_line(f"{precision}: engine / {peer['config']}", eng, peer))
        torch_rows = [r for r in peers if r["runner"].kind == "torch"]
        if torch_rows:
            best_torch = max(torch_rows, key=lambda r: r["wall"])
            lines.append(paired_line(f"{precision}: engine / best pytorch ({best_torch['config']})", eng, best_torch))
        if peers:
            best_peer = max(peers, key=lambda r: r["wall"])
            lines.append(paired_line(f"{precision}: engine / best peer ({best_peer['config']})", eng, best_peer))
            goal = 1.15 if precision == "float32" else 1.3
            value = float(lines[-1].split(" = ")[1].split()[0])
            targets.append(f"training {precision}: engine / best peer >= {goal}: {value:.3f} "
                           f"{'MET' if value >= goal else 'MISSED'}" + ("" if torch_rows else " (no PyTorch rows)"))
        accum = next((r for r in train_rows if r["precision"] == precision and " accum " in r["config"]), None)
        if accum:
            lines.append(paired_line(f"{precision}: {accum['config']} / engine (same global batch)", accum, eng))
            value = float(lines[-1].split(" = ")[1].split()[0])
            targets.append(f"gradient accumulation: {accum['config']} / engine >= 0.95: {value:.3f} "
                           f"{'MET' if value >= 0.95 else 'MISSED'}")
    fit32 = row("float32", "fit spe=1")
    for precision in precisions[1:]:
        if fit32 and row(precision, "engine"):
            lines.append(paired_line(f"{precision}: engine / float32 fit spe=1", row(precision, "engine"), fit32))

    # --- evaluation and serving summary
    serving_rows = []
    for config in serving_configs:
        samples = serving_samples[config]
        wall = [e / w for e, w, _ in samples]
        cpu = [e / c for e, _, c in samples]
        entry = dict(config=config, group=config.group, name=config.name, wall_samples=wall, cpu_samples=cpu,
                     wall=statistics.median(wall) if wall else float("nan"),
                     cpu=statistics.median(cpu) if cpu else float("nan"))
        if config.latencies:
            entry["p50"], entry["p99"] = _percentiles([x for run in config.latencies for x in run])
            entry["p50_rounds"], entry["p99_rounds"] = zip(*(_percentiles(run) for run in config.latencies))
        serving_rows.append(entry)
    for group in dict.fromkeys(r["group"] for r in serving_rows):
        ours = next(r for r in serving_rows if r["group"] == group and r["config"].kind == "ours")
        theirs = [r for r in serving_rows if r["group"] == group and r["config"].kind == "torch"]
        for full in (r for r in serving_rows if r["group"] == group and r["config"].kind == "ours full"):
            lines.append(_ratio_line(f"{group}: {ours['name']} / {full['name']} (the gain of cutting)",
                                     ours["wall_samples"], full["wall_samples"], (ours["cpu_samples"], full["cpu_samples"])))
        for peer in theirs:
            lines.append(_ratio_line(f"{group}: {ours['name']} / {peer['name']}", ours["wall_samples"],
                                     peer["wall_samples"], (ours["cpu_samples"], peer["cpu_samples"])))
        if theirs:
            best = max(theirs, key=lambda r: r["wall"])
            value, _ = _paired(ours["wall_samples"], best["wall_samples"])
            targets.append(f"{group}: {ours['name']} / best pytorch ({best['name']}) >= 1.2: {value:.3f} "
                           f"{'MET' if value >= 1.2 else 'MISSED'}")
        if "p50" in ours and theirs:
            for q in ("p50", "p99"):  # latency: the peer's over ours, so > 1 means ours answers sooner
                best = min(theirs, key=lambda r, q=q: r[q])
                lines.append(_ratio_line(f"{group}: latency {q} speed-up, {best['name']} / {ours['name']}",
                                         list(best[f"{q}_rounds"]), list(ours[f"{q}_rounds"])))
                value, _ = _paired(list(best[f"{q}_rounds"]), list(ours[f"{q}_rounds"]))
                targets.append(f"{group}: latency {q}, best pytorch ({best['name']}) / ours >= 1.2: {value:.3f} "
                               f"{'MET' if value >= 1.2 else 'MISSED'}")
            best = min(theirs, key=lambda r: r["p50"])
            if ours["config"].word_pieces and best["config"].latencies:
                buckets = latency_by_length(ours["config"].word_pieces, ours["config"].latencies,
                                            best["config"].latencies)
                lines.append(f"{group}: median latency by word-pieces, {best['name']} / {ours['name']}: " + "; ".join(
                    f"{label}: {peer:.1f} / {mine:.1f} ms = {ratio:.3f} ({calls} calls a round)"
                    for label, calls, mine, peer, ratio in buckets))

    text = markdown(header, train_rows, serving_rows, checks, lines, targets)
    print("\n" + text, flush=True)
    if output:
        with open(output, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return {"train": train_rows, "serving": serving_rows, "lines": lines, "targets": targets, "markdown": text}


def _percentiles(latencies) -> tuple[float, float]:
    """(p50, p99) in milliseconds (p99 of a few dozen calls is about the slowest one)."""
    lat = sorted(latencies)
    return 1e3 * lat[len(lat) // 2], 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def markdown(header, train_rows, serving_rows, checks, lines, targets) -> str:
    out = [f"- {k}: {v}" for k, v in header.items()] + [f"- {c}" for c in checks] + [""]
    if train_rows:
        out += ["| precision | training configuration | examples/s (median) | per round | examples/CPU-s | MFU |",
                "| --- | --- | ---: | --- | ---: | ---: |"]
    for r in train_rows:
        out.append(f"| {r['precision']} | {r['config']} | {r['wall']:.2f} | "
                   f"{' / '.join(f'{x:.1f}' for x in r['wall_samples'])} | {r['cpu']:.2f} | {100 * r['mfu']:.1f}% |")
    if serving_rows:
        out += ["", "| group | evaluation / serving configuration | examples/s (median) | per round | "
                "examples/CPU-s | batch-1 latency p50 / p99 |", "| --- | --- | ---: | --- | ---: | ---: |"]
        for r in serving_rows:
            latency = f"{r['p50']:.1f} / {r['p99']:.1f} ms" if "p50" in r else ""
            out.append(f"| {r['group']} | {r['name']} | {r['wall']:.2f} | "
                       f"{' / '.join(f'{x:.1f}' for x in r['wall_samples'])} | {r['cpu']:.2f} | {latency} |")
    out += [""] + [f"- ratio | {line}" for line in lines] + [""] + [f"- target | {t}" for t in targets]
    return "\n".join(out + [""])


def _precisions_for_this_cpu() -> tuple[list, bool]:
    """--precisions and --bf16_serving, bf16 left out by default where the CPU has no native bf16: there bf16 runs
    emulated, slower than float32 on both sides (model.fit took 54 s per bf16 step on an AVX2-only Zen 3 against
    4 s in float32), so its rows would take most of an hour and time nothing a user would run."""
    from engine import precision as precision_lib  # noqa: PLC0415
    precisions, bf16_serving = list(FLAGS.precisions), FLAGS.bf16_serving
    if FLAGS.quick or precision_lib.cpu_has_native_bf16():
        return precisions, bf16_serving
    if not FLAGS["precisions"].present and "mixed_bfloat16" in precisions:
        precisions.remove("mixed_bfloat16")
        print("bf16: this CPU has no native bf16 (avx512_bf16/amx_bf16), so training is timed in float32 only "
              "(--precisions=float32,mixed_bfloat16 times bf16 too)")
    if not FLAGS["bf16_serving"].present and bf16_serving:
        bf16_serving = False
        print("bf16: the bf16 SavedModel is not timed on this CPU (--bf16_serving times it)")
    return precisions, bf16_serving


def main(argv):
    del argv
    precisions, bf16_serving = _precisions_for_this_cpu()
    run_benchmark(quick=FLAGS.quick, data_dir=FLAGS.data_dir, precisions=precisions, steps=FLAGS.steps,
                  rounds=FLAGS.rounds, training=FLAGS.training, fit=FLAGS.fit, pytorch=FLAGS.pytorch,
                  torch_compile=FLAGS.torch_compile, grad_accum_steps=FLAGS.grad_accum_steps,
                  num_examples=FLAGS.num_examples, eval_examples=FLAGS.eval_examples,
                  serving_batch_size=FLAGS.serving_batch_size, latency_calls=FLAGS.latency_calls,
                  full_padding_rows=FLAGS.full_padding_rows, bf16_serving=bf16_serving,
                  serving_intra_op_threads=FLAGS.serving_intra_op_threads,
                  last_layer_cls_only=FLAGS.last_layer_cls_only,
                  output=FLAGS.output,
                  command=" ".join(["python"] + sys.argv))


if __name__ == "__main__":
    app.run(main)
