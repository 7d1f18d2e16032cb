"""Small JSON files in model_dir, through tf.io.gfile so that gs:// (and ram:// in tests) work like local paths."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Optional

import tensorflow as tf


def write_json(path: str, value: Any) -> None:
    """Writes atomically: a temporary file of a unique name, then a rename over `path`."""
    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(value, indent=1))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path: str) -> Optional[Any]:
    """The parsed file, or None if there is none."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return json.loads(f.read())
