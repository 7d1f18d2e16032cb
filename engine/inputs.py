"""Distributed input: the train iterator and exact, padded evaluation batches."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import tensorflow as tf


def longest_first(mask: np.ndarray) -> np.ndarray:
    """The order of examples, longest first (stable), from their [n, length] 0/1 padding mask.

    Batches cut to their longest sequence then hold sentences of similar length: on SST-2 dev about 1.7x fewer
    tokens than batches in file order (bench/RESULTS.md). Longest first, so the widest batch (most memory) comes
    first rather than at the end of a long evaluation."""
    return np.argsort(-np.asarray(mask).sum(axis=1), kind="stable")


def longest_first_batches(features: dict, batch_size: int, cut: Optional[Callable[[dict], dict]] = None):
    """Yields (rows, batch) over in-memory [n, ...] `features` (with an "input_mask"), longest first: `rows` are
    the batch's indices into `features` (to put answers back in input order), `batch` its rows as tensors,
    passed through `cut` when given (e.g. `cut_to_longest`; None keeps max_seq_length: TPU-built models).

    What each Task's `predict` runs over its examples, as its evaluation batches do. The cut works on the NumPy
    rows, before they become tensors: as eager TensorFlow ops on the tensors, cutting and converting a batch of
    32 took 1.5-1.7 ms instead of 0.2 (1-2 % of `task.predict` over SST-2 sentences; bench/RESULTS.md,
    2026-12-06)."""
    order = longest_first(features["input_mask"])
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        batch = {k: np.asarray(v)[rows] for k, v in features.items()}
        yield rows, {k: tf.convert_to_tensor(v) for k, v in (cut(batch) if cut else batch).items()}


def pad_batch(features, labels, batch_size: int):
    """Pads a (possibly partial) batch to `batch_size` rows; the mask is 1 for real examples, 0 for padding.

    Static shapes mean one trace and one XLA compile for the whole evaluation, and the mask makes the
    padding contribute nothing, so the last partial batch is evaluated exactly.
    """
    size = tf.shape(tf.nest.flatten(features)[0])[0]

    def pad(t):
        t = tf.convert_to_tensor(t)
        paddings = tf.concat([[[0, batch_size - size]], tf.zeros([tf.rank(t) - 1, 2], tf.int32)], 0)
        padded = tf.pad(t, paddings)
        return tf.ensure_shape(padded, [batch_size] + t.shape[1:].as_list())

    mask = tf.pad(tf.ones([size], tf.float32), [[0, batch_size - size]])
    return tf.nest.map_structure(pad, features), tf.nest.map_structure(pad, labels), tf.ensure_shape(mask, [batch_size])


def is_default_strategy(strategy: tf.distribute.Strategy) -> bool:
    return strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy()


def train_iterator(strategy: tf.distribute.Strategy, dataset_fn: Callable, per_replica_batch_size: int, *,
                   skip_updates: int = 0):
    """The training input iterator, positioned after `skip_updates` updates.

    Without a distribution strategy this is a plain tf.data iterator, which the checkpoint saves and
    restores exactly (skip_updates must be 0). Distributed iterators are not trackable in TF 2.20, so
    there each input pipeline (one per host) rebuilds its deterministic stream and skips the batches
    that the restored global step already consumed: the same next batch, at the cost of re-reading.
    """
    if is_default_strategy(strategy):
        if skip_updates:
            raise ValueError("a plain iterator is restored from the checkpoint, not skipped")
        return iter(without_autotune(dataset_fn(batch_size=per_replica_batch_size, input_context=None)))

    def fn(ctx: tf.distribute.InputContext):
        dataset = dataset_fn(batch_size=per_replica_batch_size, input_context=ctx)
        replicas_per_pipeline = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        return without_autotune(dataset.skip(skip_updates * replicas_per_pipeline))
    per_device_datasets_without_autotune()
    return iter(strategy.distribute_datasets_from_function(fn))


def prefetched(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A Task's finished pipeline (the end of its `build_inputs`): prefetched, and `without_autotune`, so that
    whatever iterates a Task's batches (the Trainer, tests, a notebook) never waits on deleting the iterator."""
    return without_autotune(dataset.prefetch(tf.data.AUTOTUNE))


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's model-based autotuning, whose thread makes deleting the iterator wait.

    TensorFlow 2.20 runs that optimizer in a thread per iterator that sleeps for a period doubling up to 60 s,
    and deleting the iterator sometimes waits out the rest of the period instead of waking the thread: 11 s for
    an iterator 30 s old (`/tmp` repro), 0.6-0.7 s in one evaluation of four, and stalls of 30-360 s in the test
    suite when garbage collection freed earlier trainers' training iterators (gdb: the main thread in
    ~RootDataset::Iterator waiting for the `OptimizeLoop` thread; bench/RESULTS.md, 2026-12-05). Without it,
    `num_parallel_calls=AUTOTUNE` runs one call per core and `prefetch(AUTOTUNE)` grows its buffer by itself
    (a CPU-bound parallel map ran 1,980-2,100 elements/s either way on 2 cores)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def per_device_datasets_without_autotune() -> None:
    """Autotuning off in the per-device datasets of a distributed iterator, which without_autotune cannot reach.

    A MirroredStrategy's iterator (TensorFlow's MultiDeviceIterator) feeds each device from a dataset it builds
    itself (a generator over the host's pipeline, then a one-batch prefetch) with default options: autotuning on,
    an optimizer thread per device, and the same wait on deleting the iterator as without_autotune's (a test's
    teardown waited 56.6 s in a full run; bench/RESULTS.md, thirty-seventh and thirty-eighth sessions). Those
    datasets have nothing to tune, and TensorFlow 2.20 has no option for them (tf.distribute.InputOptions), so
    this wraps the function that builds them, multi_device_iterator_ops._create_device_dataset, once per process;
    a TensorFlow without that function is left as it is."""
    from tensorflow.python.data.ops import multi_device_iterator_ops  # (no public handle on this)
    create = getattr(multi_device_iterator_ops, "_create_device_dataset", None)
    if create is None or getattr(create, "without_autotune", False):  # (already wrapped)
        return

    options = tf.data.Options()
    options.autotune.enabled = False

    @functools.wraps(create)
    def create_without_autotune(*args, **kwargs):
        return create(*args, **kwargs).with_options(options)
    create_without_autotune.without_autotune = True
    multi_device_iterator_ops._create_device_dataset = create_without_autotune


