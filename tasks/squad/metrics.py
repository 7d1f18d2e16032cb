"""SQuAD v1.1 exact match and F1, computed in-process.

Our own implementation of the official `evaluate-v1.1.py` rules (tests check it gives the same
numbers as the official script run on the same predictions file): answers are lower-cased,
stripped of ASCII punctuation, of the articles a/an/the and of extra whitespace; a prediction
scores the maximum over the gold answers; questions without a prediction score 0; results are
percentages over all gold questions.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace (in the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised bags of words."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(dataset: Sequence[Mapping]) -> dict[str, list[str]]:
    """{question id: gold answer texts} from the `data` list of a SQuAD JSON, in file order."""
    return {qa["id"]: [a["text"] for a in qa["answers"]]
            for article in dataset for paragraph in article["paragraphs"] for qa in paragraph["qas"]}


def evaluate(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over every question of `gold`; unanswered ones score 0."""
    total = em_sum = f1_sum = 0.0
    # Accumulate in gold order, as the official script does, so float sums agree to the last bit.
    for qas_id, answers in gold.items():
        total += 1
        if qas_id not in predictions:
            continue
        prediction = predictions[qas_id]
        em_sum += max(exact_match(prediction, a) for a in answers)
        f1_sum += max(f1(prediction, a) for a in answers)
    if not total:
        raise ValueError("no gold questions to evaluate")
    return {"exact_match": 100.0 * em_sum / total, "f1": 100.0 * f1_sum / total}
