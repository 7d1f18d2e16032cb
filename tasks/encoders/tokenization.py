"""WordPiece tokenization and BERT input packing, in-graph with tensorflow-text.

Runs inside `tf.data` so the input pipeline is checkpointable and needs no Python per example.
Packing gives what Model Garden's `BertPackInputs` (the layer TF Hub preprocessors export) gives, ids, mask,
type ids and round-robin truncation alike (tests/test_tokenization.py compares the two), in a few dense ops:
`BertPackInputs` concatenates ragged tensors and checks their row partitions: ~150 more graph nodes executed
per serving call (more in untaken assert branches), ~0.2 ms of a batch-1 call (bench/RESULTS.md, thirty-second
session).

The text normalisation is HF's BertNormalizer (= google-research/bert's BasicTokenizer), not
tensorflow-text's: tf_text.BertTokenizer(lower_case=True) applies ICU NFKC_Casefold, which rewrites
compatibility characters ("ﬁ" -> "fi", "Ⅻ" -> "xii", full-width letters, "ß" -> "ss") and turns control
characters into spaces. The released BERT/MiniLM weights were trained on the HF/google-research ids, and
tests/test_tokenization.py checks ours are identical to HF `tokenizers` on SST-2 and tricky strings.
"""
from __future__ import annotations

import codecs
import os
from typing import Mapping, Sequence

import tensorflow as tf
import tensorflow_text as tf_text
# The op behind tf_text.regex_split_with_offsets, whose wrapper re-validates the op's own row splits (see _words).
from tensorflow_text.python.ops.regex_split_ops import gen_regex_split_ops

from engine import inputs
from tasks import textfiles

# Words longer than this many characters (not bytes, unlike tf_text's max_bytes_per_word) become [UNK].
MAX_CHARS_PER_WORD = 100
# HF clean_text: control/format/private-use characters and U+FFFD are deleted (tab/newline/CR are whitespace).
_DELETED = r"[^\P{C}\t\n\r]|\x{FFFD}"
# Word splitting, as BasicTokenizer: whitespace (incl. no-break/ideographic spaces) is dropped; ASCII
# punctuation, Unicode punctuation and each CJK ideograph become words of their own.
_WHITESPACE = r"[\s\p{Zs}\x{2028}\x{2029}]+"
_PUNCTUATION = r"[!-/]|[:-@]|[\[-`]|[{-~]|\p{P}"
_CJK = "|".join(f"[\\x{{{lo}}}-\\x{{{hi}}}]" for lo, hi in (
    ("4E00", "9FFF"), ("3400", "4DBF"), ("20000", "2A6DF"), ("2A700", "2B73F"), ("2B740", "2B81F"),
    ("2B820", "2CEAF"), ("F900", "FAFF"), ("2F800", "2FA1F")))
_SPLIT = f"{_WHITESPACE}|{_PUNCTUATION}|{_CJK}"
_KEEP = f"{_PUNCTUATION}|{_CJK}"
_UNK = "[UNK]"


def read_vocab(vocab_file: str) -> list[str]:
    """The tokens of a vocab.txt, one a line (a BOM and CRLF line ends dropped)."""
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"vocab file not found: {vocab_file}")
    return [line for _, line in textfiles.read_lines(vocab_file)]


def _vocab_table(vocab_file: str, vocab: Sequence[str]):
    """What tf_text.WordpieceTokenizer looks tokens up in: the file itself when it is plain "token\n" lines
    (then a SavedModel keeps it as an asset), else a table of the tokens `read_vocab` found, because the
    file-backed table would keep a BOM in the first token and "\r" at the end of every token."""
    with open(vocab_file, "rb") as f:
        raw = f.read()
    if not raw.startswith(codecs.BOM_UTF8) and b"\r" not in raw:
        return vocab_file
    initializer = tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(vocab)), tf.range(len(vocab), dtype=tf.int64))
    return tf.lookup.StaticVocabularyTable(initializer, num_oov_buckets=1)


