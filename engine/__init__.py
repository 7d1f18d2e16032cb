"""Task-agnostic training runtime: strategy, precision, optimizer, compiled steps, loops, checkpoints."""
import os
import time

# When a program first imported the engine (launch programs do so first): engine/timing.py's process start where
# /proc cannot say.
IMPORTED_AT = time.monotonic()

# TF Hub and Model Garden need Keras 2 (tf_keras); this must be set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
