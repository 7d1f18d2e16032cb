"""Linear-chain CRF: log-likelihood (forward algorithm in log space), log-partition, Viterbi.

Pure functions over `emissions [batch, time, tags]`, a `mask [batch, time]` that is a prefix of
ones (variable lengths), a `transitions [tags, tags]` matrix (from-tag, to-tag) and start/end
transition vectors. The math runs in the dtype of `transitions`: float32 in the model (emissions
from a mixed-precision head are cast up, because summing scores over a sentence in float16 loses
the differences Viterbi and the partition function depend on), float64 in the exactness tests.

Only the time axis is a loop (a `tf.while_loop` for the forward algorithm that stops at the
batch's longest sequence, `tf.scan` for Viterbi), always over static shapes, so everything traces
once and compiles under `tf.function(jit_compile=True)`; batch and tag axes are vectorised.

Windows cut from the middle of a sentence have no sentence boundary at their ends, so
`starts_sentence` / `ends_sentence` switch the start/end scores (and the start constraint) off
per sequence. Sequences of length 0 (padding examples) get score, log-partition and
log-likelihood 0, so they add nothing to a loss even before their weight zeroes them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
import tf_keras

# Score added to forbidden transitions. Finite (not -inf) so that a forbidden gold path gives a
# huge but finite loss instead of NaN, and so no `inf - inf` appears anywhere in the gradients.
# exp(-1e4) underflows to exactly 0 even in float64, so forbidden paths carry no probability mass.
FORBIDDEN_SCORE = -1e4


def iob2_constraints(labels: Sequence[str]) -> tuple[tf.Tensor, tf.Tensor]:
    """IOB2 rules as boolean masks `(allowed_transitions [K, K], allowed_start [K])`.

    `I-X` may only follow `B-X` or `I-X`, and may not start a sentence; everything else is free.
    """
    num_tags = len(labels)
    allowed = [[True] * num_tags for _ in range(num_tags)]
    allowed_start = [True] * num_tags
    for j, to_label in enumerate(labels):
        if not to_label.startswith("I-"):
            continue
        entity_type = to_label[2:]
        allowed_start[j] = False
        for i, from_label in enumerate(labels):
            allowed[i][j] = from_label in (f"B-{entity_type}", f"I-{entity_type}")
    return tf.constant(allowed, tf.bool), tf.constant(allowed_start, tf.bool)


def _prepare(emissions: tf.Tensor, mask: tf.Tensor, transitions: tf.Tensor, start: tf.Tensor, end: tf.Tensor,
             starts_sentence: Optional[tf.Tensor], ends_sentence: Optional[tf.Tensor],
             allowed_transitions: Optional[tf.Tensor], allowed_start: Optional[tf.Tensor]):
    """Casts to the CRF dtype and folds constraints and boundary switches into per-sequence scores.

    Returns emissions, bool mask, transitions [K, K], start scores [B, K], end scores [B, K].
    """
    # Read variables once, as tensors: the time loop then reuses the value, and XLA has no kernel for
    # gathers straight from a resource variable.
    transitions = tf.convert_to_tensor(transitions)
    dtype = transitions.dtype
    emissions = tf.cast(emissions, dtype)
    mask = tf.cast(mask, tf.bool)
    start = tf.cast(start, dtype)
    end = tf.cast(end, dtype)
    forbidden = tf.constant(FORBIDDEN_SCORE, dtype)
    if allowed_transitions is not None:
        transitions = tf.where(allowed_transitions, transitions, forbidden)
    if allowed_start is not None:
        start = tf.where(allowed_start, start, forbidden)
    batch = tf.shape(emissions)[0]
    start = tf.broadcast_to(start[tf.newaxis], [batch, tf.shape(start)[0]])
    end = tf.broadcast_to(end[tf.newaxis], [batch, tf.shape(end)[0]])
    zero = tf.zeros_like(start)
    if starts_sentence is not None:
        start = tf.where(tf.cast(starts_sentence, tf.bool)[:, tf.newaxis], start, zero)
    if ends_sentence is not None:
        end = tf.where(tf.cast(ends_sentence, tf.bool)[:, tf.newaxis], end, zero)
    return emissions, mask, transitions, start, end


def _time_major(x: tf.Tensor) -> tf.Tensor:
    """[batch, time, ...] -> [time, batch, ...] for tf.scan."""
    rank = x.shape.rank
    return tf.transpose(x, [1, 0] + list(range(2, rank)))


def _logsumexp_over_previous(scores: tf.Tensor) -> tf.Tensor:
    """log-sum-exp over axis 1 of [B, K_from, K_to]; the max is a constant for the gradient.

    Hand-written rather than tf.reduce_logsumexp: all inputs are finite here (forbidden scores
    are finite), so its inf handling is wasted ops inside the hot time loop.
    """
    peak = tf.stop_gradient(tf.reduce_max(scores, axis=1))
    return peak + tf.math.log(tf.reduce_sum(tf.exp(scores - peak[:, tf.newaxis, :]), axis=1))


def crf_log_norm(emissions: tf.Tensor, mask: tf.Tensor, transitions: tf.Tensor, start: tf.Tensor, end: tf.Tensor, *,
                 starts_sentence: Optional[tf.Tensor] = None, ends_sentence: Optional[tf.Tensor] = None,
                 allowed_transitions: Optional[tf.Tensor] = None,
                 allowed_start: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Log-partition [B]: log-sum-exp of the scores of all tag paths (forward algorithm)."""
    emissions, mask, transitions, start, end = _prepare(
        emissions, mask, transitions, start, end, starts_sentence, ends_sentence, allowed_transitions, allowed_start)
    alpha0 = start + emissions[:, 0]
    num_steps = emissions.shape[1] or tf.shape(emissions)[1]  # static under XLA, as it must be
    # Only the time steps up to the longest sequence in the batch run: batches are padded to the
    # longest possible window, but CoNLL sentences are short, so this is most of the CRF's speed.
    longest = tf.reduce_max(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1))
    # TensorArrays, not indexing: the gradient of a per-step read is a per-step write, whereas the
    # gradient of slicing a captured [T, B, K] tensor is a full [T, B, K] tensor per step.
    emissions_ta = tf.TensorArray(emissions.dtype, size=num_steps, element_shape=alpha0.shape).unstack(
        _time_major(emissions))
    mask_ta = tf.TensorArray(tf.bool, size=num_steps, element_shape=mask[:, :1].shape).unstack(
        _time_major(mask[:, :, tf.newaxis]))
    transitions = transitions[tf.newaxis]  # [1, K_from, K_to], hoisted out of the loop

    def step(t, alpha):
        new_alpha = _logsumexp_over_previous(alpha[:, :, tf.newaxis] + transitions) + emissions_ta.read(t)
        # Past the end of a sequence alpha is carried unchanged, so the final alpha is at its last word.
        return t + 1, tf.where(mask_ta.read(t), new_alpha, alpha)

    _, final_alpha = tf.while_loop(lambda t, _: t < longest, step, (tf.constant(1), alpha0),
                                   maximum_iterations=num_steps - 1)
    log_norm = tf.reduce_logsumexp(final_alpha + end, axis=1)
    return tf.where(mask[:, 0], log_norm, tf.zeros_like(log_norm))


