"""The PyTorch + Hugging Face peer for bench/vs_pytorch.py: what users would run instead of this engine.

`BertForSequenceClassification` loaded from the same all-MiniLM-L6-v2 safetensors the engine's "minilm"
encoder converts (tasks/encoders/bert.py), with the classifier head copied from our Keras model, so both sides
hold the same weights (checked: logits agree). Training: the same pre-tokenized SST-2 batches (our
tokenizer's ids), AdamW with the engine's hyperparameters (lr 2e-5 constant, betas 0.9/0.999, eps 1e-6,
weight decay 0.01 except LayerNorm and biases, global-norm clip 1.0), fp32 or bf16 autocast, eager or
`torch.compile`. Inference: `torch.inference_mode`, raw sentences tokenized by HF's fast tokenizer over
the same vocab (MiniLM's tokenizer.json; same ids as ours, checked), padded to max_length (the engine's
fixed shape) or to the batch's longest sentence (HF's usual `padding=True`).

The engine, tasks and launchers never import torch. Nor does bench/vs_pytorch.py's own process: its peer runs
in processes of its own (_PeerProcess), built there from model_spec's plain arrays. `available()` says whether
the `bench` extra is installed (`pip install -e .[bench]`) without importing it.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from child_process import ChildProcess, answer_requests


def available() -> tuple[bool, str]:
    """(True, versions) when torch and transformers are installed, else (False, why). Imports neither: the
    bench's own process never loads torch (see _PeerProcess)."""
    import importlib.metadata  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            return False, f"No module named '{name}'"
    version = importlib.metadata.version
    return True, f"torch {version('torch')}, transformers {version('transformers')}"


def set_threads(num_threads: int | None = None) -> None:
    import torch  # noqa: PLC0415
    torch.set_num_threads(num_threads or os.cpu_count())


def model_spec(keras_model, *, model_dir: str | None = None, encoder_config=None) -> dict:
    """What it takes to build the peer of `keras_model` (tasks.classification.task's model), as plain data, so a
    process without torch can hand it over: the HF model from `model_dir` (config.json + model.safetensors, the
    files our "minilm" encoder converts), or of `encoder_config`'s shape (a tasks.encoders.bert.BertConfig; quick
    runs) holding our randomly initialised encoder's weights; either way with our classifier head."""
    kernel, bias = keras_model.get_layer("logits").get_weights()
    arrays = {"head/kernel": kernel, "head/bias": bias}
    if model_dir:
        return {"model_dir": model_dir, "arrays": arrays}
    from tasks.encoders import bert  # noqa: PLC0415
    encoder, = [layer for layer in keras_model.layers if hasattr(layer, "transformer_layers")]
    arrays.update({"encoder/" + name: value for name, value in bert.hf_weights(encoder).items()})
    fields = {k: getattr(encoder_config, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob", "attention_probs_dropout_prob")}
    return {"config": fields, "arrays": arrays}


def build_model(spec: dict):
    """The HF BertForSequenceClassification that model_spec describes, with the same weights as our model
    (checked by the bench: probabilities agree)."""
    import torch  # noqa: PLC0415
    from transformers import BertConfig, BertForSequenceClassification, logging as hf_logging  # noqa: PLC0415
    arrays = spec["arrays"]
    kernel, bias = arrays["head/kernel"], arrays["head/bias"]
    if "model_dir" in spec:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "classifier.* newly initialized" report: we set it just below
        try:
            model = BertForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=kernel.shape[1])
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        model = BertForSequenceClassification(BertConfig(num_labels=kernel.shape[1], **spec["config"]))
        prefix = "encoder/"
        state = {k[len(prefix):]: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k.startswith(prefix)}
        missing, unexpected = model.bert.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.endswith("position_ids")]  # a buffer, not a weight
        if missing or unexpected:
            raise ValueError(f"HF BertModel and our encoder differ: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():  # our Dense kernel is [hidden, labels], HF's Linear weight [labels, hidden]
        model.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(kernel).T)))
        model.classifier.bias.copy_(torch.from_numpy(np.asarray(bias)))
    return model


