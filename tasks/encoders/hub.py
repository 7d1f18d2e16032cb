"""TF Hub: BERT encoders and preprocessors as SavedModels, loaded and saved with the standard interface.

Encoder: a dict of int32 [batch, seq] `input_word_ids`, `input_mask`, `input_type_ids` in; `pooled_output`,
`sequence_output`, `encoder_outputs` (and `default` = pooled) out, plus a `vocab_file` asset and a
`do_lower_case` variable (what Model Garden's export_tfhub_lib writes and tfhub.dev's BERTs carry).
Preprocessor: raw strings in via `__call__`; `tokenize` (strings -> [batch, (words), (wordpieces)]) and
`bert_pack_inputs` (1-2 tokenized segments + optional `seq_length=`), as `bert_en_uncased_preprocess`.
"""
from __future__ import annotations

import os
from typing import Mapping

import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (registers the ops that preprocessor SavedModels use)
import tf_keras
from official.nlp.modeling.layers import text_layers
from official.nlp.tools import export_tfhub_lib

from tasks.encoders import bert
from tasks.encoders.tokenization import WordPieceTokenizer

ENCODER_INPUTS = ("input_word_ids", "input_mask", "input_type_ids")
ENCODER_OUTPUTS = ("pooled_output", "sequence_output", "encoder_outputs")


def _load(handle: str, what: str):
    if "://" not in handle and not os.path.isdir(handle):
        raise FileNotFoundError(f"{what} {handle!r}: no such SavedModel folder (expected a tfhub.dev/Kaggle "
                                "URL or a local SavedModel path)")
    try:
        return hub.load(handle)
    except Exception as error:  # noqa: BLE001 - hub/TF raise many types; the handle is what matters
        raise ValueError(f"{what} {handle!r} could not be loaded as a TF2 SavedModel "
                         f"({type(error).__name__}: {error})") from error


def _load_encoder(handle: str):
    loaded = _load(handle, "TF Hub encoder")
    try:
        outputs = loaded(bert.dummy_inputs())
        found = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
    except Exception as error:  # noqa: BLE001 - any failure means: not a BERT encoder interface
        found = f"a call that fails ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if not isinstance(found, list) or not set(ENCODER_OUTPUTS) <= set(found):
        raise ValueError(f"TF Hub encoder {handle!r}: expected a callable taking a dict of int32 "
                         f"{list(ENCODER_INPUTS)} and returning a dict with {list(ENCODER_OUTPUTS)}; found "
                         f"{found}, signatures {sorted(loaded.signatures)}")
    return loaded


def hub_encoder(handle: str, trainable: bool = True) -> hub.KerasLayer:
    """A (by default trainable) `hub.KerasLayer` for a BERT encoder SavedModel following the interface above."""
    return hub.KerasLayer(_load_encoder(handle), trainable=trainable, name="hub_encoder")


def hub_vocab_file(handle: str, loaded=None) -> str:
    """The WordPiece vocab shipped inside an encoder or preprocessor SavedModel."""
    loaded = loaded if loaded is not None else _load(handle, "TF Hub SavedModel")
    asset = getattr(loaded, "vocab_file", None)
    if asset is not None and hasattr(asset, "asset_path"):
        return asset.asset_path.numpy().decode("utf-8")
    path = os.path.join(hub.resolve(handle), "assets", "vocab.txt")
    if os.path.isfile(path):
        return path
    raise ValueError(f"TF Hub SavedModel {handle!r}: expected a `vocab_file` asset (as Model Garden's "
                     "export_tfhub_lib writes) or assets/vocab.txt; found neither")


def make_hub_encoder(handle: str, trainable: bool = True) -> tuple[hub.KerasLayer, str]:
    """(encoder layer, vocab file) for `loading.make_encoder`; the vocab must match the embedding table."""
    loaded = _load_encoder(handle)
    layer = hub.KerasLayer(loaded, trainable=trainable, name="hub_encoder")
    vocab_file = hub_vocab_file(handle, loaded)
    bert.check_vocab(layer, vocab_file)
    return layer, vocab_file