class WordPieceTokenizer:
    """Lower-casing BERT tokenizer + `[CLS] a [SEP] (b [SEP])` packing to a fixed `seq_length`."""

    def __init__(self, vocab_file: str, *, lower_case: bool = True, seq_length: int = 128):
        self.vocab_file = vocab_file
        self.vocab = read_vocab(vocab_file)
        self.lower_case = lower_case
        self.seq_length = seq_length
        index = {token: i for i, token in enumerate(self.vocab)}
        missing = [t for t in ("[PAD]", _UNK, "[CLS]", "[SEP]") if t not in index]
        if missing:
            raise ValueError(f"{vocab_file}: special tokens {missing} are missing; is this a BERT vocab.txt?")
        self.pad_id, self.unk_id = index["[PAD]"], index[_UNK]
        self.cls_id, self.sep_id = index["[CLS]"], index["[SEP]"]
        # Up to 4 UTF-8 bytes per character; the character limit itself is applied in `tokenize` and
        # `tokenize_with_offsets`.
        self._wordpiece = tf_text.WordpieceTokenizer(
            _vocab_table(vocab_file, self.vocab), token_out_type=tf.int32, unknown_token=_UNK,
            max_bytes_per_word=4 * MAX_CHARS_PER_WORD)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def wordpiece(self) -> tf_text.WordpieceTokenizer:
        """The tf.Module owning the vocab lookup table: attach it to anything saved as a SavedModel that
        calls this tokenizer, so the table and its vocab.txt asset are saved with it."""
        return self._wordpiece

    def normalize(self, texts: tf.Tensor) -> tf.Tensor:
        """HF BertNormalizer: delete control characters; if lower_case, NFD, drop accents, lower-case."""
        texts = tf.strings.regex_replace(texts, _DELETED, "")
        if self.lower_case:
            texts = tf.strings.regex_replace(tf_text.normalize_utf8(texts, "NFD"), r"\p{Mn}", "")
            # Per-character lower-casing as HF: ICU would make a word-final capital sigma "ς"; the only
            # context-dependent rule without a locale, so pre-empting it makes the two agree.
            texts = tf.strings.lower(tf.strings.regex_replace(texts, "Σ", "σ"), encoding="utf-8")
        return texts

    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """[batch] strings -> [batch, (wordpieces)] int32 ids."""
        words = self._words(texts)[0]
        # A word of more than MAX_CHARS_PER_WORD characters is looked up as the text "[UNK]", which WordPiece
        # matches whole: one [UNK], as tokenize_with_offsets gives. Half the ops of patching its ragged ids after
        # the lookup (one sentence in a tf.function: 0.7 instead of 1.4 ms on the Xeon; bench/RESULTS.md).
        words = words.with_flat_values(tf.where(_too_long(words), _UNK, words.flat_values))
        pieces = self._wordpiece.tokenize(words)  # [batch, (words), (wordpieces)]
        # merge_dims(-2, -1), without the check of row splits that merge_dims adds (they come from the op).
        return tf.RaggedTensor.from_row_splits(pieces.flat_values,
                                               tf.gather(pieces.values.row_splits, pieces.row_splits),
                                               validate=False)

    def _words(self, texts: tf.Tensor):
        """[batch] strings -> normalized words [batch, (words)] and their byte offsets, as BasicTokenizer splits."""
        # tf_text.regex_split_with_offsets with the same patterns, minus its three checks of the row splits the
        # op itself returned: each is a cond of ~30 graph nodes that every serving call executes.
        words, begin, end, row_splits = gen_regex_split_ops.regex_split_with_offsets(
            self.normalize(texts), f"({_SPLIT})", f"({_KEEP})")
        return tuple(tf.RaggedTensor.from_row_splits(t, row_splits, validate=False) for t in (words, begin, end))

    def tokenize_with_offsets(self, texts: tf.Tensor):
        """[batch] strings -> (ids, begin, end) ragged [batch, (words), (wordpieces)].

        Offsets are byte offsets into `normalize(texts)` (as with tf_text.BertTokenizer): with
        lower_case=False and no control characters that is the input text itself."""
        words, word_begin, _ = self._words(texts)
        ids, begin, end = self._wordpiece.tokenize_with_offsets(words)
        # Words of more than MAX_CHARS_PER_WORD characters are one [UNK] spanning the word.
        too_long = _too_long(words)
        word_bytes = tf.cast(tf.strings.length(words.flat_values), begin.dtype)
        ids = ids.with_values(_replace_rows(ids.values, too_long, tf.fill(tf.shape(too_long), self.unk_id)))
        begin = begin.with_values(_replace_rows(begin.values, too_long, tf.zeros_like(word_bytes)))
        end = end.with_values(_replace_rows(end.values, too_long, word_bytes))
        word_begin = tf.expand_dims(word_begin, axis=2)
        return ids, word_begin + begin, word_begin + end

    def pack(self, segments: Sequence[tf.RaggedTensor], seq_length: int | None = None,
             pad_to_multiple: int | None = None) -> Mapping[str, tf.Tensor]:
        """Packs 1 or 2 tokenized segments ([batch, (ids)] int32), truncating round-robin, into BERT's three int32
        inputs `[CLS] a [SEP] (b [SEP])`, as Model Garden's BertPackInputs: [batch, seq_length], or with
        `pad_to_multiple` k [batch, width], the longest packed row rounded up to k, at most seq_length."""
        seq_length = seq_length or self.seq_length
        budget = seq_length - len(segments) - 1  # room for wordpieces beside [CLS] and the [SEP]s
        if not 1 <= len(segments) <= 2:
            raise ValueError(f"BERT inputs pack 1 or 2 segments, not {len(segments)}")
        if budget < 0:
            raise ValueError(f"seq_length {seq_length} has no room for [CLS] and {len(segments)} [SEP]")
        kept = _round_robin(*(tf.cast(s.row_lengths(), tf.int32) for s in segments), budget=budget)
        total = tf.add_n(kept) + len(segments) + 1
        width = inputs.width_for_lengths(total, seq_length, pad_to_multiple) if pad_to_multiple else seq_length
        position = tf.range(width)[None, :] + tf.zeros_like(total)[:, None]  # [batch, width]
        row_start = tf.range(tf.shape(total)[0])[:, None] * seq_length  # of each row in [batch * seq_length]
        ids = tf.where(position == 0, self.cls_id, self.pad_id)
        type_ids = tf.zeros_like(ids)
        first = tf.ones_like(total)[:, None]  # where the segment's wordpieces start
        for i, (segment, k) in enumerate(zip(segments, kept)):
            sep = first + k[:, None]
            flat = tf.reshape(segment.to_tensor(self.pad_id, shape=[None, seq_length]), [-1])
            inside = (position >= first) & (position < sep)
            ids = tf.where(inside, tf.gather(flat, tf.where(inside, position - first, 0) + row_start), ids)
            ids = tf.where(position == sep, self.sep_id, ids)
            if i:
                type_ids = tf.where((position >= first) & (position <= sep), 1, type_ids)
            first = sep + 1
        return {"input_word_ids": ids, "input_mask": tf.cast(position < total[:, None], tf.int32),
                "input_type_ids": type_ids}

    def encode(self, *texts: tf.Tensor, seq_length: int | None = None,
               pad_to_multiple: int | None = None) -> Mapping[str, tf.Tensor]:
        """Raw strings ([batch] each, one or two segments) -> packed model inputs.

        Padded to `seq_length` (a fixed shape: tf.data, TPUs); with `pad_to_multiple` k, only to the batch's
        longest sequence rounded up to a multiple of k, at most `seq_length` (HF's `padding=True` is k=1).
        Truncation is the same either way: the ids are those of the fixed shape, minus trailing padding."""
        return self.pack([self.tokenize(t) for t in texts], seq_length, pad_to_multiple)


