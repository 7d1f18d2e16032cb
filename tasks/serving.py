"""Serving SavedModels: raw strings in, each Task's answer out, tokenization and decoding in the graph.

One small tf.Module per Task, whose `serve` function becomes the `serving_default` signature:

  classification  sentence [n] (+ sentence_b [n] for pairs) -> label [n] string, label_id [n] int32,
                  probabilities [n, classes] float32
  squad           question [n], context [n] -> answer [n] string, score [n] float32 (start + end logit),
                  start/end [n] int32 character offsets of the answer in the context (-1: no answer)
  conll_ner       text [n] -> num_entities [n] int32 and, padded to the most entities of the batch,
                  entity_text/entity_type [n, k] string (""), start/end [n, k] int32 (-1) character offsets

Each module computes what its Task's host-side `predict` computes, in TensorFlow ops, so the export
needs no Python: WordPiece with the vocab saved as an asset (the folder is self-contained), SQuAD's
overlapping doc_stride windows with max-context n-best span decoding, CoNLL's word windows with their
owners, CRF Viterbi inside the model, and conlleval's chunk rules for entities. Character offsets are
Unicode code points, as Python string indices.

Loading needs the tensorflow-text ops registered: `import tensorflow_text` before tf.saved_model.load
(TF Serving needs a build with them). Signatures return dense tensors only (no ragged outputs).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text
import tf_keras

from tasks import conll, span_metrics
from tasks.tokenization import WordPieceTokenizer

SIGNATURE = "serving_default"

# CoNLL word splitting as tasks.tagging._WORD (`\w+(?:[.'’-]\w+)*|[^\w\s]`) in RE2 syntax. RE2's \w and \s
# are ASCII-only; these classes are Python's Unicode ones (identical on the Basic Multilingual Plane; a few
# recently added supplementary-plane letters may differ with the Unicode versions of Python and RE2).
_WORD_CHAR = r"[\p{L}\p{N}_]"
_SPACE = r"[\t\n\x0b\f\r\x1c-\x1f\x85\p{Z}]"
_WORD = rf"{_WORD_CHAR}+(?:[.'\x{{2019}}-]{_WORD_CHAR}+)*|[^\p{{L}}\p{{N}}_\t\n\x0b\f\r\x1c-\x1f\x85\p{{Z}}]"


# ------------------------------------------------------------------------------------------- helpers

def first_argmax(values: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """argmax whose ties go to the lowest index, as numpy (tf.argmax does not promise it)."""
    best = tf.reduce_max(values, axis=axis, keepdims=True)
    size = tf.shape(values, out_type=tf.int32)[axis]
    shape = [1] * values.shape.rank
    shape[axis] = -1
    index = tf.reshape(tf.range(size), shape) + tf.zeros_like(values, tf.int32)
    return tf.reduce_min(tf.where(tf.equal(values, best), index, size), axis=axis)


def _segment_first_best(scores: tf.Tensor, valid: tf.Tensor, segments: tf.Tensor, num_segments) -> tuple:
    """Per segment: (index of the first valid row with the highest score, or -1; that score, or the lowest value)."""
    lowest = tf.constant(-np.inf if scores.dtype.is_floating else scores.dtype.min, scores.dtype)
    masked = tf.where(valid, scores, lowest)
    best = tf.math.unsorted_segment_max(masked, segments, num_segments)
    rows = tf.range(tf.size(scores, out_type=tf.int32))
    big = tf.size(scores, out_type=tf.int32)
    is_best = valid & tf.equal(masked, tf.gather(best, segments))
    first = tf.math.unsorted_segment_min(tf.where(is_best, rows, big), segments, num_segments)
    found = first < big
    return tf.where(found, first, -1), tf.where(found, best, lowest)


def _char_offsets(texts: tf.Tensor, byte_offsets: tf.Tensor) -> tf.Tensor:
    """Byte offsets into `texts` (same shape, broadcast by row) -> character (code point) offsets."""
    prefix = tf.strings.substr(texts, tf.zeros_like(byte_offsets), byte_offsets, unit="BYTE")
    return tf.strings.length(prefix, unit="UTF8_CHAR")


class ServingModule(tf.Module):
    """Holds the model's variables and the tokenizer's vocab table (and its vocab.txt asset).

    Only the variables are tracked, not the Keras model itself: Keras' own SavedModel serialisation
    would trace every layer (slow, and fragile for subclassed models and Hub layers); the signature's
    graph is all that serving needs.
    """

    def __init__(self, model: tf_keras.Model, tokenizer: WordPieceTokenizer, name: str):
        super().__init__(name=name)
        self._model = _Untracked(model)
        self.model_variables = list(model.variables)
        self.wordpiece = tokenizer.wordpiece       # the lookup table; saves vocab.txt as an asset
        self.vocab_file = tf.saved_model.Asset(tokenizer.vocab_file)
        self.lower_case = tf.Variable(tokenizer.lower_case, trainable=False)

    @property
    def model(self) -> tf_keras.Model:
        return self._model.value

    def signatures(self) -> dict:
        return {SIGNATURE: self.serve.get_concrete_function()}


class _Untracked:
    """A plain holder, so tf.Module attribute tracking does not reach the Keras model."""

    def __init__(self, value):
        self.value = value


def save(module: ServingModule, export_dir: str) -> str:
    """Writes `module` as a SavedModel whose `serving_default` signature is `module.serve`."""
    tf.saved_model.save(module, export_dir, signatures=module.signatures())
    return export_dir


# ------------------------------------------------------------------------------------ classification

class ClassificationServing(ServingModule):
    """sentence (+ sentence_b) -> label, label_id, probabilities, as ClassificationTask.predict."""

    def __init__(self, task, model: tf_keras.Model):
        tokenizer = task.tokenizer
        super().__init__(model, tokenizer, name="classification_serving")
        config = task.config
        names = tf.constant(list(config.answer_labels))
        text = tf.TensorSpec([None], tf.string)

        def outputs(*texts):
            logits = self.model(tokenizer.encode(*texts), training=False)
            probabilities = task.probabilities(logits)
            label_id = first_argmax(probabilities)
            return {"label": tf.gather(names, label_id), "label_id": label_id, "probabilities": probabilities}

        if len(config.text_columns) == 1:
            self.serve = tf.function(lambda sentence: outputs(sentence), input_signature=[text])
        else:
            self.serve = tf.function(lambda sentence, sentence_b: outputs(sentence, sentence_b),
                                     input_signature=[text, text])


# ------------------------------------------------------------------------------------------- squad

class SquadServing(ServingModule):
    """question, context -> answer, score, start, end: SquadTask.predict in the graph.

    Every step of the host path is reproduced: HF-normalisation character by character with a
    byte -> character map (squad_data.normalize_with_map), WordPiece of the normalised text, question
    cut to max_query_length, BERT's doc_stride windows, one model call over all windows of the batch,
    max-context masks, n-best start/end candidates, the exhaustive fallback, best window per question,
    and the answer cut out of the original context.
    """

    def __init__(self, task, model: tf_keras.Model):
        config = task.config
        # The text is normalised here first (to keep the offset map), so the tokenizer must not
        # normalise again: lower_case=False, as squad_data.OffsetTokenizer does.
        tokenizer = WordPieceTokenizer(task.vocab_file, lower_case=False, seq_length=config.max_seq_length)
        super().__init__(model, tokenizer, name="squad_serving")
        self.lower_case.assign(config.lower_case)
        normalizer = WordPieceTokenizer(task.vocab_file, lower_case=config.lower_case)  # only .normalize is used
        settings = config.feature_settings
        if settings.max_query_length + 3 >= settings.max_seq_length:
            raise ValueError(f"max_seq_length {settings.max_seq_length} leaves no room for context after a "
                             f"{settings.max_query_length}-token question (max_query_length)")
        self._tokenizer, self._normalizer, self._config = tokenizer, normalizer, config
        text = tf.TensorSpec([None], tf.string)
        self.serve = tf.function(self._answer, input_signature=[text, text])

    def _tokenize(self, texts: tf.Tensor):
        """(ids [n, (pieces)], char_start, char_end in the original text, char -> byte offsets [n, (chars + 1)])."""
        chars, char_bytes = tf.strings.unicode_split_with_offsets(texts, "UTF-8")
        normalized_chars = self._normalizer.normalize(chars.flat_values)
        normalized = tf.strings.reduce_join(chars.with_flat_values(normalized_chars), axis=1)
        # Which original character each byte of the normalised text came from.
        char_in_row = tf.cast(tf.ragged.range(chars.row_lengths()).flat_values, tf.int32)
        byte_counts = tf.strings.length(normalized_chars)
        byte_to_char = tf.RaggedTensor.from_row_lengths(
            tf.repeat(char_in_row, byte_counts),
            tf.math.unsorted_segment_sum(tf.cast(byte_counts, tf.int64), chars.value_rowids(), tf.size(texts)))
        ids, begin, end = self._tokenizer.tokenize_with_offsets(normalized)
        ids, begin, end = (r.merge_dims(1, 2) for r in (ids, begin, end))
        base = tf.gather(byte_to_char.row_starts(), begin.value_rowids())
        flat_map = byte_to_char.flat_values
        char_start = tf.gather(flat_map, base + tf.cast(begin.flat_values, tf.int64))
        char_end = tf.gather(flat_map, base + tf.cast(end.flat_values, tf.int64) - 1) + 1
        lengths = tf.strings.length(texts)
        char_bytes = tf.concat([tf.cast(char_bytes, tf.int32), tf.cast(lengths, tf.int32)[:, tf.newaxis]], axis=1)
        return (ids, begin.with_flat_values(char_start), begin.with_flat_values(char_end), char_bytes)

    def _answer(self, question: tf.Tensor, context: tf.Tensor) -> dict:
        cfg = self._config
        seq_length, stride = cfg.max_seq_length, cfg.doc_stride
        tok = self._tokenizer
        question_ids = self._tokenize(question)[0][:, :cfg.max_query_length]
        doc_ids, doc_char_start, doc_char_end, char_bytes = self._tokenize(context)
        num_examples = tf.size(context)

        # Windows (squad_data.window_starts): start 0, s, 2s, ... until one reaches the end.
        q_len = tf.cast(question_ids.row_lengths(), tf.int32)
        n = tf.cast(doc_ids.row_lengths(), tf.int32)
        max_doc = seq_length - q_len - 3
        step = tf.minimum(max_doc, stride)
        windows_per_example = tf.where(n > max_doc, (n - max_doc + step - 1) // step + 1, 1)
        window_example = tf.repeat(tf.range(num_examples), windows_per_example)
        window_local = tf.cast(tf.ragged.range(windows_per_example).flat_values, tf.int32)
        doc_start = window_local * tf.gather(step, window_example)
        doc_len = tf.maximum(
            tf.minimum(tf.gather(n, window_example) - doc_start, tf.gather(max_doc, window_example)), 0)
        seq_offset = tf.gather(q_len, window_example) + 2

        # [CLS] question [SEP] context-window [SEP], padded to max_seq_length.
        doc_row_start = tf.cast(doc_ids.row_starts(), tf.int32)
        window_first_token = tf.gather(doc_row_start, window_example) + doc_start
        window_tokens = tf.ragged.range(doc_len) + window_first_token[:, tf.newaxis]
        window_doc_ids = tf.gather(doc_ids.flat_values, window_tokens)
        num_windows = tf.size(window_example)
        special = lambda token_id: tf.fill([num_windows, 1], token_id)  # noqa: E731
        pieces = tf.concat([special(tok.cls_id), tf.gather(question_ids, window_example), special(tok.sep_id),
                            window_doc_ids, special(tok.sep_id)], axis=1)
        input_ids = pieces.to_tensor(default_value=tok.pad_id, shape=[None, seq_length])
        positions = tf.range(seq_length)[tf.newaxis]
        used = tf.cast(pieces.row_lengths(), tf.int32)[:, tf.newaxis]
        input_mask = tf.cast(positions < used, tf.int32)
        type_ids = tf.cast((positions >= seq_offset[:, tf.newaxis]) & (positions < used), tf.int32)
        outputs = self.model({"input_word_ids": input_ids, "input_mask": input_mask, "input_type_ids": type_ids},
                             training=False)

        # Logits in context coordinates [windows, seq_length]: position t is context token doc_start + t.
        t = tf.range(seq_length)[tf.newaxis]
        in_doc = t < doc_len[:, tf.newaxis]
        at = tf.minimum(seq_offset[:, tf.newaxis] + t, seq_length - 1)
        minus_inf = tf.constant(-np.inf, tf.float64)
        starts = tf.where(in_doc, tf.cast(tf.gather(outputs["start_logits"], at, batch_dims=1), tf.float64), minus_inf)
        ends = tf.where(in_doc, tf.cast(tf.gather(outputs["end_logits"], at, batch_dims=1), tf.float64), minus_inf)

        # Max context (squad.max_context_masks): each context token counts only in the window where
        # min(left, right) + 0.01 * length is largest, the earlier window on ties.
        token_window = tf.cast(tf.ragged.range(doc_len).value_rowids(), tf.int32)
        token_t = tf.cast(tf.ragged.range(doc_len).flat_values, tf.int32)
        token_len = tf.gather(doc_len, token_window)
        token_id = tf.gather(window_first_token, token_window) + token_t
        score = (tf.cast(tf.minimum(token_t, token_len - 1 - token_t), tf.float64)
                 + 0.01 * tf.cast(token_len, tf.float64))
        owner, _ = _segment_first_best(score, tf.ones_like(score, tf.bool), token_id, tf.size(doc_ids.flat_values))
        is_max = tf.equal(tf.gather(owner, token_id), tf.range(tf.size(token_id)))
        max_context = tf.RaggedTensor.from_value_rowids(is_max, tf.cast(token_window, tf.int64),
                                                        tf.cast(num_windows, tf.int64))
        max_context = max_context.to_tensor(False, shape=[None, seq_length])

        # n-best (squad.best_spans): top n starts and ends among context tokens, valid pairs, best sum;
        # ties keep the first pair in (start rank, end rank) order.
        k = min(cfg.n_best_size, seq_length)
        start_values, start_at = tf.math.top_k(starts, k)
        end_values, end_at = tf.math.top_k(ends, k)
        start_ok = (start_values > minus_inf) & tf.gather(max_context, start_at, batch_dims=1)
        end_ok = end_values > minus_inf
        first, last = start_at[:, :, tf.newaxis], end_at[:, tf.newaxis, :]
        pair_ok = (start_ok[:, :, tf.newaxis] & end_ok[:, tf.newaxis, :] & (first <= last)
                   & (last < first + cfg.max_answer_length))
        pair_score = tf.reshape(start_values[:, :, tf.newaxis] + end_values[:, tf.newaxis, :], [-1, k * k])
        pair_ok = tf.reshape(pair_ok, [-1, k * k])
        best_pair = first_argmax(tf.where(pair_ok, pair_score, minus_inf))
        nbest_score = tf.gather(pair_score, best_pair, batch_dims=1)
        nbest_first = tf.gather(start_at, best_pair // k, batch_dims=1)
        nbest_last = tf.gather(end_at, best_pair % k, batch_dims=1)
        has_nbest = tf.reduce_any(pair_ok, axis=1)

        # Exhaustive fallback (squad._exhaustive_best_span) for questions without any valid n-best pair.
        band = t[:, :, tf.newaxis] + tf.range(cfg.max_answer_length)[tf.newaxis, tf.newaxis]  # [1, seq, A]
        band_ok = band < doc_len[:, tf.newaxis, tf.newaxis]
        band_ends = tf.where(band_ok, tf.gather(ends, tf.minimum(band, seq_length - 1)[0], axis=1), minus_inf)
        band_best = first_argmax(band_ends)
        fallback_scores = starts + tf.reduce_max(band_ends, axis=-1)
        fallback_ok = max_context & in_doc
        fallback_first = first_argmax(tf.where(fallback_ok, fallback_scores, minus_inf))
        fallback_score = tf.gather(fallback_scores, fallback_first, batch_dims=1)
        fallback_last = fallback_first + tf.gather(band_best, fallback_first, batch_dims=1)
        has_fallback = tf.reduce_any(fallback_ok, axis=1)

        # Best window per question: n-best spans if any window has one, else the fallback.
        any_nbest = tf.math.unsorted_segment_max(tf.cast(has_nbest, tf.int32), window_example, num_examples) > 0
        use_nbest = tf.gather(any_nbest, window_example)
        window_score = tf.where(use_nbest, nbest_score, fallback_score)
        window_ok = tf.where(use_nbest, has_nbest, has_fallback)
        winner, best_score = _segment_first_best(window_score, window_ok, window_example, num_examples)
        found = winner >= 0
        winner = tf.maximum(winner, 0)
        span_first = tf.gather(tf.where(use_nbest, nbest_first, fallback_first), winner)
        span_last = tf.gather(tf.where(use_nbest, nbest_last, fallback_last), winner)
        first_token = tf.gather(window_first_token, winner) + span_first  # index into all contexts' tokens
        last_token = first_token + span_last - span_first
        # Questions without any span (an empty context) answer "" at offsets -1; indices are clipped so
        # the gathers stay in range for them.
        def safe(values, index):
            return tf.gather(tf.concat([values, [0]], 0), tf.clip_by_value(index, 0, tf.size(values)))
        char_start = tf.where(found, safe(doc_char_start.flat_values, first_token), -1)
        char_end = tf.where(found, safe(doc_char_end.flat_values, last_token), -1)
        row_start = tf.cast(char_bytes.row_starts(), tf.int32)
        byte_start = tf.gather(char_bytes.flat_values, row_start + tf.maximum(char_start, 0))
        byte_end = tf.gather(char_bytes.flat_values, row_start + tf.maximum(char_end, 0))
        answer = tf.where(found, tf.strings.substr(context, byte_start, byte_end - byte_start, unit="BYTE"), "")
        return {"answer": answer, "score": tf.cast(best_score, tf.float32), "start": char_start, "end": char_end}


# ------------------------------------------------------------------------------------------ tagging

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


def _chunk_tables(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """conlleval's start/end-of-chunk rules as [previous tag, tag] boolean tables (span_metrics)."""
    # span_metrics' own rule functions, so the tables cannot drift from the host path.
    split_tag, start_of_chunk, end_of_chunk = (  # noqa: SLF001
        span_metrics._split_tag, span_metrics._start_of_chunk, span_metrics._end_of_chunk)
    split = [split_tag(label) for label in labels]
    starts = np.array([[start_of_chunk(p, c, pt, ct) for c, ct in split] for p, pt in split])
    ends = np.array([[end_of_chunk(p, c, pt, ct) for c, ct in split] for p, pt in split])
    outside = np.array([prefix == "O" for prefix, _ in split])
    # The vectorised extraction below relies on chunks never overlapping: a chunk starts only where the
    # previous one (if any) ends, and a chunk ends only where a new one starts or an O follows. True for
    # IOB2 label sets; refuse anything else rather than extract entities differently from the host path.
    if not (np.all(~starts | ends | outside[:, None]) and np.all(~ends | starts | outside[None, :])):
        raise ValueError(f"labels {list(labels)}: the serving export supports IOB2 label sets (O, B-X, I-X)")
    return starts, ends


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


