"""SQuAD's feature cache: model inputs as a TFRecord plus a JSON sidecar, keyed by everything they depend on.

Tokenizing 10k questions with their contexts takes minutes on 2 cores; the cache makes every later run (and
every worker of a multi-worker job on the same host) read them instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Iterable, Mapping, Optional

import numpy as np
import tensorflow as tf

from engine import summaries
from tasks.encoders import tokenization
from tasks.squad import data as squad_data
from tasks.squad.data import FeatureSettings, SquadFeatures

CACHE_FORMAT_VERSION = 1

def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(input_file: str, vocab_file: str, lower_case: bool, settings: FeatureSettings, split: str,
              max_examples: Optional[int] = None) -> str:
    """Changes whenever the input content, vocabulary or any setting that shapes the features changes."""
    # The code that makes features is part of the key: a tokenizer change must not reuse stale ids.
    code = [_file_sha256(m.__file__) for m in (tokenization, squad_data, sys.modules[__name__])]
    parts = dict(version=CACHE_FORMAT_VERSION, code=code, data=_file_sha256(input_file),
                 vocab=_file_sha256(vocab_file), lower_case=lower_case, split=squad_data.canonical_split(split),
                 eval_fraction=squad_data.EVAL_ARTICLE_FRACTION, max_examples=max_examples, **dataclasses.asdict(settings))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "bert_engine", "squad")


def _int_feature(values: Iterable[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _write_tfrecord(path: str, arrays: Mapping[str, np.ndarray], name: str = "squad") -> None:
    # A name of this process's own: the workers of a multi-worker job on one host build the same cache at once.
    tmp = f"{path}.tmp{os.getpid()}"
    total = len(arrays["feature_index"])
    meter = summaries.BatchProgress(name, total, unit="windows cached", file=sys.stderr)
    with tf.io.TFRecordWriter(tmp) as writer:
        for i in range(total):
            features = {k: _int_feature(np.atleast_1d(v[i])) for k, v in arrays.items()}
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
            meter.update(i + 1)
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half cache that looks complete


def _meta_to_json(features: SquadFeatures) -> dict:
    data = features.data
    return dict(
        contexts=data.contexts, skipped_ids=data.skipped_ids, num_articles=data.num_articles,
        examples=[dataclasses.asdict(e) for e in data.examples],
        char_start=[t.char_start.tolist() for t in features.context_tokens],
        char_end=[t.char_end.tolist() for t in features.context_tokens],
        windows=features.windows.tolist(), settings=dataclasses.asdict(features.settings))


def _meta_from_json(meta: dict) -> SquadFeatures:
    examples = [squad_data.SquadExample(e["qas_id"], e["question"], e["context_index"],
                             tuple((t, s) for t, s in e["answers"]), e["article_index"]) for e in meta["examples"]]
    data = squad_data.SquadData(meta["contexts"], examples, meta["skipped_ids"], meta["num_articles"])
    # Ids are not needed after the cache is built (the TFRecord has them); offsets are.
    tokens = [squad_data.TokenizedText(np.zeros([len(s)], np.int32), np.asarray(s, np.int32), np.asarray(e, np.int32))
              for s, e in zip(meta["char_start"], meta["char_end"])]
    return SquadFeatures(data, tokens, np.asarray(meta["windows"], np.int32).reshape([-1, 4]),
                         FeatureSettings(**meta["settings"]), from_cache=True)


def cached_features(input_file: str, split: str, *, vocab_file: str, lower_case: bool = True,
                    settings: FeatureSettings = FeatureSettings(),
                    cache_dir: Optional[str] = None, max_examples: Optional[int] = None) -> tuple[SquadFeatures, str]:
    """Features of `split`, built once and then read from `cache_dir`. Returns (features, tfrecord path)."""
    cache_dir = cache_dir or default_cache_dir()
    squad_data.require_file(input_file)
    key = cache_key(input_file, vocab_file, lower_case, settings, split, max_examples)
    stem = os.path.join(cache_dir, f"{os.path.basename(input_file)}.{squad_data.canonical_split(split)}.{key}")
    record_path, meta_path = stem + ".tfrecord", stem + ".meta.json"
    if os.path.isfile(record_path) and os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return _meta_from_json(json.load(f)), record_path
    os.makedirs(cache_dir, exist_ok=True)
    tokenizer = squad_data.OffsetTokenizer(vocab_file, lower_case=lower_case)
    name = f"squad features of {os.path.basename(input_file)} ({split})"
    data = squad_data.read_squad(input_file, split, max_examples)
    features = squad_data.build_features(data, tokenizer, settings, name=name)
    _write_tfrecord(record_path, features.arrays, name=name)
    with open(f"{meta_path}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
        json.dump(_meta_to_json(features), f)
    os.replace(f"{meta_path}.tmp{os.getpid()}", meta_path)
    logging.info("cached %d SQuAD features of %s (%s) in %s", features.num_features, input_file, split, record_path)
    return features, record_path


def parse_batch_fn(max_seq_length: int):
    """tf.data map function: a batch of serialized tf.train.Examples -> (features, labels)."""
    spec = {k: tf.io.FixedLenFeature([max_seq_length], tf.int64)
            for k in ("input_word_ids", "input_mask", "input_type_ids")}
    spec.update({k: tf.io.FixedLenFeature([], tf.int64) for k in ("start_positions", "end_positions", "feature_index")})

    def parse(records: tf.Tensor):
        parsed = {k: tf.cast(v, tf.int32) for k, v in tf.io.parse_example(records, spec).items()}
        features = {k: parsed[k] for k in ("input_word_ids", "input_mask", "input_type_ids")}
        # Positions are the labels; the window index rides along for post-processing, never enters the model.
        labels = {k: parsed[k] for k in ("start_positions", "end_positions", "feature_index")}
        return features, labels
    return parse
