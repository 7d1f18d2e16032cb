"""Forward+backward CPU time of BERT's elementwise layers, stock TensorFlow kernels vs a small XLA kernel.

  python bench/fusion_kernels.py                 # MiniLM shapes, seq 128, batch 32; about a minute
  python bench/fusion_kernels.py --rounds=5

Why: engine/fusion.py compiles dropout and activation layers with XLA while matmuls stay on oneDNN.
Whether that pays depends on the CPU (and on how well the TF wheel's generic kernels use it), so this
measures each candidate on the machine at hand: dropout on the attention probabilities, GELU on the
FFN activations, and, as controls that fusion.py leaves alone, the masked softmax and LayerNorm.
Stock and XLA alternate within every round; the table gives median process CPU seconds per call
(CPU time, not wall time, so other jobs on a shared machine disturb it little) and stock / XLA.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("rounds", 3, "Alternating stock/XLA timing rounds.")
flags.DEFINE_integer("calls", 5, "Calls per timing window.")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras precision policies.")
FLAGS = flags.FLAGS

BATCH, SEQ, HEADS, HIDDEN, FFN = 32, 128, 12, 384, 1536


def _step(fn, *extra):
    """A compiled forward+backward of sum(fn(x)^2), as a training step would differentiate it."""
    import tensorflow as tf  # noqa: PLC0415

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(fn(x, *extra), tf.float32)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, x)
    return step


def _cpu_seconds(step, x, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        result = step(x)
    result.numpy()
    return (time.process_time() - start) / calls


def candidates(precision: str) -> list:
    """(name, input, stock fn, XLA fn, extra args) for one precision policy."""
    import tensorflow as tf  # noqa: PLC0415
    import tf_keras  # noqa: PLC0415
    from official.nlp.modeling.layers import masked_softmax  # noqa: PLC0415

    from engine import dropout as keyed  # noqa: PLC0415

    tf_keras.mixed_precision.set_global_policy(precision)
    dtype = tf.bfloat16 if "bfloat16" in precision else tf.float32
    probs = tf.cast(tf.random.uniform([BATCH, HEADS, SEQ, SEQ]), dtype)
    ffn = tf.cast(tf.random.normal([BATCH, SEQ, FFN]), dtype)
    hidden = tf.cast(tf.random.normal([BATCH, SEQ, HIDDEN]), dtype)
    mask = tf.ones([BATCH, SEQ, SEQ], tf.int32)

    dropout = tf_keras.layers.Dropout(0.1)
    gelu = tf_keras.layers.Activation("gelu")
    softmax = masked_softmax.MaskedSoftmax(mask_expansion_axes=[1])
    layer_norm = tf_keras.layers.LayerNormalization(epsilon=1e-12)
    layer_norm(hidden)
    tf_keras.mixed_precision.set_global_policy("float32")
    xla = lambda fn: tf.function(fn, jit_compile=True)  # noqa: E731

    def train_dropout(x):
        return dropout(x, training=True)

    def fused_dropout(x):
        return keyed.dropout(x, 0.1, tf.constant([1, 2], tf.int64))  # the keyed XLA kernel the engine runs

    def masked(x, m):
        return softmax(x, m)

    return [
        ("dropout 0.1 [32,12,128,128]", probs, train_dropout, fused_dropout, ()),
        ("GELU (erf) [32,128,1536]", ffn, gelu, xla(gelu.activation), ()),
        ("masked softmax [32,12,128,128] (control)", probs, masked, xla(masked), (mask,)),
        ("LayerNorm [32,128,384] (control)", hidden, layer_norm, xla(layer_norm.call), ()),
    ]


def main(argv):
    del argv
    import tensorflow as tf  # noqa: PLC0415
    from engine import precision as precision_lib  # noqa: PLC0415
    tf.get_logger().setLevel("ERROR")  # every candidate traces its own step function: retracing notes are expected
    print(f"CPU: {precision_lib.cpu_model_name()}, {os.cpu_count()} cores; native bf16: "
          f"{'yes' if precision_lib.cpu_has_native_bf16() else 'no'}", flush=True)
    print("\n| precision | layer | stock CPU-s | XLA CPU-s | stock / XLA |\n| --- | --- | ---: | ---: | ---: |")
    for precision in FLAGS.precisions:
        for name, x, stock_fn, xla_fn, extra in candidates(precision):
            stock, fused = _step(stock_fn, *extra), _step(xla_fn, *extra)
            stock(x).numpy(), fused(x).numpy()  # trace and compile, untimed
            times = {"stock": [], "xla": []}
            for _ in range(FLAGS.rounds):
                times["stock"].append(_cpu_seconds(stock, x, FLAGS.calls))
                times["xla"].append(_cpu_seconds(fused, x, FLAGS.calls))
            s, f = statistics.median(times["stock"]), statistics.median(times["xla"])
            print(f"| {precision} | {name} | {s:.4f} | {f:.4f} | {s / f:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
