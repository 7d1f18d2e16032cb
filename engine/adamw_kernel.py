"""A one-pass AdamW kernel for float32 variables on the CPU (adamw_kernel.cc), compiled once per environment.

Why our own kernel: TensorFlow has no fused AdamW. Applied with its kernels, one AdamW update with a clipped
gradient reads and writes every weight five times: the clip's Mul, the decoupled decay
(`ResourceApplyGradientDescent`, which first copies the variable because its delta is a read of the same
variable) and `ResourceApplyAdam`'s separate passes over m, v and the weight. On MiniLM that was ~70 ms of op time
per update, as much as every matmul of the demo's step, where PyTorch's fused AdamW makes one pass (bench/RESULTS.md).
XLA's version of the one-pass update runs on one CPU thread and was slower. So this kernel does the clip scaling,
the decay and Adam in one multi-threaded pass, with the same float operations as those TensorFlow kernels, so its
results equal theirs bit for bit (tests/test_adamw_kernel.py). A second op takes an embedding's gradient as the
rows a batch touched, so the 47 MB dense gradient of MiniLM's word embedding is never built.

It is built from source on first use (about 10 s; `make setup` does it ahead, or `python -m engine.adamw_kernel`)
with the C++ compiler in $CXX (default g++) against the installed TensorFlow's headers, into the environment
(`<sys.prefix>/share/bert-engine`, else ~/.cache/bert-engine), named by a hash of the source, TensorFlow's version
and the flags, so a new TensorFlow or a changed kernel builds anew. Where it cannot be built or loaded, or with
BERT_ENGINE_FUSED_ADAMW=0, FusedAdamW uses TensorFlow's kernels: the same numbers, slower. GPU and TPU variables
always do (the kernel is CPU-only).
"""
from __future__ import annotations

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

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adamw_kernel.cc")
ENV_SWITCH = "BERT_ENGINE_FUSED_ADAMW"
# -ffp-contract=off: no fused multiply-add, which would round differently from TensorFlow's kernels.
# -fno-math-errno: lets the loop's sqrt vectorize (no errno to set; the results are the same).
# No -march: the library must run on any CPU of the platform TensorFlow itself supports.
OPT_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-w"]

_lock = threading.Lock()
_loaded: dict = {}


class BuildError(RuntimeError):
    """The kernel could not be compiled (no compiler, missing headers); the message ends with the compiler's."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> list:
    return shlex.split(os.environ.get("CXX", "g++"))


def _flags() -> list:
    return OPT_FLAGS + tf.sysconfig.get_compile_flags()


def library_path() -> str:
    """Where the built library for this source, TensorFlow and compiler flags lives (it may not exist yet)."""
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(" ".join([tf.__version__, tf.sysconfig.get_build_info().get("cpu_compiler", "")]
                        + _compiler() + _flags()).encode())
    name = f"adamw_kernel-{key.hexdigest()[:16]}.so"
    for folder in (os.path.join(sys.prefix, "share", "bert-engine"),
                   os.path.join(os.path.expanduser("~"), ".cache", "bert-engine")):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return os.path.join(folder, name)
    raise BuildError("no writable folder for the kernel library (tried the environment's share/ and ~/.cache)")


def build() -> str:
    """Compiles the kernel into library_path() (atomically, so concurrent workers cannot load half a file)."""
    path = library_path()
    folder = os.path.dirname(path)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    command = _compiler() + _flags() + [SOURCE, "-o", partial] + tf.sysconfig.get_link_flags()
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


def load():
    """The loaded op module, building it first if needed; None where disabled or unbuildable (logged once)."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _build_and_load()
        return _loaded["module"]


def _build_and_load():
    try:
        path = library_path()
        if not os.path.exists(path):
            logging.info("Building the fused AdamW kernel (once per environment): %s", path)
            start = time.perf_counter()
            path = build()
            logging.info("Built the fused AdamW kernel in %.1f s", time.perf_counter() - start)
        return tf.load_op_library(path)
    except (BuildError, tf.errors.NotFoundError, OSError) as e:
        logging.warning("Fused AdamW kernel unavailable (%s); using TensorFlow's Adam and decay kernels: same "
                        "results, slower updates", e)
        return None


def usable_for(variable) -> bool:
    """Whether the kernel can update this variable: float32, on a CPU, outside XLA (which has no kernel for it)."""
    if variable.dtype != tf.float32:
        return False
    device = tf.DeviceSpec.from_string(variable.device or "")
    if device.device_type not in (None, "CPU"):
        return False
    if device.device_type is None and tf.config.list_logical_devices("GPU"):
        return False
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import
    return not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def apply(module, *, variable, m, v, grad, grad_scale, lr, beta1_power, beta2_power, beta1, beta2, epsilon, decay):
    """One AdamW update of `variable` (and its slots m, v) in place; the arguments as in adamw_kernel.cc."""
    return module.engine_fused_adam_w(
        var=variable.handle, m=m.handle, v=v.handle, grad=grad, grad_scale=grad_scale, lr=lr,
        beta1_power=beta1_power, beta2_power=beta2_power, beta1=beta1, beta2=beta2, epsilon=epsilon, decay=decay)


def apply_rows(module, *, variable, m, v, rows, indices, grad_scale, lr, beta1_power, beta2_power, beta1, beta2,
               epsilon, decay):
    """The same update for a gradient given as `rows` of the variable at unique `indices` (zero elsewhere), as a
    deduplicated tf.IndexedSlices holds it: every row is updated, without building the dense gradient."""
    return module.engine_fused_adam_w_rows(
        var=variable.handle, m=m.handle, v=v.handle, rows=rows, indices=indices, grad_scale=grad_scale, lr=lr,
        beta1_power=beta1_power, beta2_power=beta2_power, beta1=beta1, beta2=beta2, epsilon=epsilon, decay=decay)


def main(argv: Optional[list] = None) -> int:
    """`python -m engine.adamw_kernel`: build (or find) the kernel and say where; exit 1 if it cannot be built."""
    del argv
    path = library_path()
    if os.path.exists(path):
        print(f"fused AdamW kernel: already built, {path}")
        return 0
    start = time.perf_counter()
    try:
        path = build()
    except BuildError as e:
        print(f"fused AdamW kernel: not built ({e}); training will use TensorFlow's kernels (same results, slower)",
              file=sys.stderr)
        return 1
    print(f"fused AdamW kernel: built in {time.perf_counter() - start:.1f} s, {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