def _round_robin(*lengths: tf.Tensor, budget: int) -> list[tf.Tensor]:
    """Per row, how many wordpieces each of 1-2 segments keeps when `budget` of them are dealt one at a time to
    each segment in turn that has any left, the first segment first (tf_text.RoundRobinTrimmer's rule)."""
    if len(lengths) == 1:
        return [tf.minimum(lengths[0], budget)]
    a, b = lengths
    return [tf.minimum(a, tf.maximum((budget + 1) // 2, budget - b)),
            tf.minimum(b, tf.maximum(budget // 2, budget - a))]


def _too_long(words: tf.RaggedTensor) -> tf.Tensor:
    """Per word (flat): more than MAX_CHARS_PER_WORD characters, which BERT's WordPiece gives as one [UNK]."""
    return tf.strings.length(words.flat_values, unit="UTF8_CHAR") > MAX_CHARS_PER_WORD


def _replace_rows(rows: tf.RaggedTensor, replace: tf.Tensor, values: tf.Tensor) -> tf.RaggedTensor:
    """rows [n, (k)] with row i replaced by [values[i]] where replace[i]."""
    n = tf.shape(replace, out_type=rows.row_splits.dtype)[0]
    singletons = tf.RaggedTensor.from_row_lengths(tf.cast(values, rows.dtype), tf.ones([n], rows.row_splits.dtype))
    index = tf.where(replace, tf.range(n) + n, tf.range(n))
    return tf.gather(tf.concat([rows, singletons], axis=0), index)
