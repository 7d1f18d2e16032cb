"""SQuAD v1.1 data: JSON reader, question+context windows with character offsets, TFRecord cache.

Splits. Given a training and an evaluation file (`--train_data`, `--eval_data`), each is read whole
(split "all"). Given one file (by default the official dev file `squad/dev-v1.1.json`, 48 articles,
as no train file exists here), it is split *by article*, deterministically in file order: the last
`EVAL_ARTICLE_FRACTION` (a fifth, at least one) of the articles are "eval" (alias "validation"), the
others "train" (38 and 10 for the dev file). No article is in both, so no paragraph or near-duplicate
question leaks from training into evaluation.

Offsets. A feature is `[CLS] question [SEP] context-window [SEP] [PAD]...`. Every context token keeps
the character span it came from in the *original* context, so a predicted span maps back to the
exact original substring. The tokenizer's offsets are byte offsets into the text *after* its
normalisation (control characters deleted, NFD, accents dropped, lower case), which shift on
non-ASCII text. So we normalise each original character ourselves, remember which character every
normalised byte came from, and tokenize the already-normalised text without normalising again: the
byte offsets then index our string, and the byte->character map takes them back to the original.
The ids are those `tokenization.WordPieceTokenizer` produces in-graph (tests check this on the
whole dev file).

Windows follow BERT's run_squad: contexts longer than `max_seq_length - len(question) - 3` tokens
become overlapping windows `doc_stride` tokens apart. Training targets the first gold answer; a
window that does not contain all of it is labelled start = end = 0 ([CLS]).

Cache. Building features tokenizes every context, so the result is written once per (input file
content, vocab, settings, split, and the source of this module and the tokenizer) as a TFRecord of model inputs plus a JSON sidecar with what
post-processing needs (examples, offsets, windows), and read back on later runs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import sys
import unicodedata
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from engine import summaries
from tasks import textfiles
from tasks.encoders import tokenization

EVAL_ARTICLE_FRACTION = 0.2
_SPLIT_ALIASES = {"validation": "eval", "dev": "eval"}


# ----------------------------------------------------------------------------------------------
# Reading the JSON
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SquadExample:
    """One question about one context. `answers` are (text, answer_start) pairs; the first one is trained on."""
    qas_id: str
    question: str
    context_index: int
    answers: tuple[tuple[str, int], ...]
    article_index: int


@dataclasses.dataclass(frozen=True)
class SquadData:
    """What `read_squad` found: unique contexts, examples pointing into them, and what was skipped."""
    contexts: list[str]
    examples: list[SquadExample]
    skipped_ids: list[str]      # questions dropped: an answer does not match its answer_start, or none
    num_articles: int


def canonical_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown SQuAD split {split!r}; expected train, eval (validation) or all")
    return split


def num_train_articles(num_articles: int) -> int:
    """Articles of the "train" part when one file is split by article; the rest are "eval"."""
    return num_articles - max(1, round(EVAL_ARTICLE_FRACTION * num_articles))


def split_articles(split: str, num_articles: int, path: str = "the SQuAD file") -> range:
    """Article indices of a split (see the module docstring for why one file is split by article)."""
    split = canonical_split(split)
    if split == "all":
        return range(num_articles)
    if num_articles < 2:
        raise ValueError(f"{path}: one file is split by article into train and eval, which needs two articles or "
                         f"more; it has {num_articles}. Pass --train_data and --eval_data instead")
    cut = num_train_articles(num_articles)
    return range(cut) if split == "train" else range(cut, num_articles)


def require_file(path: str) -> None:
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):  # gfile: gs:// data on a TPU VM
        raise FileNotFoundError(f"SQuAD file not found: {path} (set --data_dir or --squad_file)")


def load_json(path: str) -> dict:
    """`json.load` (a BOM allowed) whose error names the file and the line of malformed JSON."""
    require_file(path)
    text = textfiles.read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise textfiles.InputError(path, e.lineno, f"malformed JSON at column {e.colno}: {e.msg}") from None


def read_squad(path: str, split: str = "all", max_examples: Optional[int] = None) -> SquadData:
    """Reads a SQuAD v1.1 JSON file, keeping the articles of `split` (and its first `max_examples` questions).

    A question with an answer whose text differs from `context[answer_start:...]`, or with no answer,
    is skipped and its id listed: one corrupt record should not stop a run, but must not be silent, and
    a record with one wrong offset cannot be trusted for the others. An empty question or context is an
    error naming the question id: it means the file is not SQuAD.
    """
    raw = load_json(path)
    try:
        articles = raw["data"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not SQuAD JSON: no top-level 'data' list") from None
    try:
        return _read_articles(path, articles, split, max_examples)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not SQuAD v1.1 JSON: missing or malformed field {e}") from None


def _read_articles(path: str, articles: list, split: str, max_examples: Optional[int]) -> SquadData:
    contexts: list[str] = []
    examples: list[SquadExample] = []
    skipped: list[str] = []
    for article_index in split_articles(split, len(articles), path):
        for paragraph in articles[article_index]["paragraphs"]:
            context = paragraph["context"]
            context_index = len(contexts)
            contexts.append(context)
            for qa in paragraph["qas"]:
                qas_id = str(qa["id"])
                if not context.strip():
                    raise ValueError(f"{path}: question {qas_id}: empty context")
                if not qa["question"].strip():
                    raise ValueError(f"{path}: question {qas_id}: empty question")
                answers = tuple((a["text"], int(a["answer_start"])) for a in qa["answers"])
                if not answers or any(context[s:s + len(t)] != t for t, s in answers):
                    skipped.append(qas_id)
                    continue
                examples.append(SquadExample(qas_id, qa["question"], context_index, answers, article_index))
                if max_examples is not None and len(examples) >= max_examples:
                    return _finish(path, SquadData(contexts, examples, skipped, len(articles)))
    return _finish(path, SquadData(contexts, examples, skipped, len(articles)))


def _finish(path: str, data: SquadData) -> SquadData:
    skipped = data.skipped_ids
    if skipped:
        logging.warning("%s: skipped %d questions whose answer text does not match answer_start: %s",
                        path, len(skipped), ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    return data


def data_from_pairs(questions: Sequence[str], contexts: Sequence[str]) -> SquadData:
    """Unlabelled examples for prediction; ids are the pair positions "0", "1", ..."""
    examples = []
    for i, (question, context) in enumerate(zip(questions, contexts)):
        if not context.strip():
            raise ValueError(f"question {i}: empty context")
        if not question.strip():
            raise ValueError(f"question {i}: empty question")
        examples.append(SquadExample(str(i), question, i, (), 0))
    return SquadData(list(contexts), examples, [], 1)


# ----------------------------------------------------------------------------------------------
# Tokenization with character offsets
# ----------------------------------------------------------------------------------------------

# ASCII control characters other than tab, newline and carriage return: the normaliser deletes them.
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@functools.lru_cache(maxsize=65536)
def _normalize_char(ch: str, lower_case: bool) -> str:
    """What `tokenization.WordPieceTokenizer.normalize` (HF BertNormalizer) turns one character into."""
    if ch == "\ufffd" or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
        return ""  # control/format/private-use characters are deleted (e.g. U+200B, U+FEFF in the dev file)
    if lower_case:
        # NFD, drop nonspacing marks (accents), then lower-case character by character.
        ch = "".join(c for c in unicodedata.normalize("NFD", ch) if unicodedata.category(c) != "Mn").lower()
    return ch


def normalize_with_map(text: str, lower_case: bool) -> tuple[str, np.ndarray]:
    """(normalised text, map from each of its UTF-8 bytes to the original character index)."""
    if text.isascii() and not _ASCII_CONTROL.search(text):
        # Fast path (most of SQuAD): one byte per character and lower-casing keeps the length.
        return (text.lower() if lower_case else text), np.arange(len(text), dtype=np.int32)
    pieces, owners = [], []
    for i, ch in enumerate(text):
        piece = _normalize_char(ch, lower_case)
        pieces.append(piece)
        owners.append(np.full(len(piece.encode("utf-8")), i, np.int32))
    return "".join(pieces), (np.concatenate(owners) if owners else np.zeros([0], np.int32))


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """WordPiece ids of a text and each token's [char_start, char_end) in the original text."""
    ids: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray


class OffsetTokenizer:
    """WordPiece tokenization (tensorflow-text) of many texts at once, with original-character offsets."""

    def __init__(self, vocab_file: str, *, lower_case: bool = True):
        self.vocab_file = vocab_file
        self.lower_case = lower_case
        # lower_case=False here: the text is normalised by `normalize_with_map` already, and a second
        # normalisation inside the op is what would break the offsets (its control-character deletion
        # is a no-op on our output).
        self.wordpiece = tokenization.WordPieceTokenizer(vocab_file, lower_case=False)
        self.cls_id, self.sep_id, self.pad_id = self.wordpiece.cls_id, self.wordpiece.sep_id, self.wordpiece.pad_id

    def tokenize(self, texts: Sequence[str], batch_size: int = 512, *, progress: Optional[str] = None,
                 unit: str = "texts tokenized") -> list[TokenizedText]:
        """`progress`: a label under which a long run reports `unit` done every ~10 s (on stderr)."""
        out: list[TokenizedText] = []
        meter = summaries.BatchProgress(progress, len(texts), unit=unit, file=sys.stderr) if progress else None
        for begin in range(0, len(texts), batch_size):
            chunk = texts[begin:begin + batch_size]
            normalized = [normalize_with_map(t, self.lower_case) for t in chunk]
            ids, starts, ends = self.wordpiece.tokenize_with_offsets(tf.constant([n for n, _ in normalized]))
            # [batch, words, pieces] -> [batch, pieces]; offsets are bytes of the normalised text.
            ids, starts, ends = (r.merge_dims(1, 2) for r in (ids, starts, ends))
            splits = ids.row_splits.numpy()
            flat_ids, flat_s, flat_e = ids.flat_values.numpy(), starts.flat_values.numpy(), ends.flat_values.numpy()
            for row, (_, byte_to_char) in enumerate(normalized):
                lo, hi = splits[row], splits[row + 1]
                s, e = flat_s[lo:hi], flat_e[lo:hi]
                out.append(TokenizedText(
                    ids=flat_ids[lo:hi].astype(np.int32),
                    char_start=byte_to_char[s].astype(np.int32) if hi > lo else np.zeros([0], np.int32),
                    # end is exclusive: the character owning the token's last byte, plus one.
                    char_end=(byte_to_char[e - 1] + 1).astype(np.int32) if hi > lo else np.zeros([0], np.int32)))
            if meter:
                meter.update(len(out))
        return out