class HubPreprocessor:
    """A loaded preprocessor SavedModel: raw strings (1 or 2 segments) -> the encoder's three inputs."""

    def __init__(self, handle: str, loaded):
        self.handle = handle
        self.tokenize = loaded.tokenize
        self.bert_pack_inputs = loaded.bert_pack_inputs
        self._loaded = loaded  # keeps the restored resources (vocab table) alive

    def __call__(self, *segments: tf.Tensor, seq_length: int | None = None) -> dict[str, tf.Tensor]:
        tokenized = [self.tokenize(tf.convert_to_tensor(s)) for s in segments]
        if seq_length is None:
            return self.bert_pack_inputs(tokenized)
        return self.bert_pack_inputs(tokenized, seq_length=tf.constant(seq_length, tf.int32))


def hub_preprocessor(handle: str) -> HubPreprocessor:
    """Loads a `bert_en_uncased_preprocess`-style SavedModel (needs `tokenize` and `bert_pack_inputs`)."""
    loaded = _load(handle, "TF Hub preprocessor")
    missing = [name for name in ("tokenize", "bert_pack_inputs") if not hasattr(loaded, name)]
    if missing:
        raise ValueError(f"TF Hub preprocessor {handle!r}: expected `tokenize` and `bert_pack_inputs`, "
                         f"missing {missing} (is this an encoder rather than its preprocessor?)")
    return HubPreprocessor(handle, loaded)


def save_encoder(encoder: tf_keras.layers.Layer, export_path: str, *, vocab_file: str,
                 lower_case: bool = True) -> None:
    """Saves an encoder (any make_encoder result) as a TF Hub BERT encoder SavedModel.

    Model Garden's `export_tfhub_lib.export_model` cannot take an in-memory encoder (it builds a V1
    BertEncoder from its own config and restores a checkpoint into it), so this repeats its recipe:
    a functional model with dict inputs/outputs + `default`, the vocab as an asset, `do_lower_case`.
    """
    bert.check_vocab(encoder, vocab_file)
    inputs = {name: tf_keras.Input(shape=(None,), dtype=tf.int32, name=name) for name in ENCODER_INPUTS}
    outputs = dict(encoder(inputs))
    outputs["default"] = outputs["pooled_output"]
    core_model = tf_keras.Model(inputs=inputs, outputs=outputs)
    core_model.vocab_file = tf.saved_model.Asset(vocab_file)
    core_model.do_lower_case = tf.Variable(lower_case, trainable=False)
    core_model.save(export_path, include_optimizer=False, save_format="tf")


class _Preprocessor(tf.Module):
    """The exported preprocessor: our WordPieceTokenizer (HF-identical ids); `bert_pack_inputs` is Model Garden's
    packing layer (TF Hub's interface), whose outputs the default call's packing (tokenization.py) reproduces.

    Not export_tfhub_lib.create_preprocessing: its tokenizer is tf_text.BertTokenizer, whose NFKC
    case folding gives other ids than the tokenizer we train with on some inputs (see tokenization.py).
    """

    def __init__(self, vocab_file: str, lower_case: bool, seq_length: int):
        super().__init__(name="bert_preprocessor")
        tokenizer = WordPieceTokenizer(vocab_file, lower_case=lower_case, seq_length=seq_length)
        self.wordpiece = tokenizer.wordpiece  # tracked: saves the vocab table and its asset
        self.vocab_file = tf.saved_model.Asset(vocab_file)
        self.do_lower_case = tf.Variable(lower_case, trainable=False)
        texts = tf.TensorSpec([None], tf.string)

        @tf.function(input_signature=[texts], autograph=False)
        def tokenize(text):
            return tokenizer.tokenize_with_offsets(text)[0]  # [batch, (words), (wordpieces)] as on TF Hub

        @tf.function(input_signature=[texts], autograph=False)
        def preprocess(text):
            return dict(tokenizer.encode(text))

        self.tokenize = tokenize
        self.__call__ = preprocess
        # Model Garden's wrapper: 1 or 2 segments of ragged rank 1 or 2, and an optional seq_length=.
        self.bert_pack_inputs = export_tfhub_lib.BertPackInputsSavedModelWrapper(text_layers.BertPackInputs(
            seq_length, start_of_sequence_id=tokenizer.cls_id, end_of_segment_id=tokenizer.sep_id,
            padding_id=tokenizer.pad_id))


def save_preprocessor(export_path: str, *, vocab_file: str, lower_case: bool = True,
                      seq_length: int = 128) -> None:
    """Saves the raw-text preprocessor matching an exported encoder as a TF Hub SavedModel."""
    tf.saved_model.save(_Preprocessor(vocab_file, lower_case, seq_length), export_path)