class TaggingServing(ServingModule):
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
        starts, ends = _chunk_tables(config.labels)
        self._start_table, self._end_table = tf.constant(starts), tf.constant(ends)
        self._types = tf.constant([span_metrics._split_tag(label)[1] for label in config.labels])  # noqa: SLF001
        self.serve = tf.function(self._entities, input_signature=[tf.TensorSpec([None], tf.string)])

    def _entities(self, text: tf.Tensor) -> dict:
        cfg, tok = self._config, self._tokenizer
        seq_length, max_words = cfg.max_seq_length, self._max_words
        num_texts = tf.size(text)
        # Words (tagging._WORD): every match; what lies between matches is whitespace and is dropped.
        pieces, byte_begin, byte_end = tf_text.regex_split_with_offsets(text, _WORD, _WORD)
        keep = tf.logical_not(tf.strings.regex_full_match(pieces.flat_values, f"{_SPACE}+"))
        words = tf.ragged.boolean_mask(pieces, pieces.with_flat_values(keep))
        text_of_word = tf.gather(text, words.value_rowids())
        word_begin = tf.ragged.boolean_mask(byte_begin, pieces.with_flat_values(keep)).flat_values
        word_end = tf.ragged.boolean_mask(byte_end, pieces.with_flat_values(keep)).flat_values
        word_char_begin = _char_offsets(text_of_word, word_begin)
        word_char_end = _char_offsets(text_of_word, word_end)
        word_splits = tf.cast(words.row_splits, tf.int32)

        # Word pieces of every word; a word with none (e.g. a control character) is one [UNK].
        word_pieces = tok.tokenize(words.flat_values)
        empty = tf.equal(word_pieces.row_lengths(), 0)
        unk = tf.RaggedTensor.from_row_lengths(
            tf.fill([tf.reduce_sum(tf.cast(empty, tf.int32))], tok.unk_id), tf.cast(empty, tf.int64))
        word_pieces = tf.concat([word_pieces, unk], axis=1)
        counts = tf.cast(word_pieces.row_lengths(), tf.int32)

        # Windows (conll.plan_windows) and the window owning each word (conll.window_owners).
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
        length = tf.gather(sentence_length, slot_sentence)
        left = tf.where(tf.gather(window_begin, slot_window) > 0, slot, length)
        right = tf.where(tf.gather(window_end, slot_window) < length,
                         tf.gather(window_end, slot_window) - 1 - word_in_sentence, length)
        owner, _ = _segment_first_best(tf.minimum(left, right), tf.ones_like(slot, tf.bool), slot_word,
                                       tf.size(counts))
        owned = tf.equal(tf.gather(owner, slot_word), tf.range(tf.size(slot_word)))

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

        # Stitch the owned words back into sentences (conll.stitch), padded with O.
        slot_tags = tf.gather_nd(window_tags, tf.stack([slot_window, slot], axis=1))
        word_tags = tf.scatter_nd(tf.boolean_mask(slot_word, owned)[:, tf.newaxis], tf.boolean_mask(slot_tags, owned),
                                  [tf.size(counts)])
        tags = tf.RaggedTensor.from_row_splits(word_tags, words.row_splits).to_tensor(0)
        tags = tf.pad(tags, [[0, 0], [0, 1]])  # a trailing O closes every chunk, as conlleval's boundary
        width = tf.shape(tags)[1]

        # Chunks (span_metrics.extract_spans): start where the start rule fires, end at the next end rule.
        previous = tf.pad(tags[:, :-1], [[0, 0], [1, 0]])
        pairs = tf.stack([previous, tags], axis=-1)
        index = tf.range(width)[tf.newaxis]
        chunk_start = tf.gather_nd(self._start_table, pairs) & (index < sentence_length[:, tf.newaxis])
        chunk_end = tf.gather_nd(self._end_table, pairs)
        later_end = chunk_end[:, tf.newaxis, :] & (index[:, tf.newaxis, :] > index[:, :, tf.newaxis])
        next_end = tf.reduce_min(tf.where(later_end, index[:, tf.newaxis, :], width), axis=-1)
        where = tf.cast(tf.where(chunk_start), tf.int32)  # [entities, (row, first word)] in row-major order
        row, first = where[:, 0], where[:, 1]
        last = tf.gather_nd(next_end, where) - 1
        first_word = tf.gather(word_splits, row) + first
        last_word = tf.gather(word_splits, row) + last
        byte_start, byte_stop = tf.gather(word_begin, first_word), tf.gather(word_end, last_word)
        entity_text = tf.strings.substr(tf.gather(text, row), byte_start, byte_stop - byte_start, unit="BYTE")
        entity_type = tf.gather(self._types, tf.gather_nd(tags, where))
        entities = lambda values: tf.RaggedTensor.from_value_rowids(  # noqa: E731
            values, tf.cast(row, tf.int64), tf.cast(num_texts, tf.int64))
        return {"num_entities": tf.cast(entities(row).row_lengths(), tf.int32),
                "entity_text": entities(entity_text).to_tensor(""),
                "entity_type": entities(entity_type).to_tensor(""),
                "start": entities(tf.gather(word_char_begin, first_word)).to_tensor(-1),
                "end": entities(tf.gather(word_char_end, last_word)).to_tensor(-1)}


