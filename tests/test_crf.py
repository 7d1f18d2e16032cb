"""The CRF against brute-force enumeration of every tag path, finite differences, and itself under XLA."""
import itertools

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf

from tasks.ner import crf

LABELS = ["O", "B-PER", "I-PER", "B-LOC"]  # 4 tags, one I- tag so IOB2 constraints bite


def _random_case(seed: int, batch: int = 3, time: int = 5, num_tags: int = 4):
    rng = np.random.default_rng(seed)
    emissions = rng.normal(size=[batch, time, num_tags])
    transitions = rng.normal(size=[num_tags, num_tags])
    start, end = rng.normal(size=[num_tags]), rng.normal(size=[num_tags])
    lengths = rng.integers(1, time + 1, size=[batch])
    lengths[0] = time  # always one full-length sequence
    mask = np.arange(time)[None, :] < lengths[:, None]
    tags = rng.integers(0, num_tags, size=[batch, time])
    return emissions, mask, transitions, start, end, tags


def _path_score(emissions, path, transitions, start, end, use_start=True, use_end=True):
    score = sum(emissions[t, tag] for t, tag in enumerate(path))
    score += sum(transitions[a, b] for a, b in zip(path[:-1], path[1:]))
    return score + (start[path[0]] if use_start else 0.0) + (end[path[-1]] if use_end else 0.0)


def _allowed_path(path, allowed, allowed_start, use_start=True):
    if use_start and not allowed_start[path[0]]:
        return False
    return all(allowed[a, b] for a, b in zip(path[:-1], path[1:]))


def _brute_force(emissions, length, transitions, start, end, allowed=None, allowed_start=None,
                 use_start=True, use_end=True):
    """(log-partition, best path, best score) by enumerating every path of the given length."""
    num_tags = transitions.shape[0]
    scores = {}
    for path in itertools.product(range(num_tags), repeat=length):
        if allowed is not None and not _allowed_path(path, allowed, allowed_start, use_start):
            continue
        scores[path] = _path_score(emissions[:length], path, transitions, start, end, use_start, use_end)
    values = np.array(list(scores.values()))
    log_norm = values.max() + np.log(np.exp(values - values.max()).sum())
    best = max(scores, key=scores.get)
    return log_norm, best, scores[best]


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_norm_and_viterbi_match_enumeration(seed, constrained):
    emissions, mask, transitions, start, end, _ = _random_case(seed)
    options, allowed, allowed_start = {}, None, None
    if constrained:
        allowed_t, allowed_start_t = crf.iob2_constraints(LABELS)
        allowed, allowed_start = allowed_t.numpy(), allowed_start_t.numpy()
        options = dict(allowed_transitions=allowed_t, allowed_start=allowed_start_t)
    # Sequence 2 is a window cut from inside a sentence: no start/end scores, no start constraint.
    starts_sentence = np.array([True, True, False])
    ends_sentence = np.array([True, True, False])
    log_norm = crf.crf_log_norm(emissions, mask, transitions, start, end, starts_sentence=starts_sentence,
                                ends_sentence=ends_sentence, **options).numpy()
    tags, best_score = crf.viterbi_decode(emissions, mask, transitions, start, end, starts_sentence=starts_sentence,
                                          ends_sentence=ends_sentence, **options)
    for b in range(emissions.shape[0]):
        length = int(mask[b].sum())
        expected_norm, expected_path, expected_best = _brute_force(
            emissions[b], length, transitions, start, end, allowed, allowed_start,
            use_start=starts_sentence[b], use_end=ends_sentence[b])
        np.testing.assert_allclose(log_norm[b], expected_norm, rtol=1e-12)
        assert tuple(tags[b, :length].numpy()) == expected_path
        assert not tags[b, length:].numpy().any()
        np.testing.assert_allclose(best_score[b].numpy(), expected_best, rtol=1e-12)


def test_constraints_forbid_invalid_iob2_paths():
    """Emissions that strongly prefer an invalid path must still decode to a valid one."""
    emissions = np.full([1, 3, 4], -5.0)
    emissions[0, 0, 2] = emissions[0, 1, 0] = emissions[0, 2, 2] = 5.0  # I-PER O I-PER
    zeros2, zeros1 = np.zeros([4, 4]), np.zeros([4])
    allowed, allowed_start = crf.iob2_constraints(LABELS)
    free, _ = crf.viterbi_decode(emissions, np.ones([1, 3]), zeros2, zeros1, zeros1)
    constrained, _ = crf.viterbi_decode(emissions, np.ones([1, 3]), zeros2, zeros1, zeros1,
                                        allowed_transitions=allowed, allowed_start=allowed_start)
    assert free.numpy().tolist() == [[2, 0, 2]]
    labels = [LABELS[t] for t in constrained.numpy()[0]]
    assert labels[0] != "I-PER" and not (labels[1] == "O" and labels[2] == "I-PER")


