"""Entity-level precision/recall/F1 exactly as CoNLL's `conlleval.pl` (version 2004-01-26) computes them.

A line-by-line port of its chunk logic (`startOfChunk`/`endOfChunk`, the "correct so far" state,
sentence boundaries as `O`), not a reinterpretation: conlleval has quirks a clean span matcher
would not reproduce, e.g. an `I-X` after `O` or after `B-Y` opens a new chunk, and these decide
the reported numbers for imperfect (unconstrained) predictions. `report` prints the same text
as the Perl script, so the two can be compared byte for byte. Entities for predict and serving are
decoding.py's, from these same start/end rules.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Iterator, Sequence


def split_tag(tag: str) -> tuple[str, str]:
    """`B-ORG` -> (`B`, `ORG`); split at the first hyphen like conlleval's `^([^-]*)-(.*)$`."""
    prefix, hyphen, entity_type = tag.partition("-")
    return (prefix, entity_type) if hyphen else (tag, "")


def end_of_chunk(prev_tag: str, tag: str, prev_type: str, entity_type: str) -> bool:
    """Did a chunk end between the previous and the current word? (conlleval's endOfChunk)"""
    end = (prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"), ("E", "O")}
    if prev_tag not in ("O", ".") and prev_type != entity_type:
        end = True
    return end or prev_tag in ("]", "[")


def start_of_chunk(prev_tag: str, tag: str, prev_type: str, entity_type: str) -> bool:
    """Did a chunk start between the previous and the current word? (conlleval's startOfChunk)"""
    start = (prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"), ("O", "E")}
    if tag not in ("O", ".") and prev_type != entity_type:
        start = True
    return start or tag in ("[", "]")


@dataclasses.dataclass
class ChunkCounts:
    """What conlleval counts; add sentences with `update`, read numbers with `scores`."""
    correct_chunks: int = 0
    gold_chunks: int = 0
    predicted_chunks: int = 0
    correct_tags: int = 0
    tokens: int = 0
    correct_by_type: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    gold_by_type: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    predicted_by_type: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def update(self, gold: Sequence[str], predicted: Sequence[str]) -> None:
        """Adds one sentence (word-level gold and predicted tags)."""
        if len(gold) != len(predicted):
            raise ValueError(f"sentence has {len(gold)} gold tags but {len(predicted)} predicted tags")
        in_correct = False
        last_gold, last_gold_type, last_pred, last_pred_type = "O", "", "O", ""
        # The trailing (O, O) is the sentence boundary: conlleval closes every chunk there.
        for gold_tag, pred_tag, is_boundary in [(g, p, False) for g, p in zip(gold, predicted)] + [("O", "O", True)]:
            gold_prefix, gold_type = split_tag(gold_tag)
            pred_prefix, pred_type = split_tag(pred_tag)
            gold_end = end_of_chunk(last_gold, gold_prefix, last_gold_type, gold_type)
            pred_end = end_of_chunk(last_pred, pred_prefix, last_pred_type, pred_type)
            if in_correct:
                if gold_end and pred_end and last_pred_type == last_gold_type:
                    in_correct = False
                    self.correct_chunks += 1
                    self.correct_by_type[last_gold_type] += 1
                elif gold_end != pred_end or pred_type != gold_type:
                    in_correct = False
            gold_start = start_of_chunk(last_gold, gold_prefix, last_gold_type, gold_type)
            pred_start = start_of_chunk(last_pred, pred_prefix, last_pred_type, pred_type)
            if gold_start and pred_start and pred_type == gold_type:
                in_correct = True
            if gold_start:
                self.gold_chunks += 1
                self.gold_by_type[gold_type] += 1
            if pred_start:
                self.predicted_chunks += 1
                self.predicted_by_type[pred_type] += 1
            if not is_boundary:
                self.correct_tags += int(gold_prefix == pred_prefix and gold_type == pred_type)
                self.tokens += 1
            last_gold, last_gold_type, last_pred, last_pred_type = gold_prefix, gold_type, pred_prefix, pred_type
        # After the boundary in_correct is always False: the boundary ends every open chunk.

    def scores(self) -> dict[str, float]:
        """precision, recall, f1, accuracy in percent (as conlleval prints them), plus f1 per type."""
        precision, recall, f1 = _prf(self.correct_chunks, self.predicted_chunks, self.gold_chunks)
        result = {"precision": precision, "recall": recall, "f1": f1,
                  "accuracy": 100.0 * self.correct_tags / self.tokens if self.tokens else 0.0}
        for entity_type in self.types():
            result[f"f1_{entity_type}"] = _prf(self.correct_by_type[entity_type], self.predicted_by_type[entity_type],
                                               self.gold_by_type[entity_type])[2]
        return result

    def types(self) -> list[str]:
        return sorted(set(self.gold_by_type) | set(self.predicted_by_type))

    def report(self) -> str:
        """conlleval.pl's text output, byte for byte."""
        precision, recall, f1 = _prf(self.correct_chunks, self.predicted_chunks, self.gold_chunks)
        lines = [f"processed {self.tokens} tokens with {self.gold_chunks} phrases; "
                 f"found: {self.predicted_chunks} phrases; correct: {self.correct_chunks}.\n"]
        if self.tokens > 0:
            lines.append("accuracy: %6.2f%%; precision: %6.2f%%; recall: %6.2f%%; FB1: %6.2f\n"
                         % (100.0 * self.correct_tags / self.tokens, precision, recall, f1))
        for entity_type in self.types():
            type_p, type_r, type_f1 = _prf(self.correct_by_type[entity_type], self.predicted_by_type[entity_type],
                                           self.gold_by_type[entity_type])
            lines.append("%17s: precision: %6.2f%%; recall: %6.2f%%; FB1: %6.2f  %d\n"
                         % (entity_type, type_p, type_r, type_f1, self.predicted_by_type[entity_type]))
        return "".join(lines)


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = 100.0 * correct / predicted if predicted else 0.0
    recall = 100.0 * correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def evaluate(gold_sentences: Iterable[Sequence[str]], predicted_sentences: Iterable[Sequence[str]]) -> ChunkCounts:
    """Counts over a corpus of sentences (lists of word tags)."""
    counts = ChunkCounts()
    for gold, predicted in zip(gold_sentences, predicted_sentences, strict=True):
        counts.update(gold, predicted)
    return counts


def conlleval_lines(words: Sequence[str], gold: Sequence[str], predicted: Sequence[str]) -> Iterator[str]:
    """One sentence in conlleval's input format (`WORD GOLD PRED` lines, then a blank line)."""
    for word, gold_tag, pred_tag in zip(words, gold, predicted, strict=True):
        yield f"{word} {gold_tag} {pred_tag}\n"
    yield "\n"