# ---------------------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(checkpoint: str) -> str:
    """A launch.train model_dir (its latest checkpoint) or a checkpoint prefix -> the prefix."""
    if os.path.isdir(checkpoint):
        latest = tf.train.latest_checkpoint(checkpoint)
        if latest:
            return latest
        found = sorted(os.listdir(checkpoint))[:12]
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: expected a launch.train --model_dir with a `checkpoint` "
                                f"file (or a checkpoint prefix such as {os.path.join(checkpoint, 'ckpt-100')}); the "
                                f"folder has {found or 'nothing'}")
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: no such folder or checkpoint (expected a launch.train "
                                f"--model_dir or a prefix with a {os.path.basename(checkpoint)}.index file)")
    return checkpoint


def _object_graph(reader) -> "trackable_object_graph_pb2.TrackableObjectGraph":
    from tensorflow.core.protobuf import trackable_object_graph_pb2  # noqa: PLC0415
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph


def _model_layout(prefix: str) -> Optional[tuple[dict, dict]]:
    """({variable key: shape}, {model child: sorted variable shapes under it}) of a checkpoint's `model`;
    None if it has no `model` (e.g. a bare encoder checkpoint)."""
    # The reader itself, not tf.train.load_checkpoint: that takes a ram:// prefix for a folder.
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    shapes = reader.get_variable_to_shape_map()
    graph = _object_graph(reader)
    roots = {child.local_name: child.node_id for child in graph.nodes[0].children}
    if "model" not in roots:
        return None
    variables = {key: tuple(shape) for key, shape in shapes.items()
                 if key.startswith("model/") and key.endswith("VARIABLE_VALUE") and "OPTIMIZER_SLOT" not in key}

    def shapes_under(node_id: int) -> list:
        seen, stack, found = {node_id}, [node_id], []
        while stack:
            node = graph.nodes[stack.pop()]
            found += [list(shapes[a.checkpoint_key]) for a in node.attributes
                      if a.name == "VARIABLE_VALUE" and a.checkpoint_key in shapes]
            for child in node.children:
                if child.node_id not in seen:
                    seen.add(child.node_id)
                    stack.append(child.node_id)
        return sorted(found)

    children = {c.local_name: shapes_under(c.node_id) for c in graph.nodes[roots["model"]].children}
    return variables, children


