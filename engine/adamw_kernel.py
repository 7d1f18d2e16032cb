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

It is built on first use like every op of engine/native.py (`python -m engine.native` builds them ahead). Where
it cannot be built or loaded, or with BERT_ENGINE_FUSED_ADAMW=0, FusedAdamW uses TensorFlow's kernels: the same
numbers, slower. GPU and TPU variables always do (the kernel is CPU-only).
"""
from __future__ import annotations

import sys
from typing import Optional

import tensorflow as tf

from engine import native

LIBRARY = native.ADAMW
ENV_SWITCH = LIBRARY.switch
BuildError = native.BuildError


def load():
    """The loaded op module, building it first if needed; None where disabled or unbuildable (logged once)."""
    return LIBRARY.load()


def usable_for(variable) -> bool:
    """Whether the kernel can update this variable: float32, on a CPU, outside XLA (which has no kernel for it)."""
    return variable.dtype == tf.float32 and native.usable_on(variable.device)


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
    return 0 if LIBRARY.ensure_built() else 1


if __name__ == "__main__":
    sys.exit(main())
