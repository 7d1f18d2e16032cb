"""CoNLL-2003 reading, word-piece alignment and windowing, all precomputed into fixed-shape arrays.

The encoder sees sub-tokens; the CRF runs over words. Each word is represented by its FIRST
sub-token: `word_positions[i]` is where word i's first piece sits in `input_word_ids`, and the
model gathers those positions before the tag head. Precomputing ids once in Python (tokenizing
each distinct word once, in one tf-text call) keeps the tf.data pipeline to slicing arrays:
fast, deterministic, and trivially checkpointable.

Sentences longer than one sequence are never cut: they become overlapping windows, and every
word is *owned* by the window in which it has the most context on both sides (the SQuAD
doc-stride rule). Only owned words are scored, so stitching the owned words of all windows back
together yields exactly one prediction per word of the sentence. Ownership and stitching are
decoding.py's TensorFlow functions, shared with predict and the serving export.
"""
from __future__ import annotations

import dataclasses
import logging
import unicodedata
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from tasks import textfiles
from tasks.ner import decoding

CONLL2003_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC")
CONLL2003_COLUMNS = 4  # WORD POS CHUNK NER


# Word shapes for uncased encoders, which never see capitalisation, the strongest single NER cue
# ("Apple" vs "apple", "US" vs "us"). 0 is [CLS]/[SEP]/padding. Defined on Unicode categories Lu/Ll
# so that the in-graph version in tasks/ner/serving.py (RE2 \p{Lu}/\p{Ll}) computes the same thing.
SHAPE_NONE, SHAPE_NO_LETTERS, SHAPE_LOWER, SHAPE_UPPER, SHAPE_TITLE, SHAPE_MIXED = range(6)
NUM_SHAPES = 6


def word_shape(word: str) -> int:
    """SHAPE_UPPER "EU", SHAPE_TITLE "Germany", SHAPE_LOWER "said", SHAPE_MIXED "iPhone", SHAPE_NO_LETTERS "1996"."""
    categories = [unicodedata.category(c) for c in word]
    has_upper, has_lower = "Lu" in categories, "Ll" in categories
    if not has_upper:
        return SHAPE_LOWER if has_lower else SHAPE_NO_LETTERS
    if not has_lower:
        return SHAPE_UPPER
    return SHAPE_TITLE if categories[0] == "Lu" else SHAPE_MIXED


@dataclasses.dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


def read_conll(path: str, *, labels: Sequence[str] = CONLL2003_LABELS,
               num_columns: int = CONLL2003_COLUMNS) -> list[Sentence]:
    """Sentences of a CoNLL file: blank lines separate them, `-DOCSTART-` lines are dropped.

    The tag is the last column. A line with another number of columns, or a tag outside
    `labels`, raises InputError naming the file and the line, because a silently skipped or
    mis-split line shifts every later tag and corrupts the F1 without any other symptom.
    IOB1 tags are converted to IOB2 (see `iob1_to_iob2`), saying so in one log line.
    """
    label_set = set(labels)
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []

    def close_sentence():
        if words:
            sentences.append(Sentence(tuple(words), tuple(tags)))
            words.clear()
            tags.clear()

    for line_number, line in textfiles.read_lines(path, missing="--train_data/--eval_data"):
        columns = line.split()
        if not columns:
            close_sentence()
            continue
        if columns[0] == "-DOCSTART-":
            close_sentence()
            continue
        if len(columns) != num_columns:
            raise textfiles.InputError(path, line_number, f"expected {num_columns} columns, got {len(columns)}: "
                                       f"{line.rstrip()!r}")
        if columns[-1] not in label_set:
            raise textfiles.InputError(path, line_number, f"unknown tag {columns[-1]!r}; expected one of "
                                       f"{sorted(label_set)}")
        words.append(columns[0])
        tags.append(columns[-1])
    close_sentence()
    converted = [iob1_to_iob2(s.tags) for s in sentences]
    opened = sum(changes for _, changes in converted)
    if opened:
        logging.warning("%s: IOB1 tags: %d I- tags that begin an entity became B- (IOB2, as the CRF's "
                        "constraints and conlleval's chunks assume)", path, opened)
        sentences = [Sentence(s.words, tags) for s, (tags, _) in zip(sentences, converted)]
    return sentences


