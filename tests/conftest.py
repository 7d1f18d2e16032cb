"""Shared test setup: Keras 2 for Hub/Model Garden, and two logical CPU devices for MirroredStrategy tests.

The CPU split must happen before TensorFlow initialises its devices, so it is done at import time here.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402,F401  (sets the environment before TensorFlow loads)
from engine.strategy import split_cpu  # noqa: E402

split_cpu(2)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("DATA_DIR", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))


def write_tiny_encoder_dir(folder) -> str:
    """A converted-checkpoint folder (bert_config.json, vocab.txt, TF2 checkpoint) holding a tiny random encoder
    and its own copy of MiniLM's vocab, as launch/convert.py writes one."""
    import dataclasses  # noqa: PLC0415
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    import tensorflow as tf  # noqa: PLC0415
    from tasks.encoders import bert, loading  # noqa: PLC0415

    config = bert.BertConfig.tiny()
    encoder, _ = loading.make_encoder(config)
    tf.train.Checkpoint(encoder=encoder).write(os.path.join(folder, "encoder"))
    with open(os.path.join(folder, "bert_config.json"), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(config), f)
    shutil.copy(os.path.join(bert.minilm_dir(), "vocab.txt"), os.path.join(folder, "vocab.txt"))
    return str(folder)


def write_sst2_head(folder, rows: int) -> str:
    """The header and first `rows` training rows of SST-2 as folder/train.tsv (small real data for fast tests)."""
    path = os.path.join(str(folder), "train.tsv")
    with open(os.path.join(DATA_DIR, "sst2", "train.tsv"), encoding="utf-8") as f:
        head = "".join(next(f) for _ in range(rows + 1))
    with open(path, "w", encoding="utf-8") as f:
        f.write(head)
    return path


def pytest_collection_modifyitems(items):
    """Test files with slow tests first (their collection order otherwise). `make test` runs two pytest processes
    that take a file at a time (pytest-xdist's loadfile): a long file started last keeps one process busy while
    the other has nothing left (the resume file's two tests take 1.5-2 minutes each)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the rest keep their order
