"""Shared test setup: Keras 2 for Hub/Model Garden, and two logical CPU devices for MirroredStrategy tests.

The CPU split must happen before TensorFlow initialises its devices, so it is done at import time here.
"""
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402,F401  (sets the environment before TensorFlow loads)
from engine.strategy import split_cpu  # noqa: E402

split_cpu(2)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("DATA_DIR", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))
