"""Our C++ ops for the CPU (engine/*.cc), each compiled once per environment against the installed TensorFlow.

Why our own: TensorFlow 2.20 has no fused AdamW, its XLA CPU code leaves dropout's Philox numbers unvectorized, it
runs softmax and LayerNorm in training as many passes, and attention over sentences of several lengths only on the
padded layout; the ops here do those jobs in one multi-threaded pass (adamw_kernel.py, dropout.py, layer_norm.py
and attention.token_attention say what each gains).

A library is built from source on first use (about 10 s each; `make setup` does it ahead, or `python -m
engine.native`) with the C++ compiler in $CXX (default g++) against the installed TensorFlow's headers, into the
environment (`<sys.prefix>/share/bert-engine`, else ~/.cache/bert-engine), named by a hash of the source and
engine/*.h, TensorFlow's version and the flags, so a new TensorFlow or a changed kernel builds anew. Where one
cannot be built or loaded, or with its switch (e.g. BERT_ENGINE_FUSED_ADAMW=0) off, its users run TensorFlow's
kernels: the same numbers, slower. GPU and TPU tensors always do (the ops are CPU-only), and so does code that XLA
compiles.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import tensorflow as tf
from absl import logging

# -ffp-contract=off: no fused multiply-add, which would round differently from TensorFlow's kernels.
# -fno-math-errno: lets loops with sqrt vectorize (no errno to set; the results are the same).
# -fno-trapping-math: lets loops with float compares and selects vectorize (no floating-point exception is ever
# observed; the results are the same).
# No -march: a library must run on any CPU of the platform TensorFlow itself supports (a kernel that needs wider
# vectors picks them at load time with GCC's target_clones).
OPT_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared", "-w"]


class BuildError(RuntimeError):
    """A kernel could not be compiled (no compiler, missing headers); the message ends with the compiler's."""


def _compiler() -> list:
    return shlex.split(os.environ.get("CXX", "g++"))


def _flags() -> list:
    return OPT_FLAGS + tf.sysconfig.get_compile_flags()


def usable_on(device: str) -> bool:
    """Whether our ops can run on `device` (a variable's or tensor's, possibly empty) in the code being traced now:
    a CPU, outside XLA (which has no kernel for them)."""
    spec = tf.DeviceSpec.from_string(device or "")
    if spec.device_type not in (None, "CPU"):
        return False
    if spec.device_type is None and tf.config.list_logical_devices("GPU"):
        return False
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import
    return not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


