"""NER decoding, the one implementation: window ownership, stitching windows back into sentences, entities.

Evaluation (`conll.encode_sentences` and `conll.stitch`), `TaggingTask.predict` and the serving export (in
its graph) all call these TensorFlow functions; only where the words and windows come from differs.

- Ownership: a word in several overlapping windows is scored only in the window where it has the most
  context, min(left, right), a window edge that is also the sentence edge counting as unlimited; ties go
  to the earlier window.
- Stitching: each word of a sentence takes the tag its owning window predicted.
- Entities: conlleval's chunks (span_metrics' startOfChunk/endOfChunk rules as [previous, tag] tables), the
  end of the sentence closing every chunk. The rules stay in span_metrics, the scorer; these functions only
  apply them, so for IOB2 label sets a chunk here is exactly a phrase conlleval counts.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from tasks.ner import span_metrics
from tasks.serving import segment_first_best


def owned_words(window_sentence: tf.Tensor, window_begin: tf.Tensor, window_end: tf.Tensor,
                sentence_splits: tf.Tensor) -> tf.RaggedTensor:
    """[windows, (words of the window)] bool: whether the window owns each of its words.

    Window i holds words [window_begin[i], window_end[i]) of sentence window_sentence[i]; sentence s has
    words [sentence_splits[s], sentence_splits[s + 1]) of all sentences. Rows are windows in their order.
    """
    window_sentence, window_begin, window_end, sentence_splits = (
        tf.cast(tf.convert_to_tensor(v), tf.int32) for v in (window_sentence, window_begin, window_end,
                                                             sentence_splits))
    sentence_length = sentence_splits[1:] - sentence_splits[:-1]
    slots = tf.ragged.range(window_end - window_begin)
    slot_window = tf.cast(slots.value_rowids(), tf.int32)
    slot = tf.cast(slots.flat_values, tf.int32)
    begin, end = tf.gather(window_begin, slot_window), tf.gather(window_end, slot_window)
    word = begin + slot
    sentence = tf.gather(window_sentence, slot_window)
    length = tf.gather(sentence_length, sentence)
    left = tf.where(begin > 0, slot, length)
    right = tf.where(end < length, end - 1 - word, length)
    key = tf.gather(sentence_splits, sentence) + word
    owner, _ = segment_first_best(tf.minimum(left, right), tf.ones_like(slot, tf.bool), key, sentence_splits[-1])
    return slots.with_flat_values(tf.equal(tf.gather(owner, key), tf.range(tf.size(key))))


def stitch(window_tags: tf.Tensor, owned_mask: tf.Tensor, window_sentence: tf.Tensor, window_begin: tf.Tensor,
           sentence_splits: tf.Tensor) -> tf.Tensor:
    """[words of all sentences] int32: each word's tag from the window that owns it, -1 where none does.

    window_tags and owned_mask are [rows, max_words] (slot j of a row is word window_begin + j of its
    sentence); rows may be in any order, and a word should be owned by one row only.
    """
    owned = tf.cast(tf.where(tf.cast(owned_mask, tf.bool)), tf.int32)  # [owned slots, (row, slot)]
    row = owned[:, 0]
    word = (tf.gather(tf.gather(tf.cast(sentence_splits, tf.int32), tf.cast(window_sentence, tf.int32)), row)
            + tf.gather(tf.cast(window_begin, tf.int32), row) + owned[:, 1])
    tags = tf.gather_nd(tf.cast(window_tags, tf.int32), owned)
    num_words = tf.cast(sentence_splits, tf.int32)[-1]
    return tf.tensor_scatter_nd_update(tf.fill([num_words], -1), word[:, tf.newaxis], tags)


class ChunkRules(NamedTuple):
    """conlleval's rules for a label list: starts/ends [previous tag id, tag id] bool, types [tag id] str."""
    starts: np.ndarray
    ends: np.ndarray
    types: np.ndarray


def chunk_rules(labels: Sequence[str]) -> ChunkRules:
    """span_metrics' start/end-of-chunk rules as tables; IOB2 label sets (O, B-X, I-X) only."""
    split = [span_metrics.split_tag(label) for label in labels]
    starts = np.array([[span_metrics.start_of_chunk(p, c, pt, ct) for c, ct in split] for p, pt in split])
    ends = np.array([[span_metrics.end_of_chunk(p, c, pt, ct) for c, ct in split] for p, pt in split])
    outside = np.array([prefix == "O" for prefix, _ in split])
    # `entities` relies on chunks never overlapping: a chunk starts only where the previous one (if any)
    # ends, and a chunk ends only where a new one starts or an O follows. True for IOB2 label sets; refuse
    # anything else rather than extract entities conlleval would not count.
    if labels[0] != "O" or not (np.all(~starts | ends | outside[:, None]) and np.all(~ends | starts | outside[None, :])):
        raise ValueError(f"labels {list(labels)}: entity decoding supports IOB2 label sets (O first, B-X, I-X)")
    return ChunkRules(starts, ends, tuple(entity_type for _, entity_type in split))


class Entities(NamedTuple):
    """One row per entity, in sentence then word order: its sentence, first and last word (inclusive,
    indices into all sentences' words) and the tag id of its first word (whose type it has)."""
    sentence: tf.Tensor
    first: tf.Tensor
    last: tf.Tensor
    tag: tf.Tensor


def entities(word_tags: tf.Tensor, sentence_splits: tf.Tensor, rules: ChunkRules) -> Entities:
    """The chunks of every sentence; word_tags [words of all sentences] are tag ids (0 is "O")."""
    sentence_splits = tf.cast(sentence_splits, tf.int64)
    tags = tf.RaggedTensor.from_row_splits(tf.cast(word_tags, tf.int32), sentence_splits)
    num_sentences = tags.nrows()
    outside = tf.zeros(tf.stack([num_sentences, 1]), tf.int32)
    # Each sentence followed by an O (conlleval's sentence boundary), and the tag before each position.
    current = tf.concat([tags, outside], axis=1)
    previous = tf.concat([outside, tags], axis=1)
    pairs = tf.stack([previous.flat_values, current.flat_values], axis=1)
    boundary = tf.equal(tf.ragged.range(current.row_lengths()).flat_values + 1,
                        tf.gather(current.row_lengths(), current.value_rowids()))
    starts = tf.gather_nd(tf.constant(rules.starts), pairs) & ~boundary
    ends = tf.gather_nd(tf.constant(rules.ends), pairs)
    start_at = tf.cast(tf.where(starts)[:, 0], tf.int32)
    end_at = tf.cast(tf.where(ends)[:, 0], tf.int32)
    # A chunk runs to just before the next end; the boundary O ends every open chunk, so it is in the sentence.
    next_end = tf.gather(end_at, tf.searchsorted(end_at, start_at, side="right"))
    sentence = tf.cast(tf.gather(current.value_rowids(), start_at), tf.int32)
    # Position p of the extended rows is word p - sentence (one boundary O per earlier sentence).
    return Entities(sentence, start_at - sentence, next_end - 1 - sentence, tf.gather(current.flat_values, start_at))
