"""SQuAD span decoding, the one implementation: window logits -> each question's best valid answer span.

Evaluation (`task.decode_predictions` on the gathered host arrays), `SquadTask.predict` and the serving
export (in its graph) all call `best_spans`; only where the windows come from differs (precomputed
features in data.py, raw strings in serving.py). The rules are BERT's run_squad.py post-processing:

- Only context tokens can be chosen: never [CLS], the question, [SEP] or padding.
- Max context: a token in several overlapping windows may start an answer only in the window where
  min(left, right) context + 0.01 * window length is largest; ties go to the earlier window.
- n-best: the `n_best_size` best start and the `n_best_size` best end positions of each window (among its
  context tokens, ties to the earlier position) form the candidate pairs; a pair is valid if the start has
  max context and start <= end < start + max_answer_length. A window's span is its best valid pair (ties:
  the first in (start rank, end rank) order); a question's is the best over its windows (ties: the first).
- Fallback: a question none of whose windows has a valid n-best pair gets the best valid span by
  exhaustive search (any max-context start, the best end within max_answer_length).
Scores are start + end logit, summed in float64.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

from tasks.serving import first_argmax, segment_first_best


class Spans(NamedTuple):
    """Per question: `found`, the winning `window` (row), `first`/`last` context token (inclusive, in the
    question's context-token coordinates) and `score`; window/first/last are 0 and score -inf when not found."""
    found: tf.Tensor
    window: tf.Tensor
    first: tf.Tensor
    last: tf.Tensor
    score: tf.Tensor


def max_context(window_example: tf.Tensor, doc_start: tf.Tensor, doc_len: tf.Tensor, num_examples,
                seq_length) -> tf.Tensor:
    """[windows, seq_length] bool: whether context token t of each window (t < doc_len) has its max context there.

    Ownership is decided among the windows given, the earlier row on ties.
    """
    window_example, doc_start, doc_len = (tf.cast(tf.convert_to_tensor(v), tf.int32)
                                          for v in (window_example, doc_start, doc_len))
    # Token t of a window is key example_base + doc_start + t: one key per (question, context token).
    tokens_of_example = tf.maximum(tf.math.unsorted_segment_max(doc_start + doc_len, window_example, num_examples), 0)
    example_base = tf.cumsum(tokens_of_example, exclusive=True)
    token_window = tf.cast(tf.ragged.range(doc_len).value_rowids(), tf.int32)
    token_t = tf.cast(tf.ragged.range(doc_len).flat_values, tf.int32)
    length = tf.gather(doc_len, token_window)
    token_key = (tf.gather(tf.gather(example_base, window_example) + doc_start, token_window) + token_t)
    score = tf.cast(tf.minimum(token_t, length - 1 - token_t), tf.float64) + 0.01 * tf.cast(length, tf.float64)
    owner, _ = segment_first_best(score, tf.ones_like(score, tf.bool), token_key, tf.reduce_sum(tokens_of_example))
    is_max = tf.equal(tf.gather(owner, token_key), tf.range(tf.size(token_key)))
    ragged = tf.RaggedTensor.from_value_rowids(is_max, tf.cast(token_window, tf.int64),
                                               tf.cast(tf.size(doc_len), tf.int64))
    return ragged.to_tensor(False, shape=tf.stack([tf.size(doc_len), seq_length]))


def best_spans(start_logits: tf.Tensor, end_logits: tf.Tensor, *, window_example: tf.Tensor, doc_start: tf.Tensor,
               doc_len: tf.Tensor, seq_offset: tf.Tensor, num_examples, n_best_size: int,
               max_answer_length: int, is_max_context: Optional[tf.Tensor] = None) -> Spans:
    """Each question's best valid span over its windows (the rules in the module docstring).

    start/end_logits [windows, seq] are the model's, in sequence positions; window i belongs to question
    `window_example[i]` and holds its context tokens [doc_start, doc_start + doc_len) at sequence positions
    [seq_offset, seq_offset + doc_len). Rows are windows in their order (it decides ties).
    `is_max_context` ([windows, seq], as `max_context` returns) defaults to ownership among these rows;
    evaluation passes the one of all the split's windows, so a missing window changes nothing else.
    """
    window_example, doc_start, doc_len, seq_offset = (
        tf.cast(tf.convert_to_tensor(v), tf.int32) for v in (window_example, doc_start, doc_len, seq_offset))
    num_examples = tf.cast(num_examples, tf.int32)
    seq_length = tf.shape(start_logits, out_type=tf.int32)[1]
    minus_inf = tf.constant(-np.inf, tf.float64)

    # Logits in context coordinates [windows, seq]: position t is the window's context token t.
    t = tf.range(seq_length)[tf.newaxis]
    in_doc = t < doc_len[:, tf.newaxis]
    at = tf.minimum(seq_offset[:, tf.newaxis] + t, seq_length - 1)

    def context_logits(logits):
        logits = tf.cast(tf.gather(tf.convert_to_tensor(logits), at, batch_dims=1), tf.float64)
        return tf.where(in_doc, logits, minus_inf)
    starts, ends = context_logits(start_logits), context_logits(end_logits)
    if is_max_context is None:
        is_max_context = max_context(window_example, doc_start, doc_len, num_examples, seq_length)
    is_max = tf.convert_to_tensor(is_max_context) & in_doc

    # n-best: top k starts and ends (top_k puts the lower index first on ties), valid pairs, best sum.
    k = tf.minimum(n_best_size, seq_length)
    start_values, start_at = tf.math.top_k(starts, k)
    end_values, end_at = tf.math.top_k(ends, k)
    start_ok = (start_values > minus_inf) & tf.gather(is_max, start_at, batch_dims=1)
    end_ok = end_values > minus_inf
    first, last = start_at[:, :, tf.newaxis], end_at[:, tf.newaxis, :]
    pair_ok = (start_ok[:, :, tf.newaxis] & end_ok[:, tf.newaxis, :] & (first <= last)
               & (last < first + max_answer_length))
    pair_score = tf.reshape(start_values[:, :, tf.newaxis] + end_values[:, tf.newaxis, :], [-1, k * k])
    pair_ok = tf.reshape(pair_ok, [-1, k * k])
    best_pair = first_argmax(tf.where(pair_ok, pair_score, minus_inf))
    nbest_score = tf.gather(pair_score, best_pair, batch_dims=1)
    nbest_first = tf.gather(start_at, best_pair // k, batch_dims=1)
    nbest_last = tf.gather(end_at, best_pair % k, batch_dims=1)
    has_nbest = tf.reduce_any(pair_ok, axis=1)

    # Exhaustive fallback: for each start, the best end among the next max_answer_length tokens (the
    # first on ties: a running maximum with strict >), then the best max-context start (the first on ties).
    padded_ends = tf.pad(ends, [[0, 0], [0, max_answer_length]], constant_values=-np.inf)
    band_best, band_offset = tf.fill(tf.shape(ends), minus_inf), tf.zeros(tf.shape(ends), tf.int32)
    for offset in range(max_answer_length):
        candidate = padded_ends[:, offset:offset + seq_length]
        better = candidate > band_best
        band_best = tf.where(better, candidate, band_best)
        band_offset = tf.where(better, offset, band_offset)
    fallback_scores = starts + band_best
    fallback_first = first_argmax(tf.where(is_max, fallback_scores, minus_inf))
    fallback_score = tf.gather(fallback_scores, fallback_first, batch_dims=1)
    fallback_last = fallback_first + tf.gather(band_offset, fallback_first, batch_dims=1)
    has_fallback = tf.reduce_any(is_max, axis=1)

    # Best window per question: the n-best spans if any of its windows has one, else the fallback.
    any_nbest = tf.math.unsorted_segment_max(tf.cast(has_nbest, tf.int32), window_example, num_examples) > 0
    use_nbest = tf.gather(any_nbest, window_example)
    window_score = tf.where(use_nbest, nbest_score, fallback_score)
    window_ok = tf.where(use_nbest, has_nbest, has_fallback)
    winner, score = segment_first_best(window_score, window_ok, window_example, num_examples)
    found = winner >= 0
    winner = tf.maximum(winner, 0)

    def of_winner(values):  # a zero row appended: questions without any window gather it
        return tf.gather(tf.concat([values, tf.zeros([1], values.dtype)], 0), winner)
    offset = of_winner(doc_start)
    span_first = of_winner(tf.where(use_nbest, nbest_first, fallback_first))
    span_last = of_winner(tf.where(use_nbest, nbest_last, fallback_last))
    zero = tf.zeros_like(winner)
    return Spans(found, tf.where(found, winner, zero), tf.where(found, offset + span_first, zero),
                 tf.where(found, offset + span_last, zero), score)
