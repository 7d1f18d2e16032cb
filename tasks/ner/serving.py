"""NER's serving signature: text -> entities (text, type, character offsets), CRF or softmax in the graph."""
from __future__ import annotations

import tensorflow as tf
import tensorflow_text as tf_text
import tf_keras

from tasks import serving
from tasks.ner import conll, decoding

# CoNLL word splitting as tasks.ner.task._WORD (`\w+(?:[.'’-]\w+)*|[^\w\s]`) in RE2 syntax. RE2's \w and \s
# are ASCII-only; these classes are Python's Unicode ones (identical on the Basic Multilingual Plane; a few
# recently added supplementary-plane letters may differ with the Unicode versions of Python and RE2).
_WORD_CHAR = r"[\p{L}\p{N}_]"
_SPACE = r"[\t\n\x0b\f\r\x1c-\x1f\x85\p{Z}]"
_WORD = rf"{_WORD_CHAR}+(?:[.'\x{{2019}}-]{_WORD_CHAR}+)*|[^\p{{L}}\p{{N}}_\t\n\x0b\f\r\x1c-\x1f\x85\p{{Z}}]"



def plan_windows(counts: tf.Tensor, row_splits: tf.Tensor, *, max_pieces: int, max_words: int,
                 overlap_pieces: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """conll.plan_windows for every sentence, in the graph: (sentence, begin, end) [windows] int32.

    `counts` [words] are the pieces per word of all sentences, `row_splits` [sentences + 1] where each
    sentence's words start. Empty sentences get no window.
    """
    num_sentences = tf.size(row_splits) - 1
    arrays = tuple(tf.TensorArray(tf.int32, size=0, dynamic_size=True) for _ in range(3))

    def fill(lo, n, begin):
        """The longest window from `begin` within max_pieces and max_words (always at least one word)."""
        def more(end, used):
            next_count = tf.gather(counts, lo + tf.minimum(end, n - 1))
            return (end < n) & (end - begin < max_words) & ((end == begin) | (used + next_count <= max_pieces))
        end, _ = tf.while_loop(more, lambda end, used: (end + 1, used + tf.gather(counts, lo + end)),
                               (begin, tf.constant(0)))
        return end

    def back_off(lo, n, begin, end):
        """Where the next window starts: back from `end` by up to overlap_pieces pieces of whole words."""
        budget = tf.minimum(overlap_pieces, max_pieces - tf.gather(counts, lo + tf.minimum(end, n - 1)))

        def more(next_begin, overlap):
            previous = tf.gather(counts, lo + tf.maximum(next_begin - 1, 0))
            return (next_begin - 1 > begin) & (end - next_begin + 2 <= max_words) & (overlap + previous <= budget)
        next_begin, _ = tf.while_loop(
            more, lambda nb, overlap: (nb - 1, overlap + tf.gather(counts, lo + nb - 1)), (end, tf.constant(0)))
        return next_begin

    def sentence_body(s, num_windows, sentences, begins, ends):
        lo = row_splits[s]
        n = row_splits[s + 1] - lo

        def window_body(begin, done, num_windows, sentences, begins, ends):
            end = fill(lo, n, begin)
            sentences, begins, ends = (sentences.write(num_windows, s), begins.write(num_windows, begin),
                                       ends.write(num_windows, end))
            last = end >= n
            next_begin = tf.cond(last, lambda: end, lambda: back_off(lo, n, begin, end))
            return next_begin, last, num_windows + 1, sentences, begins, ends

        _, _, num_windows, sentences, begins, ends = tf.while_loop(
            lambda begin, done, *_: tf.logical_not(done), window_body,
            (tf.constant(0), n <= 0, num_windows, sentences, begins, ends))
        return s + 1, num_windows, sentences, begins, ends

    _, _, sentences, begins, ends = tf.while_loop(
        lambda s, *_: s < num_sentences, sentence_body, (tf.constant(0), tf.constant(0)) + arrays)
    return sentences.stack(), begins.stack(), ends.stack()


def word_shapes(words: tf.Tensor) -> tf.Tensor:
    """conll.word_shape in-graph, on the same Unicode categories (RE2's \\p{Lu} and \\p{Ll})."""
    has_upper = tf.strings.regex_full_match(words, r"(?s).*\p{Lu}.*")
    has_lower = tf.strings.regex_full_match(words, r"(?s).*\p{Ll}.*")
    first_upper = tf.strings.regex_full_match(words, r"(?s)\p{Lu}.*")
    shape = lambda value: tf.fill(tf.shape(words), value)  # noqa: E731
    cased = tf.where(has_lower, tf.where(first_upper, shape(conll.SHAPE_TITLE), shape(conll.SHAPE_MIXED)),
                     shape(conll.SHAPE_UPPER))
    uncased = tf.where(has_lower, shape(conll.SHAPE_LOWER), shape(conll.SHAPE_NO_LETTERS))
    return tf.where(has_upper, cased, uncased)


class TaggingServing(serving.ServingModule):
    """text -> entities with character offsets, as TaggingTask.predict (each text is one sentence)."""

    def __init__(self, task, model: tf_keras.Model):
        tokenizer = task.tokenizer
        super().__init__(model, tokenizer, name="conll_ner_serving")
        config = task.config
        if config.labels[0] != "O":
            raise ValueError(f"labels must start with 'O', got {config.labels[0]!r}")
        self._config, self._tokenizer = config, tokenizer
        self._max_pieces = config.max_seq_length - 2
        self._max_words = config.words_per_window
        self._rules = decoding.chunk_rules(config.labels)
        self._types = tf.constant(self._rules.types)
        self.serve = tf.function(self._entities, input_signature=[tf.TensorSpec([None], tf.string)],
                                 autograph=task.autograph)

    def _entities(self, text: tf.Tensor) -> dict:
        cfg, tok = self._config, self._tokenizer
        seq_length, max_words = cfg.max_seq_length, self._max_words
        num_texts = tf.size(text)
        # Words (task._WORD): every match; what lies between matches is whitespace and is dropped.
        pieces, byte_begin, byte_end = tf_text.regex_split_with_offsets(text, _WORD, _WORD)
        keep = tf.logical_not(tf.strings.regex_full_match(pieces.flat_values, f"{_SPACE}+"))
        words = tf.ragged.boolean_mask(pieces, pieces.with_flat_values(keep))
        text_of_word = tf.gather(text, words.value_rowids())
        word_begin = tf.ragged.boolean_mask(byte_begin, pieces.with_flat_values(keep)).flat_values
        word_end = tf.ragged.boolean_mask(byte_end, pieces.with_flat_values(keep)).flat_values
        word_char_begin = serving.char_offsets(text_of_word, word_begin)
        word_char_end = serving.char_offsets(text_of_word, word_end)
        word_splits = tf.cast(words.row_splits, tf.int32)

        # Word pieces of every word; a word with none (e.g. a control character) is one [UNK].
        word_pieces = tok.tokenize(words.flat_values)
        empty = tf.equal(word_pieces.row_lengths(), 0)
        unk = tf.RaggedTensor.from_row_lengths(
            tf.fill([tf.reduce_sum(tf.cast(empty, tf.int32))], tok.unk_id), tf.cast(empty, tf.int64))
        word_pieces = tf.concat([word_pieces, unk], axis=1)
        counts = tf.cast(word_pieces.row_lengths(), tf.int32)

        # Windows (conll.plan_windows) and the window owning each word (decoding.owned_words).
        window_sentence, window_begin, window_end = plan_windows(
            counts, word_splits, max_pieces=self._max_pieces, max_words=max_words,
            overlap_pieces=self._max_pieces // 2)
        num_windows = tf.size(window_sentence)
        sentence_length = word_splits[1:] - word_splits[:-1]
        slots = tf.ragged.range(window_end - window_begin)
        slot_window = tf.cast(slots.value_rowids(), tf.int32)
        slot = tf.cast(slots.flat_values, tf.int32)
        word_in_sentence = tf.gather(window_begin, slot_window) + slot
        slot_sentence = tf.gather(window_sentence, slot_window)
        slot_word = tf.gather(word_splits, slot_sentence) + word_in_sentence
        owned = decoding.owned_words(window_sentence, window_begin, window_end, word_splits)

        # Model features (conll.encode_sentences): [CLS] pieces of the window's words [SEP].
        window_pieces = tf.gather(word_pieces, slots.with_flat_values(slot_word)).merge_dims(1, 2)
        window_pieces = window_pieces[:, :self._max_pieces]  # only a lone over-long word is cut
        special = lambda token_id: tf.fill([num_windows, 1], token_id)  # noqa: E731
        ids = tf.concat([special(tok.cls_id), window_pieces, special(tok.sep_id)], axis=1)
        # Each piece carries its word's shape (conll.word_shape), 0 on [CLS]/[SEP]/padding.
        piece_shapes = word_pieces.with_flat_values(tf.repeat(word_shapes(words.flat_values), counts))
        window_shapes = tf.gather(piece_shapes, slots.with_flat_values(slot_word)).merge_dims(1, 2)
        case_ids = tf.concat([special(0), window_shapes[:, :self._max_pieces], special(0)], axis=1)
        # Where each word's first piece sits: 1 ([CLS]) + the pieces of the window's earlier words.
        before = tf.cumsum(tf.gather(counts, slot_word), exclusive=True)
        before -= tf.gather(before, tf.gather(tf.cast(slots.row_starts(), tf.int32), slot_window))
        first_piece = slots.with_flat_values(1 + before)
        positions = tf.range(seq_length)[tf.newaxis]
        features = {
            "input_word_ids": ids.to_tensor(default_value=tok.pad_id, shape=[None, seq_length]),
            "input_mask": tf.cast(positions < tf.cast(ids.row_lengths(), tf.int32)[:, tf.newaxis], tf.int32),
            "input_type_ids": tf.zeros([num_windows, seq_length], tf.int32),
            "word_positions": first_piece.to_tensor(0, shape=[None, max_words]),
            "word_mask": tf.ones_like(first_piece).to_tensor(0, shape=[None, max_words]),
            "starts_sentence": tf.cast(tf.equal(window_begin, 0), tf.int32),
            "ends_sentence": tf.cast(tf.equal(window_end, tf.gather(sentence_length, window_sentence)), tf.int32),
        }
        if self.model.case_embedding is not None:
            features["input_case_ids"] = case_ids.to_tensor(0, shape=[None, seq_length])
        window_tags = self.model(features, training=False)["tags"]

        # Stitching and entities: decoding.stitch and decoding.entities, as evaluation and TaggingTask.predict.
        owned_mask = owned.to_tensor(False, shape=[None, max_words])
        word_tags = decoding.stitch(window_tags, owned_mask, window_sentence, window_begin, word_splits)
        found = decoding.entities(word_tags, word_splits, self._rules)
        row, first_word, last_word = found.sentence, found.first, found.last
        byte_start, byte_stop = tf.gather(word_begin, first_word), tf.gather(word_end, last_word)
        entity_text = tf.strings.substr(tf.gather(text, row), byte_start, byte_stop - byte_start, unit="BYTE")
        entity_type = tf.gather(self._types, found.tag)
        entities = lambda values: tf.RaggedTensor.from_value_rowids(  # noqa: E731
            values, tf.cast(row, tf.int64), tf.cast(num_texts, tf.int64))
        return {"num_entities": tf.cast(entities(row).row_lengths(), tf.int32),
                "entity_text": entities(entity_text).to_tensor(""),
                "entity_type": entities(entity_type).to_tensor(""),
                "start": entities(tf.gather(word_char_begin, first_word)).to_tensor(-1),
                "end": entities(tf.gather(word_char_end, last_word)).to_tensor(-1)}
