"""absl-flag programs: train, evaluate (one checkpoint, or a sidecar following a run), predict, export, convert, soup."""
import os

# Same reason as engine/__init__.py: Keras 2 for TF Hub and Model Garden, set before TensorFlow loads.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
