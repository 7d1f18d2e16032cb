"""One dense layer's matmul, TensorFlow (as engine/fusion.py's dense layers run it) vs PyTorch, per shape and dtype.

  python bench/matmul_kernels.py                       # MiniLM's projection shapes, float32 and bfloat16
  python bench/matmul_kernels.py --quick --nopytorch   # a smoke run

For each [rows, in] x [in, out] shape: TensorFlow's MatMul + BiasAdd (grappler fuses the two into one oneDNN call,
`_MklNativeFusedMatMul`, which is what our dense layers run), TensorFlow's plain MatMul without the bias, and
PyTorch's `F.linear` with bias in `torch.inference_mode` (the peer's nn.Linear; bf16 weights cast once, as a model
kept in bf16 would be). Each figure is ms per call: a loop of --repeats calls inside one tf.function (in Python
for PyTorch), each on a new input (x + i), minus the same loop without the matmul. --kernels (on by default) names
the oneDNN implementation each TensorFlow variant ran (`ONEDNN_VERBOSE`, in a second process): on an Intel Xeon
with AMX the fused bf16 call ran `inner_product x64:gemm:jit` (no AMX) while the plain MatMul ran
`brg_matmul:avx10_1_512_amx` (bench/RESULTS.md, 2026-12-04). The PyTorch column needs the bench extra.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["800x384x384", "800x384x1536", "800x1536x384", "4096x384x384", "4096x384x1536",
                             "4096x1536x384"], "rows x in x out: SST-2 batches of 32 x ~25 tokens, and 32 x 128.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_integer("repeats", 50, "Calls per timed loop.")
flags.DEFINE_integer("rounds", 3, "Timed loops per variant (the fastest is kept), interleaved across variants.")
flags.DEFINE_bool("pytorch", True, "Time PyTorch's F.linear too (needs `pip install -e .[bench]`).")
flags.DEFINE_bool("kernels", True, "Also name the oneDNN implementation of each TensorFlow variant.")
flags.DEFINE_bool("quick", False, "Tiny shapes, one round: a smoke run.")
flags.DEFINE_bool("verbose_pass", False, "Internal: the --kernels pass (one call per variant, markers printed).")

VARIANTS = ("tf MatMul+BiasAdd (fused)", "tf MatMul", "pytorch F.linear")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        rows, fan_in, fan_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--shapes: {text!r} is not rows x in x out, e.g. 800x384x384") from None
    return rows, fan_in, fan_out


def tf_loops(shape, dtype: str, repeats: int) -> dict:
    """The TensorFlow variants (and their baseline) as zero-argument tf.functions of `repeats` calls each."""
    import tensorflow as tf  # noqa: PLC0415
    rows, fan_in, fan_out = shape
    x = tf.cast(tf.random.normal([rows, fan_in]), dtype)
    kernel = tf.Variable(tf.random.normal([fan_in, fan_out]) / fan_in ** 0.5)
    bias = tf.Variable(tf.random.normal([fan_out]))

    def loop(body):
        @tf.function
        def run():
            total = tf.constant(0.0)
            for i in tf.range(repeats):  # a new input each call, so no call's result is reused
                total += tf.cast(body(x + tf.cast(i, x.dtype))[0, 0], tf.float32)
            return total
        return run
    # Variables cast to the compute dtype per call, as Keras' autocast does under a mixed policy.
    return {
        VARIANTS[0]: loop(lambda v: tf.nn.bias_add(tf.matmul(v, tf.cast(kernel, dtype)), tf.cast(bias, dtype))),
        VARIANTS[1]: loop(lambda v: tf.matmul(v, tf.cast(kernel, dtype))),
        "baseline": loop(lambda v: v),
    }


def torch_loops(shape, dtype: str, repeats: int) -> dict:
    import torch  # noqa: PLC0415
    rows, fan_in, fan_out = shape
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    x = torch.randn(rows, fan_in).to(torch_dtype)
    weight = (torch.randn(fan_out, fan_in) / fan_in ** 0.5).to(torch_dtype)
    bias = torch.randn(fan_out).to(torch_dtype)

    def loop(body):
        def run():
            with torch.inference_mode():
                for i in range(repeats):
                    body(x + i)
        return run
    return {VARIANTS[2]: loop(lambda v: torch.nn.functional.linear(v, weight, bias)), "baseline": loop(lambda v: v)}


def best_seconds(fn, rounds: int) -> list:
    fn()  # trace / warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def kernel_names() -> dict:
    """{(dtype, shape text, variant): oneDNN implementation(s)} from a second process under ONEDNN_VERBOSE=1."""
    argv = [sys.executable, os.path.abspath(__file__), "--verbose_pass", "--nopytorch", "--nokernels",
            "--repeats=2", "--rounds=1", f"--shapes={','.join(FLAGS.shapes)}", f"--dtypes={','.join(FLAGS.dtypes)}"]
    if FLAGS.quick:
        argv.append("--quick")
    out = subprocess.run(argv, env=dict(os.environ, ONEDNN_VERBOSE="1"), capture_output=True, text=True,
                         check=True).stdout
    # oneDNN flushes each verbose line, and the markers are flushed too, so lines follow their marker.
    names, current = collections.defaultdict(set), None
    for line in out.splitlines():
        if line.startswith("=== "):
            current = tuple(line[4:].split(" | ")) if " | " in line else None
        elif current and ",exec,cpu," in line:
            fields = line.split(",")
            names[current].add(" ".join(filter(None, fields[5:7])))  # primitive kind, implementation
    return {k: ", ".join(sorted(v)) for k, v in names.items()}


def main(argv):
    del argv
    import tensorflow as tf  # noqa: PLC0415
    tf.get_logger().setLevel("ERROR")  # each shape's loops are new tf.functions: retracing is the point
    shapes = ["64x32x32", "64x32x128"] if FLAGS.quick else FLAGS.shapes
    rounds = 1 if FLAGS.quick else FLAGS.rounds
    for dtype in FLAGS.dtypes:
        if dtype not in ("float32", "bfloat16"):
            raise app.UsageError(f"--dtypes: {dtype!r} is neither float32 nor bfloat16")
    have_torch = False
    if FLAGS.pytorch:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import pytorch_peer  # noqa: PLC0415  (imports no torch by itself)
        have_torch, why = pytorch_peer.available()
        print(f"peer: {why}" if have_torch else f"peer: NOT RUN ({why}); install the bench extra for it", flush=True)
        if have_torch:
            pytorch_peer.set_threads()
    if FLAGS.verbose_pass:
        for dtype in FLAGS.dtypes:
            for text in shapes:
                for name, fn in tf_loops(parse_shape(text), dtype, FLAGS.repeats).items():
                    print("=== tracing", flush=True)  # the first call's kernels are not counted
                    fn()
                    print(f"=== {dtype} | {text} | {name}", flush=True)
                    fn()
        return
    names = kernel_names() if FLAGS.kernels else {}
    print("| dtype | rows x in x out | variant | ms per call | GFLOP/s | vs pytorch | oneDNN implementation |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for dtype in FLAGS.dtypes:
        for text in shapes:
            shape = parse_shape(text)
            loops = {("tf", k): v for k, v in tf_loops(shape, dtype, FLAGS.repeats).items()}
            if have_torch:
                loops.update({("torch", k): v for k, v in torch_loops(shape, dtype, FLAGS.repeats).items()})
            times = {k: [] for k in loops}
            for _ in range(rounds):  # interleaved: every variant once per round
                for key, fn in loops.items():
                    times[key] += best_seconds(fn, 1)
            per_call = {}
            for (side, name), t in times.items():
                if name != "baseline":
                    per_call[name] = max(min(t) - min(times[(side, "baseline")]), 1e-9) / FLAGS.repeats * 1e3
            flop = 2 * shape[0] * shape[1] * shape[2]
            for name, ms in per_call.items():
                ratio = f"{per_call[VARIANTS[2]] / ms:.2f}" if VARIANTS[2] in per_call else ""
                # Three significant digits: --quick's tiny shapes take well under a microsecond net, which a
                # fixed 3 decimals printed as 0.000.
                print(f"| {dtype} | {text} | {name} | {ms:.3g} | {flop / ms / 1e6:.0f} | {ratio} | "
                      f"{names.get((dtype, text, name), '')} |", flush=True)


if __name__ == "__main__":
    app.run(main)
