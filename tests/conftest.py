"""Shared test setup: Keras 2 for Hub/Model Garden, and two logical CPU devices for MirroredStrategy tests.

The CPU split must happen before TensorFlow initialises its devices, so it is done at import time here.
"""
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402,F401  (sets the environment before TensorFlow loads)
from engine.strategy import split_cpu  # noqa: E402

import pytest  # noqa: E402

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


# tf.data iterators that a test leaves to the garbage collector (a Trainer in a reference cycle) are freed
# later, at a random point of another test, and deleting one can wait for its autotuning thread until the end
# of that thread's sleep, which doubles up to 60 s as the iterator ages (stalls of 30-360 s in full runs;
# bench/RESULTS.md, 2026-12-05). The engine and the Tasks turn autotuning off for their own pipelines
# (engine/inputs.without_autotune), but a MirroredStrategy's per-device iterators (MultiDeviceIterator) build
# datasets of their own with it on. So after a test that made one, collect the garbage while it is young.
from tensorflow.python.data.ops import multi_device_iterator_ops  # noqa: E402

_multi_device_iterators = [0]
_make_multi_device_iterator = multi_device_iterator_ops.OwnedMultiDeviceIterator.__init__


def _counted_multi_device_iterator(self, *args, **kwargs):
    _multi_device_iterators[0] += 1
    _make_multi_device_iterator(self, *args, **kwargs)


multi_device_iterator_ops.OwnedMultiDeviceIterator.__init__ = _counted_multi_device_iterator


@pytest.fixture(autouse=True)
def _free_young_distributed_iterators():
    made = _multi_device_iterators[0]
    yield
    if _multi_device_iterators[0] != made:
        gc.collect()


def pytest_collection_modifyitems(items):
    """Test files with slow tests first (their collection order otherwise). `make test` runs two pytest processes
    that take a file at a time (pytest-xdist's loadfile): a long file started last keeps one process busy while
    the other has nothing left (the resume file's two tests take 1.5-2 minutes each)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the rest keep their order
