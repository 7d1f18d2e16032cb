"""Task-agnostic training runtime: strategy, precision, optimizer, compiled steps, loops, checkpoints."""
import os
import time

# When a program first imported the engine (launch programs do so first): engine/timing.py's process start where
# /proc cannot say.
IMPORTED_AT = time.monotonic()

# TF Hub and Model Garden need Keras 2 (tf_keras); this must be set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow 2.20 turns its oneDNN graph rewrites and kernels on by default only on CPUs with AVX-512 VNNI or newer.
# On an AVX2-only AMD Zen 3 they made a float32 training step 1.18x and task.predict 1.17x faster (bench/RESULTS.md,
# 2026-12-07), so programs that import the engine turn them on everywhere unless TF_ENABLE_ONEDNN_OPTS is set.
# An exported SavedModel's serving host decides for itself (there batch-1 calls were slower with them: README).
# A process started by an engine program inherits that setting; ONEDNN_DEFAULT_MARKER, set beside it, tells it the
# engine chose it, not the user, so its serving-host view (engine/host.py) is the parent's. Without it a child (a
# pytest-xdist worker, a bench's server, a launch program a test starts) took the parent's default for the user's.
ONEDNN_DEFAULT_MARKER = "BERT_ENGINE_DEFAULTED_ONEDNN_OPTS"
ONEDNN_OPTS_DEFAULTED = ("TF_ENABLE_ONEDNN_OPTS" not in os.environ
                         or os.environ.get(ONEDNN_DEFAULT_MARKER) == os.environ["TF_ENABLE_ONEDNN_OPTS"])
if "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = os.environ[ONEDNN_DEFAULT_MARKER] = "1"
