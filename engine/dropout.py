"""Dropout whose mask is a function of (seed, update, micro-batch, replica, layer): exact resume.

Keras' Dropout draws from a stateful RNG that no checkpoint holds, so a resumed run drops different
units than the uninterrupted one would have, and its losses drift apart (measured on MiniLM: 3e-3 in
the loss after 5 updates). Here the train step opens `keys(step_key(...))` around the forward pass, and
each rebound Dropout layer draws `stateless_uniform(seed=fold_in(key, layer, call))`: the same update
on the same replica always drops the same units, whether or not the process restarted in between.

Masks still differ between replicas and micro-batches (each folds in its own index), and two layers
never share one. Outside a `keys` block (e.g. `model.fit` on a rebound model) a layer falls back to the
stateful draw, like the stock layer.

Semantics are those of `tf_keras.layers.Dropout` without noise_shape: keep with probability 1 - rate,
scale by 1 / (1 - rate); the gradient reuses the mask. Each keep decision compares a 16-bit uniform with
the rate rounded to the nearest 1/65536 (rate 0.1 drops 10.0006%; stock bf16 dropout draws bf16 uniforms,
whose coarse grid drops 10.14%), two decisions per 32-bit Philox output: half the random numbers a
float32 uniform per unit needs, the mask's main cost. With `xla=True` mask and scaling run as one small
XLA kernel (faster on CPU, see engine/fusion.py).

On the CPU, outside XLA, the forward pass is instead our C++ op (dropout_kernel.cc, built by engine/native.py):
the same masks and values bit for bit, with Philox vectorized, which XLA's CPU code does not do. The
[32, 12, 128, 128] attention dropout took 6.2 ms against XLA's 9.6 in bf16, and the bench's training step
ran 1.044x in bf16, 1.031x in float32 on the AMX Xeon (bench/RESULTS.md, 2026-12-04). The gradient stays the
XLA kernel (a masked scale, as fast in C++). BERT_ENGINE_NATIVE_DROPOUT=0 turns the op off.

The attention's dropout goes further (softmax_dropout, called by engine/attention.py): Keras' masked softmax and this
dropout as one C++ pass and their gradient as another, with the masks a keyed layer would draw.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional

import tensorflow as tf
import tf_keras

from engine import native

LIBRARY = native.DROPOUT
_ALG = "philox"  # named, not "auto_select": the same bits on every device and in XLA or not
_context = threading.local()


def step_key(seed: int, update: tf.Tensor, replica: tf.Tensor) -> tf.Tensor:
    """The RNG key of one update on one replica; fold in the micro-batch index with `fold_in`."""
    key = tf.constant([seed, 0x5EED], tf.int64)
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(update, tf.int64), alg=_ALG)
    return tf.random.experimental.stateless_fold_in(key, tf.cast(replica, tf.int64), alg=_ALG)


def fold_in(key: tf.Tensor, data) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)


@contextlib.contextmanager
def keys(key: tf.Tensor):
    """Within this block (at trace time) rebound Dropout layers draw from `key`, folded with their own id."""
    previous = getattr(_context, "state", None)
    _context.state = (key, {})  # (key, calls so far per layer: a layer called twice gets two masks)
    try:
        yield
    finally:
        _context.state = previous


def _layer_key(layer_id: int) -> Optional[tf.Tensor]:
    state = getattr(_context, "state", None)
    if state is None:
        return None
    key, calls = state
    call = calls.get(layer_id, 0)
    calls[layer_id] = call + 1
    return fold_in(fold_in(key, layer_id), call)


_GRID = 1 << 16  # keep decisions are 16-bit uniforms


def _threshold(rate: float) -> int:
    """The 16-bit uniforms below this are dropped: the rate on the 1/65536 grid (keep_mask and the C++ op agree)."""
    return round(rate * _GRID)


def keep_mask(shape, key: tf.Tensor, rate: float) -> tf.Tensor:
    """A bool mask of `shape`, True with probability 1 - round(rate * 65536) / 65536, from `key` ([2] int64).

    Each 32-bit Philox output gives two units their 16-bit uniforms: the high halves go to the first half of the
    units (in row-major order), the low halves to the second. Split by shift, mask and concat, this fuses into
    the XLA kernel: the [32, 12, 128, 128] attention mask (with the select) took 9.7 ms against 14.0 for a
    float32 uniform per unit on the AMX Xeon; a bitcast to uint16 pairs did not fuse and took 20 ms
    (bench/RESULTS.md, 2026-12-04)."""
    size = tf.reduce_prod(shape)
    bits = tf.random.stateless_uniform(tf.reshape((size + 1) // 2, [1]), seed=key, dtype=tf.uint32, minval=None,
                                       maxval=None, alg=_ALG)
    halves = tf.concat([tf.bitwise.right_shift(bits, tf.constant(16, tf.uint32)),
                        tf.bitwise.bitwise_and(bits, tf.constant(_GRID - 1, tf.uint32))], 0)
    return tf.reshape(halves[:size] >= tf.constant(_threshold(rate), tf.uint32), shape)


@functools.lru_cache(maxsize=None)
def _kernels(rate: float, xla: bool):
    scale = 1.0 / (1.0 - rate)

    def forward(x, key):
        keep = keep_mask(tf.shape(x), key, rate)
        return tf.where(keep, x * tf.cast(scale, x.dtype), tf.zeros_like(x)), keep

    def backward(grad, keep):
        return tf.where(keep, grad * tf.cast(scale, grad.dtype), tf.zeros_like(grad))

    return tf.function(forward, jit_compile=xla), tf.function(backward, jit_compile=xla)


def dropout(x: tf.Tensor, rate: float, key: Optional[tf.Tensor] = None, *, xla: bool = True) -> tf.Tensor:
    """Inverted dropout of `x` at `rate` (training mode); the mask from `key` ([2] int64), else stateful."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate {rate} must be in [0, 1)")
    if rate == 0.0:
        return tf.identity(x)
    forward, backward = _kernels(float(rate), xla)
    if key is None:  # the stateful fallback: a key from the global generator
        key = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)

    module = LIBRARY.load_for(x.device) if x.dtype in (tf.float32, tf.bfloat16) else None

    @tf.custom_gradient
    def masked(x):
        if module is None:
            y, keep = forward(x, key)
        else:  # the same bits as `forward` (dropout_kernel.cc): Philox keyed as stateless_uniform keys it
            philox_key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=key)
            y, keep = module.engine_keyed_dropout(x, philox_key, counter, threshold=_threshold(rate),
                                                  scale=1.0 / (1.0 - rate))
        return y, lambda grad: backward(grad, keep)

    return masked(x)