def test_sequence_score_and_likelihood_match_enumeration():
    emissions, mask, transitions, start, end, tags = _random_case(3)
    log_likelihood = crf.crf_log_likelihood(emissions, tags, mask, transitions, start, end).numpy()
    for b in range(emissions.shape[0]):
        length = int(mask[b].sum())
        path = tuple(tags[b, :length])
        log_norm, _, _ = _brute_force(emissions[b], length, transitions, start, end)
        expected = _path_score(emissions[b], path, transitions, start, end) - log_norm
        np.testing.assert_allclose(log_likelihood[b], expected, rtol=1e-12)


def test_gradients_match_finite_differences():
    emissions, mask, transitions, start, end, tags = _random_case(4, time=4)

    def total_log_likelihood(emissions, transitions, start, end):
        return tf.reduce_sum(crf.crf_log_likelihood(emissions, tags, mask, transitions, start, end))

    theoretical, numerical = tf.test.compute_gradient(
        total_log_likelihood, [tf.constant(x) for x in (emissions, transitions, start, end)])
    for analytic, finite_difference in zip(theoretical, numerical):
        np.testing.assert_allclose(analytic, finite_difference, atol=1e-6)


def test_batched_masked_equals_each_sequence_alone():
    emissions, mask, transitions, start, end, tags = _random_case(5, batch=4, time=5)
    allowed, allowed_start = crf.iob2_constraints(LABELS)
    options = dict(allowed_transitions=allowed, allowed_start=allowed_start)
    batched_ll = crf.crf_log_likelihood(emissions, tags, mask, transitions, start, end, **options).numpy()
    batched_tags = crf.viterbi_decode(emissions, mask, transitions, start, end, **options)[0].numpy()
    for b in range(emissions.shape[0]):
        length = int(mask[b].sum())
        alone = emissions[b:b + 1, :length]
        ones = np.ones([1, length])
        ll = crf.crf_log_likelihood(alone, tags[b:b + 1, :length], ones, transitions, start, end, **options)
        np.testing.assert_allclose(batched_ll[b], ll.numpy()[0], rtol=1e-12)
        alone_tags = crf.viterbi_decode(alone, ones, transitions, start, end, **options)[0]
        np.testing.assert_array_equal(batched_tags[b, :length], alone_tags.numpy()[0])


def test_empty_sequences_contribute_zero():
    emissions, _, transitions, start, end, tags = _random_case(6)
    mask = np.zeros(tags.shape, bool)
    assert not crf.crf_log_likelihood(emissions, tags, mask, transitions, start, end).numpy().any()
    with tf.GradientTape() as tape:
        emissions_t = tf.constant(emissions)
        tape.watch(emissions_t)
        loss = tf.reduce_sum(crf.crf_log_likelihood(emissions_t, tags, mask, transitions, start, end))
    assert not tape.gradient(loss, emissions_t).numpy().any()


@pytest.mark.parametrize("constrained", [False, True])
def test_jit_compile_matches_eager_in_float32_and_layer_casts_half_precision(constrained):
    emissions, mask, transitions, start, end, tags = _random_case(7, batch=3, time=5)
    allowed, allowed_start = crf.iob2_constraints(LABELS) if constrained else (None, None)
    layer = crf.CRF(len(LABELS), allowed_transitions=allowed, allowed_start=allowed_start)
    layer.build([None, None, len(LABELS)])
    layer.transitions.assign(transitions.astype(np.float32))
    layer.start_transitions.assign(start.astype(np.float32))
    layer.end_transitions.assign(end.astype(np.float32))

    def both(emissions):
        with tf.GradientTape() as tape:
            tape.watch(emissions)
            ll = layer.log_likelihood(emissions, tags, mask)
            total = tf.reduce_sum(ll)
        return ll, layer.decode(emissions, mask), tape.gradient(total, layer.transitions)

    eager = both(tf.constant(emissions, tf.float32))
    compiled = tf.function(both, jit_compile=True)(tf.constant(emissions, tf.float32))
    half = both(tf.constant(emissions, tf.float16))
    assert eager[0].dtype == half[0].dtype == tf.float32
    np.testing.assert_allclose(eager[0].numpy(), compiled[0].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(eager[1].numpy(), compiled[1].numpy())
    np.testing.assert_allclose(eager[2].numpy(), compiled[2].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eager[0].numpy(), half[0].numpy(), rtol=1e-2)  # only input rounding differs
    # and float32 agrees with the float64 reference
    reference = crf.crf_log_likelihood(emissions, tags, mask, transitions, start, end,
                                       allowed_transitions=allowed, allowed_start=allowed_start)
    np.testing.assert_allclose(eager[0].numpy(), reference.numpy(), rtol=1e-5)


def test_length_one_sequences():
    emissions, _, transitions, start, end, tags = _random_case(8, time=1)
    mask = np.ones([3, 1], bool)
    log_norm = crf.crf_log_norm(emissions, mask, transitions, start, end).numpy()
    expected = np.log(np.exp(emissions[:, 0] + start + end).sum(axis=1))
    np.testing.assert_allclose(log_norm, expected, rtol=1e-12)
    tags, _ = crf.viterbi_decode(emissions, mask, transitions, start, end)
    np.testing.assert_array_equal(tags.numpy()[:, 0], np.argmax(emissions[:, 0] + start + end, axis=1))