def crf_sequence_score(emissions: tf.Tensor, tags: tf.Tensor, mask: tf.Tensor, transitions: tf.Tensor,
                       start: tf.Tensor, end: tf.Tensor, *, starts_sentence: Optional[tf.Tensor] = None,
                       ends_sentence: Optional[tf.Tensor] = None, allowed_transitions: Optional[tf.Tensor] = None,
                       allowed_start: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Unnormalised score [B] of the given tag paths; no loop, just gathers."""
    emissions, mask, transitions, start, end = _prepare(
        emissions, mask, transitions, start, end, starts_sentence, ends_sentence, allowed_transitions, allowed_start)
    tags = tf.cast(tags, tf.int32)
    dtype = emissions.dtype
    weights = tf.cast(mask, dtype)
    emission_score = tf.reduce_sum(tf.gather(emissions, tags, batch_dims=2) * weights, axis=1)
    pair_score = tf.gather_nd(transitions, tf.stack([tags[:, :-1], tags[:, 1:]], axis=-1))
    transition_score = tf.reduce_sum(pair_score * weights[:, 1:], axis=1)
    lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    first_tag = tags[:, 0]
    last_tag = tf.gather(tags, tf.maximum(lengths - 1, 0), batch_dims=1)
    boundary_score = tf.gather(start, first_tag, batch_dims=1) + tf.gather(end, last_tag, batch_dims=1)
    score = emission_score + transition_score + boundary_score
    return tf.where(lengths > 0, score, tf.zeros_like(score))


def crf_log_likelihood(emissions: tf.Tensor, tags: tf.Tensor, mask: tf.Tensor, transitions: tf.Tensor,
                       start: tf.Tensor, end: tf.Tensor, **kwargs) -> tf.Tensor:
    """log p(tags | emissions) [B] = path score - log-partition. Keyword options as `crf_log_norm`."""
    return (crf_sequence_score(emissions, tags, mask, transitions, start, end, **kwargs)
            - crf_log_norm(emissions, mask, transitions, start, end, **kwargs))


def viterbi_decode(emissions: tf.Tensor, mask: tf.Tensor, transitions: tf.Tensor, start: tf.Tensor, end: tf.Tensor, *,
                   starts_sentence: Optional[tf.Tensor] = None, ends_sentence: Optional[tf.Tensor] = None,
                   allowed_transitions: Optional[tf.Tensor] = None,
                   allowed_start: Optional[tf.Tensor] = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Best tag path `(tags [B, T] int32, score [B])`; tags are 0 past each sequence's length."""
    emissions, mask, transitions, start, end = _prepare(
        emissions, mask, transitions, start, end, starts_sentence, ends_sentence, allowed_transitions, allowed_start)
    num_tags = tf.shape(transitions)[0]
    delta0 = start + emissions[:, 0]
    identity = tf.broadcast_to(tf.range(num_tags)[tf.newaxis], tf.shape(delta0))

    def forward(carry, inputs):
        delta, _ = carry
        emission_t, mask_t = inputs
        candidates = delta[:, :, tf.newaxis] + transitions[tf.newaxis]
        best_previous = tf.argmax(candidates, axis=1, output_type=tf.int32)
        new_delta = tf.reduce_max(candidates, axis=1) + emission_t
        # Past the end: keep delta, and point every tag to itself so backtracking walks through.
        return (tf.where(mask_t[:, tf.newaxis], new_delta, delta),
                tf.where(mask_t[:, tf.newaxis], best_previous, identity))

    deltas, backpointers = tf.scan(
        forward, (_time_major(emissions[:, 1:]), _time_major(mask[:, 1:])), initializer=(delta0, identity))
    final_delta = tf.concat([delta0[tf.newaxis], deltas], axis=0)[-1] + end
    last_tag = tf.argmax(final_delta, axis=1, output_type=tf.int32)
    best_score = tf.reduce_max(final_delta, axis=1)

    def backward(tag_next, backpointer_t):
        return tf.gather(backpointer_t, tag_next, batch_dims=1)

    # backpointers[t] maps the tag at time t+1 to the best tag at time t.
    earlier_tags = tf.scan(backward, backpointers, initializer=last_tag, reverse=True)
    tags = tf.concat([_time_major(earlier_tags), last_tag[:, tf.newaxis]], axis=1)
    tags = tf.where(mask, tags, tf.zeros_like(tags))
    return tags, tf.where(mask[:, 0], best_score, tf.zeros_like(best_score))


class CRF(tf_keras.layers.Layer):
    """Holds CRF parameters (transitions [K, K], start [K], end [K]); always float32.

    `call` is the identity on emissions (it only ensures the layer is built and tracked in the
    model); the loss and the decoder call `log_likelihood` / `decode`, which cast emissions to
    float32 so mixed-precision models get full-precision CRF math.
    """

    def __init__(self, num_tags: int, *, allowed_transitions: Optional[tf.Tensor] = None,
                 allowed_start: Optional[tf.Tensor] = None, **kwargs):
        kwargs["dtype"] = "float32"  # never a mixed policy: see the module docstring
        super().__init__(**kwargs)
        self.num_tags = num_tags
        self._allowed_transitions = allowed_transitions
        self._allowed_start = allowed_start

    def build(self, input_shape):
        zeros = tf_keras.initializers.Zeros()
        self.transitions = self.add_weight(name="transitions", shape=[self.num_tags, self.num_tags],
                                           initializer=zeros, dtype=tf.float32)
        self.start_transitions = self.add_weight(name="start_transitions", shape=[self.num_tags],
                                                 initializer=zeros, dtype=tf.float32)
        self.end_transitions = self.add_weight(name="end_transitions", shape=[self.num_tags],
                                               initializer=zeros, dtype=tf.float32)
        super().build(input_shape)

    def call(self, emissions: tf.Tensor) -> tf.Tensor:
        return tf.cast(emissions, tf.float32)

    def _options(self, starts_sentence, ends_sentence) -> dict:
        return dict(starts_sentence=starts_sentence, ends_sentence=ends_sentence,
                    allowed_transitions=self._allowed_transitions, allowed_start=self._allowed_start)

    def log_likelihood(self, emissions: tf.Tensor, tags: tf.Tensor, mask: tf.Tensor, *,
                       starts_sentence: Optional[tf.Tensor] = None,
                       ends_sentence: Optional[tf.Tensor] = None) -> tf.Tensor:
        """log p(tags | emissions) per sequence, [B] float32."""
        return crf_log_likelihood(emissions, tags, mask, self.transitions, self.start_transitions,
                                  self.end_transitions, **self._options(starts_sentence, ends_sentence))

    def decode(self, emissions: tf.Tensor, mask: tf.Tensor, *, starts_sentence: Optional[tf.Tensor] = None,
               ends_sentence: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Viterbi tags [B, T] int32 (0 past each length)."""
        tags, _ = viterbi_decode(emissions, mask, self.transitions, self.start_transitions, self.end_transitions,
                                 **self._options(starts_sentence, ends_sentence))
        return tags

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_tags=self.num_tags)
        return config
