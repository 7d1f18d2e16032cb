"""SQuAD's serving signature: question, context -> answer, score, start, end, decoded in the graph."""
from __future__ import annotations

import tensorflow as tf
import tf_keras

from tasks import serving
from tasks.encoders.tokenization import WordPieceTokenizer
from tasks.squad import decoding

class SquadServing(serving.ServingModule):
    """question, context -> answer, score, start, end: SquadTask.predict in the graph.

    The host path's windowing is reproduced from raw strings: HF-normalisation character by character
    with a byte -> character map (squad_data.normalize_with_map), WordPiece of the normalised text,
    question cut to max_query_length, BERT's doc_stride windows, one model call over all windows of the
    batch; the span choice is decoding.best_spans itself, and the answer is cut out of the original context.
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
        self.serve = tf.function(self._answer, input_signature=[text, text], autograph=task.autograph)

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

        # The span choice (decoding.py, as evaluation and SquadTask.predict): max context, n-best, fallback.
        spans = decoding.best_spans(
            outputs["start_logits"], outputs["end_logits"], window_example=window_example, doc_start=doc_start,
            doc_len=doc_len, seq_offset=seq_offset, num_examples=num_examples, n_best_size=cfg.n_best_size,
            max_answer_length=cfg.max_answer_length)
        found, best_score = spans.found, spans.score
        first_token = doc_row_start + spans.first  # index into all contexts' tokens
        last_token = doc_row_start + spans.last
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

