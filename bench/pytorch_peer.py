"""The PyTorch + Hugging Face peer for bench/vs_pytorch.py: what users would run instead of this engine.

`BertForSequenceClassification` loaded from the same all-MiniLM-L6-v2 safetensors the engine's "minilm"
encoder converts (tasks/encoders/bert.py), with the classifier head copied from our Keras model, so both sides
hold the same weights (checked: logits agree). Training: the same pre-tokenized SST-2 batches (our
tokenizer's ids), AdamW with the engine's hyperparameters (lr 2e-5 constant, betas 0.9/0.999, eps 1e-6,
weight decay 0.01 except LayerNorm and biases, global-norm clip 1.0), fp32 or bf16 autocast, eager or
`torch.compile`. Inference: `torch.inference_mode`, raw sentences tokenized by HF's fast tokenizer over
the same vocab (MiniLM's tokenizer.json; same ids as ours, checked), padded to max_length (the engine's
fixed shape) or to the batch's longest sentence (HF's usual `padding=True`).

Only this file imports torch: the engine, tasks and launchers never do. `available()` says whether the
`bench` extra is installed (`pip install -e .[bench]`).
"""
from __future__ import annotations

import os
import time

import numpy as np


def available() -> tuple[bool, str]:
    """(True, versions) when torch and transformers import, else (False, why)."""
    try:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415
    except ImportError as error:
        return False, f"{error}"
    return True, f"torch {torch.__version__}, transformers {transformers.__version__}"


def set_threads(num_threads: int | None = None) -> None:
    import torch  # noqa: PLC0415
    torch.set_num_threads(num_threads or os.cpu_count())


def load_classifier(model_dir: str, keras_model=None, num_labels: int = 2):
    """HF BertForSequenceClassification from `model_dir` (config.json + model.safetensors); with `keras_model`
    (tasks.classification.task's model), its `logits` Dense layer becomes the classifier, so the weights match."""
    from transformers import BertForSequenceClassification, logging as hf_logging  # noqa: PLC0415

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier.* newly initialized" report: we set it just below
    try:
        model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    if keras_model is not None:
        load_classifier_head(model, keras_model)
    return model


def from_config(encoder_config, keras_model=None, num_labels: int = 2):
    """A HF classifier of a tasks.encoders.bert.BertConfig's shape (quick runs), holding `keras_model`'s weights
    (its randomly initialised encoder and head) when given, so both sides compute the same function."""
    import torch  # noqa: PLC0415
    from transformers import BertConfig, BertForSequenceClassification  # noqa: PLC0415

    from tasks.encoders import bert  # noqa: PLC0415
    fields = {k: getattr(encoder_config, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob", "attention_probs_dropout_prob")}
    model = BertForSequenceClassification(BertConfig(num_labels=num_labels, **fields))
    if keras_model is not None:
        encoder, = [layer for layer in keras_model.layers if hasattr(layer, "transformer_layers")]
        state = {name: torch.from_numpy(value) for name, value in bert.hf_weights(encoder).items()}
        missing, unexpected = model.bert.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.endswith("position_ids")]  # a buffer, not a weight
        if missing or unexpected:
            raise ValueError(f"HF BertModel and our encoder differ: missing {missing}, unexpected {unexpected}")
        load_classifier_head(model, keras_model)
    return model


def load_classifier_head(model, keras_model) -> None:
    """The Keras `logits` Dense layer ([hidden, labels] kernel) into HF's classifier Linear ([labels, hidden])."""
    import torch  # noqa: PLC0415
    kernel, bias = keras_model.get_layer("logits").get_weights()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
        model.classifier.bias.copy_(torch.from_numpy(bias))


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
        return float(loss)

    def run(self, steps: int) -> tuple[float, float]:
        start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()  # float(loss) synchronises, as int(steps_done) does on the TF side
        return time.perf_counter() - start[0], time.process_time() - start[1]

    def close(self):
        self.model = self.forward = self.optimizer = None


class Classifier:
    """Raw sentences -> probabilities with the peer in `torch.inference_mode`, tokenization included."""

    def __init__(self, model, tokenizer_dir: str, *, max_length: int, padding: str, longest_first: bool = False):
        import torch  # noqa: PLC0415
        from transformers import AutoTokenizer  # noqa: PLC0415
        self.model = model.eval()
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