def _shorten(items: list, limit: int = 8) -> str:
    return "; ".join(items[:limit]) + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def restore(model: tf_keras.Model, checkpoint: str, *, expected: str) -> str:
    """Loads the `model` weights of a launch.train checkpoint; returns the checkpoint prefix used.

    The checkpoint must hold exactly this model: same variables and shapes AND the same layer layout
    (a 2-class classifier and a span-QA head have identical variables, only their layer order
    differs). Anything else is one ValueError naming `expected` and what the checkpoint holds.
    """
    prefix = resolve_checkpoint(checkpoint)
    try:
        found = _model_layout(prefix)
    except (tf.errors.OpError, ValueError) as error:
        raise ValueError(f"checkpoint {prefix!r} cannot be read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); expected a launch.train checkpoint of "
                         f"{expected}") from None
    if found is None:
        graph = _object_graph(tf.compat.v1.train.NewCheckpointReader(prefix))
        held = sorted(child.local_name for child in graph.nodes[0].children)
        raise ValueError(f"checkpoint {prefix!r} holds {held}, not a `model`: expected a launch.train checkpoint of "
                         f"{expected} (an encoder checkpoint goes to --init_encoder)")
    reference = "ram://serving_reference/" + os.urandom(6).hex()
    try:
        want = _model_layout(tf.train.Checkpoint(model=model).write(reference + "/ckpt"))
    finally:
        tf.io.gfile.rmtree(reference)
    (want_vars, want_layout), (found_vars, found_layout) = want, found
    problems = []
    missing = [f"{k} {list(s)}" for k, s in want_vars.items() if k not in found_vars]
    unexpected = [f"{k} {list(s)}" for k, s in found_vars.items() if k not in want_vars]
    mis_shaped = [f"{k}: expected {list(s)}, found {list(found_vars[k])}" for k, s in want_vars.items()
                  if k in found_vars and found_vars[k] != s]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            problems.append(f"{len(items)} {title} variable(s): {_shorten(sorted(items))}")
    if not problems:
        layout = [f"model/{name}: expected {len(want_layout.get(name, []))} variable(s) "
                  f"{want_layout.get(name, [])[:2]}, found {len(found_layout.get(name, []))} "
                  f"{found_layout.get(name, [])[:2]}"
                  for name in sorted(set(want_layout) | set(found_layout))
                  if want_layout.get(name) != found_layout.get(name)]
        if layout:
            problems.append("a different layer layout (another task's model?): " + _shorten(layout))
    if problems:
        raise ValueError(f"checkpoint {prefix!r} does not match {expected} ({len(want_vars)} model variables); "
                         f"it holds {len(found_vars)} model variables with\n  " + "\n  ".join(problems))
    status = tf.train.Checkpoint(model=model).read(prefix)
    status.assert_existing_objects_matched().expect_partial()
    return prefix


# ------------------------------------------------------------------------------------------ builders

SERVING_MODULES = {"classification": ClassificationServing, "squad": SquadServing, "conll_ner": TaggingServing}


def serving_module(task, model: tf_keras.Model) -> ServingModule:
    """The serving module for a built Task and its (restored) model."""
    kind = "classification" if task.name == "classification" else task.name
    if kind not in SERVING_MODULES:
        raise ValueError(f"no serving export for task {task.name!r}; expected one of {sorted(SERVING_MODULES)}")
    return SERVING_MODULES[kind](task, model)