def make_adamw(model, *, learning_rate: float, weight_decay: float, beta_1: float, beta_2: float,
               epsilon: float, fused: bool = True):
    """torch AdamW with the engine's split: no decay on LayerNorm parameters and biases.

    fused=True: torch's single-kernel CPU AdamW (the fastest variant it has; the default is a per-tensor loop).
    """
    import torch  # noqa: PLC0415
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta_1, beta_2), eps=epsilon, fused=fused)


class TrainRunner:
    """Training steps of the peer over in-memory batches: forward (autocast in bf16), loss, backward,
    clip_grad_norm_, AdamW step. `run(steps)` returns (wall, CPU) seconds, as the bench's other runners."""

    kind = "torch"

    def __init__(self, model, features: dict, labels: np.ndarray, *, batch_size: int, precision: str,
                 compile_model: bool, optimizer_kwargs: dict, clip_norm: float):
        import torch  # noqa: PLC0415
        self.precision = precision
        self.jit = compile_model
        self.name = "pytorch " + ("compile" if compile_model else "eager")
        self.model = model.train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.optimizer = make_adamw(self.model, **optimizer_kwargs)
        self.clip_norm = clip_norm
        self.batch_size = batch_size
        self.autocast_dtype = torch.bfloat16 if "bfloat16" in precision else None
        # The same batches in the same order as the TF side's `dataset.repeat().batch(batch_size)`.
        self.ids = torch.from_numpy(np.asarray(features["input_word_ids"], np.int64))
        self.mask = torch.from_numpy(np.asarray(features["input_mask"], np.int64))
        self.types = torch.from_numpy(np.asarray(features["input_type_ids"], np.int64))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64))
        self.position = 0
        self.last_loss = float("nan")

    def _batch(self):
        n = len(self.labels)
        if self.position + self.batch_size > n:
            self.position = 0
        s = slice(self.position, self.position + self.batch_size)
        self.position += self.batch_size
        return self.ids[s], self.mask[s], self.types[s], self.labels[s]

    def step(self) -> float:
        import torch  # noqa: PLC0415
        ids, mask, types, labels = self._batch()
        if self.autocast_dtype is not None:
            with torch.autocast("cpu", dtype=self.autocast_dtype):
                logits = self.forward(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        else:
            logits = self.forward(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def run(self, steps: int) -> tuple[float, float]:
        start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.last_loss = self.step()  # float(loss) synchronises, as int(steps_done) does on the TF side
        return time.perf_counter() - start[0], time.process_time() - start[1]

    def close(self):
        self.model = self.forward = self.optimizer = None


class Classifier:
    """Raw sentences -> probabilities with the peer in `torch.inference_mode`, tokenization included."""

    def __init__(self, model, tokenizer_dir: str, *, max_length: int, padding: str, longest_first: bool = False,
                 precision: str = "float32"):
        import torch  # noqa: PLC0415
        from transformers import AutoTokenizer  # noqa: PLC0415
        # bfloat16: a bf16 copy of the whole model, as `from_pretrained(..., dtype=torch.bfloat16)` serves it
        # (LayerNorm and softmax in bf16 too). Autocast instead would cast the float32 weights on every call.
        self.model = (copy.deepcopy(model).to(torch.bfloat16) if precision == "bfloat16" else model).eval()
        # The folder's tokenizer.json (its vocab is vocab.txt, uncased). Not BertTokenizerFast(vocab_file=...):
        # in transformers 5 that ignores the file and maps nearly everything to [UNK].
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.max_length = max_length
        self.padding = padding  # "max_length" (the engine's fixed shape) or "longest" (HF's padding=True)
        # predict: tokenize all sentences once, run them longest first (each batch padded by tokenizer.pad, as
        # DataCollatorWithPadding does) and answer in input order: what our evaluate and predict do.
        self.longest_first = longest_first
        self._torch = torch

    def encode(self, sentences):
        return self.tokenizer(list(sentences), padding=self.padding, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def probabilities(self, sentences) -> np.ndarray:
        return self._probabilities(self.encode(sentences))

    def _probabilities(self, batch) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(**batch).logits
            return torch.softmax(logits.float(), dim=-1).numpy()

    def predict(self, sentences, batch_size: int) -> np.ndarray:
        if not self.longest_first:
            return np.concatenate([self.probabilities(sentences[i:i + batch_size])
                                   for i in range(0, len(sentences), batch_size)])
        encoded = self.tokenizer(list(sentences), truncation=True, max_length=self.max_length)
        order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")
        probabilities = None
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            batch = self.tokenizer.pad({k: [v[r] for r in rows] for k, v in encoded.items()},
                                       padding=self.padding, max_length=self.max_length, return_tensors="pt")
            answer = self._probabilities(batch)
            if probabilities is None:
                probabilities = np.empty([len(order), answer.shape[1]], np.float32)
            probabilities[rows] = answer
        return probabilities


_FEATURES = ("input_word_ids", "input_mask", "input_type_ids")  # the training arrays TrainRunner reads


class _PeerProcess:
    """The peer in a process of its own, which does nothing but the peer's work, on request.

    Why: inside bench/vs_pytorch.py's process (TensorFlow's models, tf.data pipelines and threads beside it)
    PyTorch eager trained up to a third slower, and unsteadily, than in a process of its own (bf16 21-34 against
    33-37 examples/s; bench/RESULTS.md, 2026-12-04): a handicapped peer. The bench's own process never loads
    torch at all, so neither side's timings share a process with the other runtime's allocator and thread pools.
    The child gets model_spec's weights (numpy), arrays and settings through files, builds the peer itself,
    then answers one JSON line per request; it times its work itself (wall, and CPU as its own process time),
    so the pipe costs nothing measured. Requests come one at a time between ours, so the rounds stay
    interleaved."""

    _REPLY = "@pytorch_peer "  # marks protocol lines: libraries may print to the child's stdout too

    def __init__(self, spec: dict, settings: dict, arrays: dict):
        self._folder = tempfile.mkdtemp(prefix="pytorch_peer_")
        np.savez(os.path.join(self._folder, "weights.npz"), **spec["arrays"])
        np.savez(os.path.join(self._folder, "arrays.npz"), **arrays)
        settings = dict(settings, model={k: v for k, v in spec.items() if k != "arrays"})
        with open(os.path.join(self._folder, "settings.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f)
        self._child = ChildProcess([sys.executable, os.path.abspath(__file__), self._folder], self._REPLY,
                                   "the PyTorch peer")

    def ask(self, request: dict) -> dict:
        return self._child.ask(request)

    def close(self) -> int:
        """Ends the child (end of requests) and returns its exit code."""
        returncode = self._child.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        return returncode


class TrainRunnerProcess:
    """A TrainRunner in a process of its own (see _PeerProcess), with TrainRunner's interface. `seed` seeds torch
    just before the child builds the runner, as a caller of TrainRunner can, so both draw the same dropout masks."""

    kind = "torch"

    def __init__(self, spec: dict, features: dict, labels: np.ndarray, *, batch_size: int, precision: str,
                 compile_model: bool, optimizer_kwargs: dict, clip_norm: float, seed: int = 0):
        self.precision, self.jit = precision, compile_model
        self.name = "pytorch " + ("compile" if compile_model else "eager")
        self.last_loss = float("nan")
        arrays = {k: np.asarray(features[k]) for k in _FEATURES}
        self._process = _PeerProcess(spec, dict(role="train", batch_size=batch_size, precision=precision,
                                                 compile_model=compile_model, optimizer_kwargs=optimizer_kwargs,
                                                 clip_norm=clip_norm, seed=seed),
                                     dict(arrays, labels=np.asarray(labels)))

    def run(self, steps: int) -> tuple[float, float]:
        reply = self._process.ask({"steps": steps})
        self.last_loss = reply["loss"]
        return reply["wall"], reply["cpu"]

    def close(self) -> int:
        return self._process.close()


class ClassifierProcess:
    """Classifiers (one per padding mode) over fixed sentences in a process of its own (see _PeerProcess).
    `predict(...)` times Classifier.predict over all sentences; `singles(...)` times the first `count` sentences
    one call each. Both return {"wall", "cpu"} seconds, `singles` also "latencies" (s per call). `token_ids(...)`
    is HF's tokenization of the sentences (untimed), for checking it against ours."""

    def __init__(self, spec: dict, tokenizer_dir: str, sentences: list[str], *, max_length: int, batch_size: int):
        self._process = _PeerProcess(spec, dict(role="classify", tokenizer_dir=tokenizer_dir, sentences=sentences,
                                                 max_length=max_length, batch_size=batch_size), {})

    def predict(self, padding: str, longest_first: bool, *, precision: str = "float32", values: bool = False) -> dict:
        """values=True: the reply holds the "probabilities" too (computed in the timed call, sent after it)."""
        return self._process.ask({"predict": dict(padding=padding, longest_first=longest_first, precision=precision),
                                  "values": values})

    def singles(self, padding: str, count: int, *, precision: str = "float32") -> dict:
        return self._process.ask({"singles": dict(padding=padding, count=count, precision=precision)})

    def token_ids(self, padding: str) -> np.ndarray:
        return np.asarray(self._process.ask({"token_ids": dict(padding=padding)})["token_ids"])

    def close(self) -> int:
        return self._process.close()


def _serve(folder: str) -> None:
    """The child of _PeerProcess: loads what the parent wrote, then answers one request per line of stdin."""
    import torch  # noqa: PLC0415
    with open(os.path.join(folder, "settings.json"), encoding="utf-8") as f:
        settings = json.load(f)
    set_threads()
    model = build_model(dict(settings["model"], arrays=dict(np.load(os.path.join(folder, "weights.npz")))))
    arrays = np.load(os.path.join(folder, "arrays.npz"))
    if settings["role"] == "train":
        torch.manual_seed(settings["seed"])
        runner = TrainRunner(model, {k: arrays[k] for k in _FEATURES},
                             arrays["labels"], batch_size=settings["batch_size"], precision=settings["precision"],
                             compile_model=settings["compile_model"], optimizer_kwargs=settings["optimizer_kwargs"],
                             clip_norm=settings["clip_norm"])
    else:
        classifiers, sentences = {}, settings["sentences"]

        def classifier(padding, longest_first=False, precision="float32"):
            key = (padding, longest_first, precision)
            if key not in classifiers:
                classifiers[key] = Classifier(model, settings["tokenizer_dir"], max_length=settings["max_length"],
                                              padding=padding, longest_first=longest_first, precision=precision)
            return classifiers[key]

    def handle(request: dict) -> dict:
        start = time.perf_counter(), time.process_time()
        reply = {}
        if "steps" in request:
            runner.run(request["steps"])
            reply["loss"] = runner.last_loss
        elif "predict" in request:
            probabilities = classifier(**request["predict"]).predict(sentences, settings["batch_size"])
        elif "token_ids" in request:
            reply["token_ids"] = classifier(**request["token_ids"]).encode(sentences)["input_ids"].tolist()
        else:
            clf, reply["latencies"] = classifier(request["singles"]["padding"],
                                                 precision=request["singles"]["precision"]), []
            for sentence in sentences[:request["singles"]["count"]]:
                t = time.perf_counter()
                clf.probabilities([sentence])
                reply["latencies"].append(time.perf_counter() - t)
        reply.update(wall=time.perf_counter() - start[0], cpu=time.process_time() - start[1])
        if request.get("values"):
            reply["probabilities"] = probabilities.tolist()
        return reply
    answer_requests(_PeerProcess._REPLY, handle)


if __name__ == "__main__":
    _serve(sys.argv[1])