def iob1_to_iob2(tags: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """(IOB2 tags, how many changed): an I-X that begins an entity (first word, or after O or another type)
    becomes B-X. IOB1 files (the original CoNLL-2003 release) use B- only between two adjacent entities
    of one type; read as IOB2, their I- starts are transitions the CRF's IOB2 constraints forbid."""
    out, changed = [], 0
    for tag in tags:
        previous = out[-1] if out else "O"
        if tag.startswith("I-") and previous[2:] != tag[2:]:  # "O"[2:] is "": no type
            tag = "B-" + tag[2:]
            changed += 1
        out.append(tag)
    return tuple(out), changed


def plan_windows(piece_counts: Sequence[int], *, max_pieces: int, max_words: int,
                 overlap_pieces: int) -> list[tuple[int, int]]:
    """Word ranges `[begin, end)` covering a sentence, each within `max_pieces` sub-tokens and `max_words`.

    Consecutive windows share up to `overlap_pieces` sub-tokens of words so that words near a
    cut still see context on both sides. A single word with more than `max_pieces` pieces gets a
    window of its own (its pieces are truncated later; its first piece, which is what gets tagged,
    always survives).
    """
    if max_pieces < 1 or max_words < 1:
        raise ValueError("max_pieces and max_words must be positive")
    num_words = len(piece_counts)
    windows: list[tuple[int, int]] = []
    begin = 0
    while begin < num_words:
        end, used = begin, 0
        while end < num_words and end - begin < max_words and (end == begin or used + piece_counts[end] <= max_pieces):
            used += piece_counts[end]
            end += 1
        windows.append((begin, end))
        if end == num_words:
            break
        # Next window starts as far back as the overlap budget allows, but always moves forward
        # and always leaves room for the first new word, so consecutive windows never coincide.
        next_begin, overlap = end, 0
        while (next_begin - 1 > begin and end - next_begin + 2 <= max_words
               and overlap + piece_counts[next_begin - 1] <= min(overlap_pieces, max_pieces - piece_counts[end])):
            next_begin -= 1
            overlap += piece_counts[next_begin]
        begin = next_begin
    return windows


@dataclasses.dataclass(frozen=True)
class WindowSource:
    """Where a window's words come from: sentence `sentence`, words `[begin, begin + num_words)`."""
    sentence: int
    begin: int
    num_words: int


def encode_sentences(sentences: Sequence[Sentence], word_pieces: Mapping[str, Sequence[int]], *,
                     labels: Sequence[str], max_seq_length: int, max_words: int,
                     cls_id: int, sep_id: int, pad_id: int,
                     overlap_pieces: Optional[int] = None) -> tuple[dict[str, np.ndarray], list[WindowSource]]:
    """Fixed-shape int32 arrays, one row per window, plus where each window comes from.

    Arrays: input_word_ids/input_mask/input_type_ids [N, max_seq_length] (`[CLS] pieces [SEP]`),
    input_case_ids [N, max_seq_length] (each piece carries its word's `word_shape`, 0 elsewhere),
    word_positions/word_mask/owned_mask/tags [N, max_words], starts_sentence/ends_sentence and
    example_index [N]. `word_pieces` maps every word to its sub-token ids (at least one).
    """
    max_pieces = max_seq_length - 2
    if overlap_pieces is None:
        overlap_pieces = max_pieces // 2
    tag_index = {tag: i for i, tag in enumerate(labels)}
    sources: list[WindowSource] = []
    for sentence_index, sentence in enumerate(sentences):
        counts = [len(word_pieces[w]) for w in sentence.words]
        for begin, end in plan_windows(counts, max_pieces=max_pieces, max_words=max_words,
                                       overlap_pieces=overlap_pieces):
            sources.append(WindowSource(sentence_index, begin, end - begin))
    # Which window scores each word: decoding.owned_words, as predict and the serving export decide it.
    owned_rows = decoding.owned_words(*_window_arrays(sources), sentence_splits(sentences)).to_list()
    rows = [(sentences[s.sentence], s.sentence, s.begin, s.begin + s.num_words, owned)
            for s, owned in zip(sources, owned_rows)]

    n = len(rows)
    sequence_arrays = ("input_word_ids", "input_mask", "input_type_ids", "input_case_ids")
    arrays = {name: np.zeros([n, max_seq_length], np.int32) for name in sequence_arrays}
    arrays.update({name: np.zeros([n, max_words], np.int32) for name in ("word_positions", "word_mask", "owned_mask", "tags")})
    arrays.update(starts_sentence=np.zeros([n], np.int32), ends_sentence=np.zeros([n], np.int32),
                  example_index=np.arange(n, dtype=np.int32))
    for row, (sentence, _, begin, end, owned) in enumerate(rows):
        ids = [cls_id]
        for slot, word in enumerate(sentence.words[begin:end]):
            arrays["word_positions"][row, slot] = len(ids)
            # Truncation can only hit a lone over-long word (see plan_windows); its first piece stays.
            kept = word_pieces[word][:max_pieces + 1 - len(ids)]
            arrays["input_case_ids"][row, len(ids):len(ids) + len(kept)] = word_shape(word)
            ids.extend(kept)
            arrays["tags"][row, slot] = tag_index[sentence.tags[begin + slot]]
        ids.append(sep_id)
        arrays["input_word_ids"][row, :len(ids)] = ids
        arrays["input_word_ids"][row, len(ids):] = pad_id
        arrays["input_mask"][row, :len(ids)] = 1
        arrays["word_mask"][row, :end - begin] = 1
        arrays["owned_mask"][row, :end - begin] = owned
        arrays["starts_sentence"][row] = int(begin == 0)
        arrays["ends_sentence"][row] = int(end == len(sentence.words))
    return arrays, sources


def sentence_splits(sentences: Sequence[Sentence]) -> np.ndarray:
    """[sentences + 1] int32: where each sentence's words start among all sentences' words."""
    return np.cumsum([0] + [len(s.words) for s in sentences], dtype=np.int64).astype(np.int32)


def _window_arrays(sources: Sequence[WindowSource]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sentence, begin, end) [windows] int32."""
    table = np.array([(s.sentence, s.begin, s.begin + s.num_words) for s in sources], np.int32).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]


def stitch(predicted: np.ndarray, owned_mask: np.ndarray, example_index: np.ndarray,
           sources: Sequence[WindowSource], sentence_lengths: Sequence[int]) -> list[list[int]]:
    """Per-sentence word tag ids from per-window predictions [N, max_words] (decoding.stitch), owned words only.

    Raises if any word of any sentence ends up without a prediction (e.g. a window went missing),
    because a silently unscored word would inflate F1.
    """
    window_sentence, window_begin, _ = _window_arrays([sources[int(i)] for i in example_index])
    splits = np.cumsum([0] + list(sentence_lengths), dtype=np.int64).astype(np.int32)
    tags = decoding.stitch(np.asarray(predicted), np.asarray(owned_mask), window_sentence, window_begin,
                           splits).numpy()
    missing = np.flatnonzero(tags < 0)
    if missing.size:
        sentence_index = int(np.searchsorted(splits, missing[0], side="right") - 1)
        raise ValueError(f"sentence {sentence_index}: word {int(missing[0] - splits[sentence_index])} got no "
                         "prediction; were all windows of the split evaluated?")
    return [tags[splits[i]:splits[i + 1]].tolist() for i in range(len(sentence_lengths))]


def word_pieces_for(words: Iterable[str], tokenize: Callable[[list[str]], list[list[int]]],
                    unk_id: int) -> dict[str, list[int]]:
    """Sub-token ids of each distinct word, tokenized in one call; words with no pieces map to [UNK]."""
    distinct = sorted(set(words))
    pieces = tokenize(distinct) if distinct else []
    return {word: (list(ids) or [unk_id]) for word, ids in zip(distinct, pieces)}