def char_span_to_tokens(tokens: TokenizedText, char_start: int, char_end: int) -> Optional[tuple[int, int]]:
    """Smallest token span [first, last] covering the characters [char_start, char_end), or None."""
    overlaps = np.nonzero((tokens.char_end > char_start) & (tokens.char_start < char_end))[0]
    if overlaps.size == 0:
        return None
    return int(overlaps[0]), int(overlaps[-1])


# ----------------------------------------------------------------------------------------------
# Features (windows)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64


@dataclasses.dataclass
class SquadFeatures:
    """Model inputs of all windows of a split plus what post-processing needs to map them back.

    `windows[i] = (example_index, doc_start, doc_len, seq_offset)`: window i holds context tokens
    [doc_start, doc_start + doc_len) at sequence positions [seq_offset, seq_offset + doc_len).
    `arrays` (the model inputs) is None when the features were loaded from the cache: the TFRecord
    holds them and the input pipeline reads that.
    """
    data: SquadData
    context_tokens: list[TokenizedText]
    windows: np.ndarray
    settings: FeatureSettings
    arrays: Optional[dict[str, np.ndarray]] = None
    from_cache: bool = False

    @property
    def num_features(self) -> int:
        return len(self.windows)


def window_starts(num_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of BERT's sliding windows over `num_tokens` context tokens."""
    spans, start = [], 0
    while True:
        length = min(num_tokens - start, max_tokens)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(length, doc_stride)


def build_features(data: SquadData, tokenizer: OffsetTokenizer, settings: FeatureSettings = FeatureSettings(), *,
                   name: str = "squad") -> SquadFeatures:
    """Tokenizes contexts and questions and cuts every example into labelled windows.

    A large file (SQuAD train: 87,599 questions, minutes) reports its progress on stderr every ~10 s under `name`;
    stderr, so that launch.predict's stdout stays its JSON lines."""
    context_tokens = tokenizer.tokenize(data.contexts, progress=name, unit="contexts tokenized")
    question_tokens = tokenizer.tokenize([e.question for e in data.examples], progress=name,
                                         unit="questions tokenized")
    meter = summaries.BatchProgress(name, len(data.examples), unit="questions windowed", file=sys.stderr)
    seq_len = settings.max_seq_length
    columns: dict[str, list] = {k: [] for k in (
        "input_word_ids", "input_mask", "input_type_ids", "start_positions", "end_positions")}
    windows = []
    for example_index, (example, question) in enumerate(zip(data.examples, question_tokens)):
        q_ids = question.ids[:settings.max_query_length]
        doc = context_tokens[example.context_index]
        answer = None  # unlabelled (prediction) examples train nothing; their positions stay at [CLS]
        if example.answers:
            text, start_char = example.answers[0]
            answer = char_span_to_tokens(doc, start_char, start_char + len(text))
        seq_offset = len(q_ids) + 2
        max_doc_tokens = seq_len - len(q_ids) - 3
        if max_doc_tokens <= 0:
            raise ValueError(f"max_seq_length {seq_len} leaves no room for context after a {len(q_ids)}-token question")
        for doc_start, doc_len in window_starts(len(doc.ids), max_doc_tokens, settings.doc_stride):
            ids = np.full(seq_len, tokenizer.pad_id, np.int32)
            n = seq_offset + doc_len + 1
            ids[:n] = np.concatenate([[tokenizer.cls_id], q_ids, [tokenizer.sep_id],
                                      doc.ids[doc_start:doc_start + doc_len], [tokenizer.sep_id]])
            type_ids = np.zeros(seq_len, np.int32)
            type_ids[seq_offset:n] = 1
            start = end = 0  # [CLS]: this window does not contain the whole answer
            if answer is not None and doc_start <= answer[0] and answer[1] < doc_start + doc_len:
                start, end = (seq_offset + t - doc_start for t in answer)
            columns["input_word_ids"].append(ids)
            columns["input_mask"].append((np.arange(seq_len) < n).astype(np.int32))
            columns["input_type_ids"].append(type_ids)
            columns["start_positions"].append(start)
            columns["end_positions"].append(end)
            windows.append((example_index, doc_start, doc_len, seq_offset))
        meter.update(example_index + 1)
    arrays = {k: np.asarray(v, np.int32).reshape([len(windows), -1] if k.startswith("input") else [len(windows)])
              for k, v in columns.items()}
    arrays["feature_index"] = np.arange(len(windows), dtype=np.int32)
    return SquadFeatures(data, context_tokens, np.asarray(windows, np.int32).reshape([-1, 4]), settings, arrays)