def pipeline_share(global_batches: tf.data.Dataset, input_context: tf.distribute.InputContext,
                   per_replica_batch_size: int) -> tf.data.Dataset:
    """From a stream of global batches (the same on every host), this input pipeline's per-replica batches.

    Replica r of R gets rows [r*b, (r+1)*b) of every global batch, whichever host it lives on: so the global
    batch of an update, and which replica sees which rows, are the same on one host with R devices as on R
    hosts with one each (what makes a multi-worker run equal to a single-process one). Each pipeline's
    replicas are consecutive (replica = pipeline * local + i), and tf.distribute hands consecutive
    elements of a pipeline's dataset to its local replicas in order.
    """
    local = input_context.num_replicas_in_sync // input_context.num_input_pipelines
    rows = local * per_replica_batch_size
    if input_context.num_input_pipelines == 1 and local == 1:
        return global_batches
    start = input_context.input_pipeline_id * rows

    def take(*element):
        element = element[0] if len(element) == 1 else element
        return tf.nest.map_structure(lambda t: t[start:start + rows], element)
    return global_batches.map(take).unbatch().batch(per_replica_batch_size, drop_remainder=True)


def distribute_eval_inputs(strategy: tf.distribute.Strategy, dataset_fn: Callable, global_batch_size: int):
    """Global batches padded to full size, split over all replicas of all hosts (every host reads them all:
    evaluation sets are small, and every worker then runs the same number of batches), kept in memory after the
    first full pass."""
    per_replica = global_batch_size // strategy.num_replicas_in_sync

    def fn(ctx: tf.distribute.InputContext):
        dataset = dataset_fn(batch_size=global_batch_size, input_context=None)
        dataset = dataset.map(lambda f, l: pad_batch(f, l, global_batch_size))
        # Cached in memory by the first evaluation's full pass (the split's batches: no more than the outputs the
        # evaluation gathers), so that later evaluations read them back: making a new iterator of the pipeline
        # instantiated its map functions again, 25-30 ms per evaluation (~3 % of evaluating 256 SST-2 sentences
        # with MiniLM on the Zen 3; 0.5 ms from the cache; bench/RESULTS.md). An incomplete pass caches nothing.
        # One short pass over small batches: deleting an autotuned iterator at the end waited for its thread,
        # 0.6-0.7 s in about one evaluation of four (a third of the time MiniLM takes for 256 SST-2 sentences).
        return without_autotune(pipeline_share(dataset, ctx, per_replica).cache())
    per_device_datasets_without_autotune()
    return strategy.distribute_datasets_from_function(fn)


