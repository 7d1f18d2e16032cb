"""Where an encoder comes from: `make_encoder(init)` builds a BertConfig or loads pretrained weights from a HF,
TF1/TF2 checkpoint or TF Hub source, and `vocab_file_for(init)` finds its vocab without building it."""
from __future__ import annotations

import os
from typing import Union

import tf_keras

from tasks.encoders import bert
from tasks.encoders.tokenization import WordPieceTokenizer

EncoderInit = Union[bert.BertConfig, str]


def _is_hub_handle(init: str) -> bool:
    return init.startswith(("https://", "http://", "gs://")) or os.path.isfile(os.path.join(init, "saved_model.pb"))


def vocab_file_for(init: EncoderInit) -> str | None:
    """The WordPiece vocab that belongs to `init`, found without building the encoder; None for a BertConfig.

    Tasks tokenize their data before (or without) building the model, so they need this cheaply.
    """
    if isinstance(init, bert.BertConfig):
        return None
    if init == "minilm":
        return os.path.join(bert.minilm_dir(), "vocab.txt")
    if _is_hub_handle(init):
        from tasks.encoders import hub  # noqa: PLC0415 - tensorflow_hub loads only for Hub handles
        return hub.hub_vocab_file(init)
    return bert.vocab_file_in(init)


def tokenizer_for(config, vocab_file: str | None = None) -> WordPieceTokenizer:
    """The WordPiece tokenizer of a Task config (its vocab_file, encoder, lower_case, max_seq_length fields, as
    tasks/options.py declares them): the config's vocab_file, else `vocab_file` (the one make_encoder returned),
    else the vocab that comes with the config's encoder."""
    vocab = config.vocab_file or vocab_file or vocab_file_for(config.encoder)
    if vocab is None:
        raise ValueError(f"a randomly initialised encoder has no vocab: set {type(config).__name__}.vocab_file")
    return WordPieceTokenizer(vocab, lower_case=config.lower_case, seq_length=config.max_seq_length)


def make_encoder(init: EncoderInit, *, output_range: int | None = None) -> tuple[tf_keras.layers.Layer, str | None]:
    """Returns (encoder, vocab_file) for `init`; the encoder is built and maps the dict of int32 [batch, seq]
    `input_word_ids`, `input_mask`, `input_type_ids` to `sequence_output`, `pooled_output`, `encoder_outputs`.

    `init` is one of:
      * a `BertConfig`: random initialisation, vocab_file None;
      * "minilm": the bundled all-MiniLM-L6-v2 (`bert.minilm_dir()`);
      * a HF folder: config.json + model.safetensors + vocab.txt;
      * a checkpoint folder: bert_config.json + vocab.txt + a TF1 google-research/bert checkpoint or the
        TF2 `tf.train.Checkpoint(encoder=...)` written by `tasks.encoders.convert`;
      * a TF Hub handle (https:// URL) or SavedModel folder: a trainable hub.KerasLayer, vocab from its
        `vocab_file` asset (see tasks.encoders.hub).

    `output_range` is BertEncoderV2's (`bert.build_encoder`); a Hub SavedModel has a fixed graph and ignores it.
    """
    if isinstance(init, bert.BertConfig):
        return bert.build_variables(bert.build_encoder(init, output_range=output_range)), None
    if not isinstance(init, str):
        raise TypeError(f"encoder init must be a BertConfig or a str, got {type(init).__name__}")
    directory = bert.minilm_dir() if init == "minilm" else init
    if _is_hub_handle(init):
        from tasks.encoders import hub  # noqa: PLC0415 - tensorflow_hub loads only for Hub handles
        return hub.make_hub_encoder(init)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"encoder {init!r}: expected a BertConfig, 'minilm', a TF Hub https:// handle or "
                                "a folder with pretrained weights, but no such folder exists")
    if os.path.isfile(os.path.join(directory, "model.safetensors")):
        config_file = os.path.join(directory, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{directory}: has model.safetensors but no config.json describing it")
        encoder = bert.build_variables(bert.build_encoder(bert.BertConfig.from_json_file(config_file),
                                                          output_range=output_range))
        bert.load_hf_weights(encoder, os.path.join(directory, "model.safetensors"))
    elif (prefix := bert.checkpoint_prefix(directory)) is not None:
        encoder = bert.from_checkpoint_dir(directory, prefix, output_range=output_range)
    else:
        raise ValueError(f"encoder {init!r}: expected model.safetensors + config.json (HF), a checkpoint + "
                         f"bert_config.json, or saved_model.pb (TF Hub); found {sorted(os.listdir(directory))[:20]}")
    vocab_file = bert.vocab_file_in(directory)
    bert.check_vocab(encoder, vocab_file)
    return encoder, vocab_file