class Library:
    """One engine/<name>.cc compiled into its own library; `load()` gives the op module or None."""

    def __init__(self, name: str, *, switch: str, description: str, fallback: str):
        self.name, self.switch, self.description, self.fallback = name, switch, description, fallback
        self.source = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.cc")
        self._lock = threading.Lock()
        self._loaded: dict = {}

    def enabled(self) -> bool:
        return os.environ.get(self.switch, "1").strip().lower() not in ("0", "false", "no", "off")

    def library_path(self) -> str:
        """Where the built library for this source, TensorFlow and compiler flags lives (it may not exist yet)."""
        key = hashlib.sha256()
        for path in [self.source] + sorted(glob.glob(os.path.join(os.path.dirname(self.source), "*.h"))):
            with open(path, "rb") as f:  # the source and the headers it may include (engine/*.h)
                key.update(f.read())
        key.update(" ".join([tf.__version__, tf.sysconfig.get_build_info().get("cpu_compiler", "")]
                            + _compiler() + _flags()).encode())
        filename = f"{self.name}-{key.hexdigest()[:16]}.so"
        for folder in (os.path.join(sys.prefix, "share", "bert-engine"),
                       os.path.join(os.path.expanduser("~"), ".cache", "bert-engine")):
            if os.path.exists(os.path.join(folder, filename)):
                return os.path.join(folder, filename)
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError:
                continue
            if os.access(folder, os.W_OK):
                return os.path.join(folder, filename)
        raise BuildError(f"no writable folder for the {self.description} (tried the environment's share/ and "
                         "~/.cache)")

    def build(self) -> str:
        """Compiles the source into library_path() (atomically, so concurrent workers cannot load half a file)."""
        path = self.library_path()
        fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        command = _compiler() + _flags() + [self.source, "-o", partial] + tf.sysconfig.get_link_flags()
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:  # no compiler at all
            os.unlink(partial)
            raise BuildError(f"{command[0]}: {e.strerror}") from None
        if result.returncode != 0:
            os.unlink(partial)
            tail = " | ".join(line for line in result.stderr.strip().splitlines()[-3:])
            raise BuildError(f"{command[0]} exited with {result.returncode}: {tail}")
        os.replace(partial, path)
        return path

    # Not converted by AutoGraph: the wrappers call this while a tf.function traces, and converting the build's
    # subprocess and file code only printed warnings about it.
    @tf.autograph.experimental.do_not_convert
    def load(self):
        """The loaded op module, building it first if needed; None where disabled or unbuildable (logged once)."""
        if not self.enabled():
            return None
        with self._lock:
            if "module" not in self._loaded:
                self._loaded["module"] = self._build_and_load()
            return self._loaded["module"]

    def load_for(self, device: str):
        """load() where our ops can run on `device` (usable_on: a CPU, outside XLA), else None."""
        return self.load() if usable_on(device) else None

    def _build_and_load(self):
        try:
            path = self.library_path()
            if not os.path.exists(path):
                logging.info("Building the %s (once per environment): %s", self.description, path)
                start = time.perf_counter()
                path = self.build()
                logging.info("Built the %s in %.1f s", self.description, time.perf_counter() - start)
            return tf.load_op_library(path)
        except (BuildError, tf.errors.NotFoundError, OSError) as e:
            logging.warning("%s unavailable (%s); using %s", self.description[0].upper() + self.description[1:],
                            e, self.fallback)
            return None

    def ensure_built(self) -> bool:
        """Builds the library if it is not there yet, saying so on stdout; False (and why, on stderr) if it cannot."""
        path = self.library_path()
        if os.path.exists(path):
            print(f"{self.description}: already built, {path}")
            return True
        start = time.perf_counter()
        try:
            path = self.build()
        except BuildError as e:
            print(f"{self.description}: not built ({e}); using {self.fallback}", file=sys.stderr)
            return False
        print(f"{self.description}: built in {time.perf_counter() - start:.1f} s, {path}")
        return True


# Every library of ours; engine/adamw_kernel.py, engine/dropout.py, engine/attention.py, engine/layer_norm.py and
# engine/bias.py call their ops.
ADAMW = Library("adamw_kernel", switch="BERT_ENGINE_FUSED_ADAMW", description="fused AdamW kernel",
                fallback="TensorFlow's Adam and decay kernels: same results, slower updates")
DROPOUT = Library("dropout_kernel", switch="BERT_ENGINE_NATIVE_DROPOUT", description="dropout kernel",
                  fallback="TensorFlow's ops for dropout: the same masks, slower")
LAYER_NORM = Library("layer_norm_kernel", switch="BERT_ENGINE_NATIVE_LAYER_NORM", description="LayerNorm kernel",
                     fallback="TensorFlow's ops for LayerNorm in training: the same math, slower")
BIAS = Library("bias_kernel", switch="BERT_ENGINE_NATIVE_BIAS", description="bias kernel",
               fallback="TensorFlow's bias add and XLA's GELU in training: the same math, slower")
ATTENTION = Library("attention_kernel", switch="BERT_ENGINE_NATIVE_ATTENTION", description="token attention kernel",
                    fallback="TensorFlow's ops for attention at inference: the same math, slower")
LIBRARIES = (ADAMW, DROPOUT, LAYER_NORM, BIAS, ATTENTION)


def main(argv: Optional[list] = None) -> int:
    """`python -m engine.native`: build (or find) every library and say where; exit 1 if one cannot be built."""
    del argv
    # Side by side: each build is a compiler process (~8-10 s each here), so the cores share the work.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(Library.ensure_built, LIBRARIES))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