def shard_shuffle_batch(dataset: tf.data.Dataset, *, training: bool, batch_size: int,
                        input_context: Optional[tf.distribute.InputContext], shuffle_buffer: int,
                        seed: int) -> tf.data.Dataset:
    """The batching the Task contract asks of `build_inputs`, for Tasks to share.

    For training: shuffles with a fixed seed (reshuffled every epoch, still deterministic, which the
    resume logic relies on), repeats, and batches the same global stream on every host; each host then
    keeps its replicas' rows (`pipeline_share`): the global batch of an update does not depend on how
    many hosts and devices share it. Otherwise one ordered pass whose partial last batch the engine pads.
    """
    if not training:
        return dataset.batch(batch_size)
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    if input_context is None:
        return dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.batch(batch_size * input_context.num_replicas_in_sync, drop_remainder=True)
    return pipeline_share(dataset, input_context, batch_size)


def batches(dataset: tf.data.Dataset, *, training: bool, batch_size: int, window_batches: int,
            input_context: Optional[tf.distribute.InputContext], shuffle_buffer: int, seed: int,
            decode: Optional[Callable] = None, length_key: str = "input_mask", multiple: int = 16
            ) -> tf.data.Dataset:
    """A Task's batches: `shard_shuffle_batch`, then `decode` on whole batches (tokenizing or parsing a batch per
    call is much cheaper than per example), then in training, with `window_batches` > 0 (a Task's
    group_by_length option), `group_by_length`'s batches of similar lengths: windows of that many batches are
    batched first and sorted after decoding, so the order depends only on the seed (and stays resumable)."""
    window = window_batches if training else 0
    dataset = shard_shuffle_batch(dataset, training=training, batch_size=batch_size * max(window, 1),
                                  input_context=input_context, shuffle_buffer=shuffle_buffer, seed=seed)
    if decode is not None:
        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if window:
        dataset = group_by_length(dataset, batch_size=batch_size, window_batches=window, length_key=length_key,
                                  multiple=multiple, seed=seed)
    return dataset


def bucket_widths(full_length: int, multiple: int = 16) -> tuple[int, ...]:
    """The sequence widths `group_by_length` can produce: multiples of `multiple` up to, and ending at,
    `full_length`. Known before training, so XLA (and a TPU) compiles the step at most once per width."""
    return tuple(range(multiple, full_length, multiple)) + (full_length,)


def check_static_shapes(element_spec, *, task_name: str, sequence_axis: int = 1) -> None:
    """Refuses training batches whose shapes are not from a small set known in advance (on TPU: XLA compiles
    the step once per input shape, and a shape that differs from batch to batch recompiles for minutes).

    Every dimension must be static except axis `sequence_axis` of rank >= 2 tensors, which the engine's
    `group_by_length` cuts to one of `bucket_widths(max_seq_length)`."""
    problems = []

    def visit(path, spec):
        if isinstance(spec, dict):
            for key in sorted(spec):
                visit(f"{path}[{key!r}]", spec[key])
        elif isinstance(spec, (tuple, list)):
            for i, item in enumerate(spec):
                visit(f"{path}[{i}]", item)
        elif spec.shape.rank is None:
            problems.append(f"{path} has unknown rank")
        else:
            for axis, size in enumerate(spec.shape):
                if size is None and not (axis == sequence_axis and spec.shape.rank >= 2):
                    what = "the batch dimension (batch with drop_remainder=True)" if axis == 0 else f"dimension {axis}"
                    problems.append(f"{path} has shape {spec.shape} with unknown {what}")

    visit("batch", element_spec)
    if problems:
        raise ValueError(
            f"task {task_name!r}: on TPU every training batch needs a static shape (XLA compiles one program per "
            f"shape), but {'; '.join(problems)}. Pad to fixed lengths and batch with drop_remainder=True "
            "(engine.inputs.shard_shuffle_batch, and group_by_length for sequence widths from a fixed bucket list).")


