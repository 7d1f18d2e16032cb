"""A dense layer's bias in training on the CPU as our C++ ops (bias_kernel.cc).

add_gelu: the bias add and Keras' exact GELU of the FFN, one pass forward and one backward, which recomputes the
pre-activation from the dense layer's product instead of keeping it. TensorFlow ran them as a bias AddV2 and two
XLA kernels (GELU and its gradient), each a pass over the FFN's [batch x seq, 4 x hidden] (MiniLM's bf16 step
without them at all ran 1.19x). Forward + backward on [4096, 1536]: bf16 6.3-6.7 ms against 12.5-13.4, fp32
7.2-7.3 against 14.0-14.9; the bench's training step ran 1.06x in bf16 and 1.03x in fp32 (AMX Xeon,
bench/RESULTS.md, 2026-12-04). Unlike TensorFlow's AddV2 it does not round x + bias to bfloat16 before the GELU:
one rounding fewer, the same math.

add: a bias alone, where a dense layer adds it apart from its MatMul (bf16 on AMX CPUs, engine/fusion.py), in one
vectorized pass instead of Eigen's portable bf16 AddV2: [4096, 384] 0.57-0.69 ms against 0.85-1.05, [4096, 1536]
1.0 against 2.0; the bench's bf16 step 1.04x (AMX Xeon, bench/RESULTS.md, 2026-12-04).

BERT_ENGINE_NATIVE_BIAS=0 turns both off."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from engine import native

LIBRARY = native.BIAS


def add_gelu(product: tf.Tensor, bias: tf.Tensor):
    """gelu(product + bias) with Keras' exact GELU: product [..., n] in float32 or bfloat16, bias [n] in float32,
    rounded to product's dtype first as Keras' autocast would read it; the bias gradient in float32. None where the
    op cannot run (not a CPU outside XLA, another dtype); the caller then runs the layers."""
    if product.dtype not in (tf.float32, tf.bfloat16) or bias.dtype != tf.float32:
        return None
    module = LIBRARY.load_for(product.device)
    if module is None:
        return None

    @tf.custom_gradient
    def bias_gelu(product, bias):
        return (module.engine_bias_gelu(product, bias),
                lambda upstream: module.engine_bias_gelu_grad(upstream, product, bias))
    return bias_gelu(product, bias)


def add(x: tf.Tensor, bias: tf.Tensor):
    """x + bias (bias: x's trailing shape, in x's dtype) in one vectorized pass, the same bits as TensorFlow's AddV2;
    None where the op cannot run. Forward only: the caller keeps its gradient."""
    if x.dtype not in (tf.float32, tf.bfloat16) or bias.dtype != x.dtype:
        return None
    module = LIBRARY.load_for(x.device)
    if module is None:
        return None
    size = int(np.prod(bias.shape))
    rows = tf.reshape(x, [-1, size])
    return tf.reshape(module.engine_bias_add(rows, tf.cast(tf.reshape(bias, [-1]), tf.float32)), tf.shape(x))
