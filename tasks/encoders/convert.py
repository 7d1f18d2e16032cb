"""Converts pretrained BERT weights (HF safetensors, google-research/bert TF1 checkpoints) to our TF2 layout.

The output folder is what `tasks.encoders.loading.make_encoder(output_dir)` loads: `bert_config.json`, `vocab.txt`
and `bert_model.ckpt` written by `tf.train.Checkpoint(encoder=encoder)`, i.e. object-based and independent
of Keras variable names, like Model Garden's own TF2 BERT checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import tensorflow as tf
import tf_keras

from tasks.encoders import bert, loading

CHECKPOINT_NAME = "bert_model.ckpt"


def write_encoder_dir(encoder: tf_keras.layers.Layer, config: bert.BertConfig, vocab_file: str,
                      output_dir: str) -> str:
    """Writes encoder weights, its config and its vocab to `output_dir`; returns the checkpoint prefix."""
    bert.check_vocab(encoder, vocab_file)  # a mismatched vocab is caught now, not at training time
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "bert_config.json"), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    if os.path.abspath(vocab_file) != os.path.abspath(os.path.join(output_dir, "vocab.txt")):
        shutil.copyfile(vocab_file, os.path.join(output_dir, "vocab.txt"))
    return tf.train.Checkpoint(encoder=encoder).write(os.path.join(output_dir, CHECKPOINT_NAME))


def _existing_file(path: str, what: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path} (pass {flag})")
    return path


def convert_hf(checkpoint: str, output_dir: str, *, bert_config: str | None = None,
               vocab_file: str | None = None) -> str:
    """HF BertModel -> TF2 folder. `checkpoint` is a HF folder or a `.safetensors` file; config.json and
    vocab.txt default to the ones next to it. Returns the written checkpoint prefix."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    weights = os.path.join(checkpoint, "model.safetensors") if os.path.isdir(checkpoint) else checkpoint
    _existing_file(weights, "HF safetensors weights", "--checkpoint=HF_FOLDER_OR_FILE.safetensors")
    return _convert(bert_config or os.path.join(folder, "config.json"), "HF config.json",
                    vocab_file or os.path.join(folder, "vocab.txt"),
                    lambda encoder: bert.load_hf_weights(encoder, weights), output_dir)


def convert_tf1(checkpoint_prefix: str, output_dir: str, *, bert_config: str | None = None,
                vocab_file: str | None = None) -> str:
    """google-research/bert TF1 checkpoint (`bert_model.ckpt` prefix) -> TF2 folder; bert_config.json and
    vocab.txt default to the ones next to the checkpoint, as in Google's released zips."""
    folder = os.path.dirname(checkpoint_prefix)
    if not tf.io.gfile.exists(checkpoint_prefix + ".index"):
        raise FileNotFoundError(f"TF1 checkpoint not found: {checkpoint_prefix}.index "
                                "(pass --checkpoint=PREFIX, e.g. uncased_L-12_H-768_A-12/bert_model.ckpt)")
    return _convert(bert_config or os.path.join(folder, "bert_config.json"), "bert_config.json",
                    vocab_file or os.path.join(folder, "vocab.txt"),
                    lambda encoder: bert.load_tf1_weights(encoder, checkpoint_prefix), output_dir)


def _convert(config_path: str, config_name: str, vocab_path: str, load_weights, output_dir: str) -> str:
    """Checks the config and vocab exist, builds the encoder, loads its weights, writes the TF2 folder."""
    config = bert.BertConfig.from_json_file(_existing_file(config_path, config_name, "--bert_config"))
    vocab_file = _existing_file(vocab_path, "vocab.txt", "--vocab_file")
    encoder, _ = loading.make_encoder(config)
    load_weights(encoder)
    return write_encoder_dir(encoder, config, vocab_file, output_dir)