def longest_width(mask, full_length, multiple: int = 16):
    """The width a batch with this [batch, full_length] 0/1 padding mask is cut to: its longest sequence rounded
    up to `multiple`, at most `full_length` (so one of `bucket_widths(full_length, multiple)`). A tensor for a
    tensor (tf.data batches), an int for a NumPy mask (longest_first_batches)."""
    if isinstance(mask, np.ndarray):
        return width_for_lengths(mask.sum(axis=1), full_length, multiple)
    return width_for_lengths(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1), full_length, multiple)


def width_for_lengths(lengths, full_length, multiple: int = 16):
    """longest_width's rule on the rows' lengths ([batch] NumPy array -> int, tensor -> tensor)."""
    if isinstance(lengths, np.ndarray):
        longest = max(int(lengths.max(initial=0)), 1)  # 1: an empty batch
        minimum = min
    else:
        longest = tf.maximum(tf.reduce_max(lengths), 1)
        minimum = tf.minimum
    return minimum((longest + multiple - 1) // multiple * multiple, full_length)


def cut_to_longest(features, labels, *, length_key: str, full_length: int, multiple: int = 16):
    """(features, labels) of one batch, every [batch, full_length, ...] tensor (or NumPy array) cut to
    `longest_width`.

    What is cut is padding only, which the attention mask already ignores: the same outputs, less work."""
    keep = longest_width(features[length_key], full_length, multiple)

    def cut(t):
        is_sequence = len(t.shape) >= 2 and t.shape[1] == full_length
        return t[:, :keep] if is_sequence else t
    return tf.nest.map_structure(cut, (features, labels))


def cut_batches_to_longest(batches: tf.data.Dataset, *, length_key: str, multiple: int = 16) -> tf.data.Dataset:
    """Evaluation batches (features, labels), in their order, each cut to its longest sequence (`cut_to_longest`).

    Evaluation computes about as many tokens as Hugging Face's `padding=True` then, instead of every batch at
    the full padded length; rounding to `multiple` keeps the widths to `bucket_widths`, so a compiled
    evaluation step traces (and XLA compiles) at most once per width. Not for TPUs: they want one shape."""
    full_length = batches.element_spec[0][length_key].shape[1]
    if full_length is None:
        raise ValueError(f"cutting batches needs a fixed padded length of {length_key!r}")
    return batches.map(functools.partial(cut_to_longest, length_key=length_key, full_length=full_length,
                                         multiple=multiple))


def group_by_length(windows: tf.data.Dataset, *, batch_size: int, window_batches: int, length_key: str,
                    multiple: int = 16, seed: int = 0) -> tf.data.Dataset:
    """Training batches of similar-length sequences, each cut to its longest sequence.

    `windows` yields (features, labels) of `batch_size * window_batches` examples padded to one fixed
    length, with `features[length_key]` the 0/1 padding mask. Each window is sorted by length (stably,
    so the stream stays deterministic and resumable) and split into batches; each batch is cut to its
    longest sequence rounded up to `multiple` (the widths of `bucket_widths`: XLA, and a TPU, compiles the
    step at most once per width; the batch dimension stays static);
    then the batches are shuffled so lengths do not arrive in order. On short-sentence data such as
    SST-2 (13 word-pieces on average, padded to 64) this computes about 3x fewer tokens; what is cut is
    padding only, which the attention mask already ignores. (tf.data's bucket_by_sequence_length needs
    per-example lengths before batching; we tokenize whole batches, so this sorts whole windows instead,
    as Hugging Face's group_by_length does.)
    """
    full_length = windows.element_spec[0][length_key].shape[1]
    if full_length is None:
        raise ValueError(f"group_by_length needs a fixed padded length of {length_key!r}")

    def sort_window(features, labels):
        order = tf.argsort(tf.reduce_sum(tf.cast(features[length_key], tf.int32), axis=1), stable=True)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), (features, labels))

    batches = windows.map(sort_window).unbatch().batch(batch_size, drop_remainder=True)
    return cut_batches_to_longest(batches, length_key=length_key, multiple=multiple).shuffle(window_batches, seed=seed)