def softmax_dropout(logits: tf.Tensor, mask: Optional[tf.Tensor], layer: tf_keras.layers.Dropout):
    """Keras' masked softmax of attention logits [batch, heads, queries, keys] (mask [batch, queries, keys]), then
    `layer`, a Dropout that `rebind` keyed, in training, as one C++ pass (dropout_kernel.cc) and its gradient as
    another: (dropped, probabilities). The dropped values equal the keyed layer's on the op's probabilities, bit
    for bit (the same key: this counts as the layer's call). None where the op cannot run (not a CPU outside XLA,
    another dtype or layout, no mask, a layer not keyed); the caller then runs the layers."""
    layer_id = getattr(layer, "_engine_keyed_id", None)
    if (layer_id is None or mask is None or logits.dtype not in (tf.float32, tf.bfloat16) or logits.shape.rank != 4
            or mask.shape.rank != 3):
        return None
    module = LIBRARY.load_for(logits.device)
    if module is None:
        return None
    key = _layer_key(layer_id)
    if key is None:  # the stateful fallback, as _keyed_call's
        key = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
    philox_key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=key)
    shape = tf.shape(logits)  # the op takes the mask as [batch, queries, keys]; Keras' add would broadcast it
    mask = tf.broadcast_to(tf.cast(mask, tf.float32), tf.stack([shape[0], shape[2], shape[3]]))
    scale = 1.0 / (1.0 - layer.rate)

    @tf.custom_gradient
    def fused(logits):
        dropped, probabilities = module.engine_softmax_dropout(logits, mask, philox_key, counter,
                                                               threshold=_threshold(layer.rate), scale=scale)

        def gradient(upstream, upstream_of_probabilities):
            grad = module.engine_softmax_dropout_grad(upstream, probabilities, dropped, scale=scale)
            if not _is_zero_fill(upstream_of_probabilities):  # the probabilities were used (as attention scores)
                used = upstream_of_probabilities * probabilities
                grad += used - probabilities * tf.reduce_sum(used, axis=-1, keepdims=True)
            return grad
        return (dropped, probabilities), gradient

    return fused(logits)


def _is_zero_fill(tensor) -> bool:
    """Whether `tensor` is the zeros TensorFlow's graph-mode gradient fills in for an output nothing used."""
    if tensor is None:
        return True
    op = getattr(tensor, "op", None)  # eager tensors have none
    return op is not None and op.type == "Fill" and tf.get_static_value(op.inputs[1]) == 0


def _keyed_call(layer: tf_keras.layers.Dropout, layer_id: int, xla: bool, inputs, training=None):
    if training is None:
        training = tf_keras.backend.learning_phase()
    return tf.__internal__.smart_cond.smart_cond(
        training, lambda: dropout(inputs, layer.rate, _layer_key(layer_id), xla=xla), lambda: tf.identity(inputs))


def rebind(model: tf.Module, *, xla: bool) -> int:
    """Rebinds the model's plain Dropout layers (rate > 0, no noise_shape) to keyed dropout; returns how many.

    Layer ids are positions in `model.submodules`, the same in every process that builds the same model.
    Only this model's layer instances change, not the class."""
    count = 0
    for layer_id, layer in enumerate(model.submodules):
        if type(layer) is tf_keras.layers.Dropout and layer.noise_shape is None and layer.rate > 0:
            layer.call = functools.partial(_keyed_call, layer, layer_id, xla)
            layer._engine_keyed_id = layer_id  # for softmax_dropout, which draws this layer's masks
            count += 1
    return count
