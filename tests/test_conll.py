"""CoNLL reading, windowing and stitching, and span metrics against the reference `conlleval.pl`."""
import os
import random
import subprocess

import numpy as np
import pytest

from tasks.ner import conll, decoding, span_metrics

from conftest import DATA_DIR  # noqa: E402  (../shared/data beside the repository, or $DATA_DIR)

EVAL_DIR = os.path.join(DATA_DIR, "conll2003", "eval")


def _perl_conlleval(text: str) -> str:
    result = subprocess.run(["perl", os.path.join(EVAL_DIR, "conlleval.pl")], input=text, capture_output=True,
                            text=True, check=True)
    return result.stdout


def test_reader_counts_match_provenance():
    sentences = conll.read_conll(os.path.join(DATA_DIR, "conll2003", "valid.txt"))
    assert len(sentences) == 3250  # PROVENANCE.md: 3,250 sentences, 51,362 tokens, -DOCSTART- excluded
    assert sum(len(s.words) for s in sentences) == 51362
    assert max(len(s.words) for s in sentences) == 109
    assert sentences[0].words[0] != "-DOCSTART-" and all(len(s.words) == len(s.tags) for s in sentences)


@pytest.mark.parametrize("bad_line, message", [
    ("EU NNP B-ORG\n", "expected 4 columns, got 3"),
    ("EU NNP B-NP B-ORG extra\n", "expected 4 columns, got 5"),
    ("EU NNP B-NP B-ORGANISATION\n", "unknown tag 'B-ORGANISATION'"),
])
def test_reader_names_file_and_line_of_bad_input(tmp_path, bad_line, message):
    path = tmp_path / "bad.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n" + bad_line)
    with pytest.raises(ValueError, match=f"{path}:6: {message}"):
        conll.read_conll(str(path))


def test_windows_cover_every_word_within_budget_and_owners_are_unique():
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.choice([1, 1, 1, 2, 3, 7]) for _ in range(rng.randint(1, 60))]
        max_pieces, max_words = rng.randint(4, 20), rng.randint(2, 12)
        windows = conll.plan_windows(counts, max_pieces=max_pieces, max_words=max_words,
                                     overlap_pieces=max_pieces // 2)
        assert windows[0][0] == 0 and windows[-1][1] == len(counts)
        for (begin, end), (next_begin, next_end) in zip(windows, windows[1:]):
            assert begin < next_begin <= end < next_end  # forward progress, no gaps
        for begin, end in windows:
            assert end - begin <= max_words
            assert end - begin == 1 or sum(counts[begin:end]) <= max_pieces
        owned = decoding.owned_words([0] * len(windows), [b for b, _ in windows], [e for _, e in windows],
                                     [0, len(counts)]).to_list()
        owners = [[i for i, (begin, _) in enumerate(windows) if w - begin in range(len(owned[i]))
                   and owned[i][w - begin]] for w in range(len(counts))]
        assert owners == [[_most_context_owner(windows, len(counts), w)] for w in range(len(counts))]


def _most_context_owner(windows, num_words, word):
    """The window where `word` has the most context, min(left, right), a window edge at the sentence edge
    counting as unlimited; the first on ties."""
    def context(begin, end):
        left = word - begin if begin > 0 else num_words
        right = end - 1 - word if end < num_words else num_words
        return min(left, right)
    holding = [i for i, (begin, end) in enumerate(windows) if begin <= word < end]
    return max(holding, key=lambda i: (context(*windows[i]), -i))


def test_owned_words_hand_made():
    # Sentence of 10 words in windows [0, 6), [3, 9), [6, 10); a second sentence of 2 words in one window.
    owned = decoding.owned_words([0, 0, 0, 1], [0, 3, 6, 0], [6, 9, 10, 2], [0, 10, 12]).to_list()
    # Word 3: min(3, 2) = 2 in window 0 vs min(0, 5) = 0 in window 1. Word 4: 1 vs 1, the earlier window.
    # Word 5: 0 vs 2. Word 6: 2 in window 1 vs 0 in window 2. Word 7: 1 vs 1, and word 8: 0 vs 2.
    assert owned == [[True] * 5 + [False], [False, False, True, True, True, False], [False, False, True, True],
                     [True, True]]


def test_long_sentence_is_windowed_and_every_word_stitched_back():
    words = tuple(f"w{i}" for i in range(23))
    tags = tuple(conll.CONLL2003_LABELS[i % 3] for i in range(23))  # O B-PER I-PER ...
    pieces = {w: [100 + i] * (1 + i % 2) for i, w in enumerate(words)}  # 1 or 2 pieces per word
    short = conll.Sentence(("a", "b"), ("O", "B-LOC"))
    pieces.update(a=[7], b=[8])
    arrays, sources = conll.encode_sentences([short, conll.Sentence(words, tags)], pieces,
                                             labels=conll.CONLL2003_LABELS, max_seq_length=12, max_words=10,
                                             cls_id=1, sep_id=2, pad_id=0)
    assert len(sources) > 3 and arrays["input_word_ids"].shape == (len(sources), 12)
    assert arrays["starts_sentence"].tolist()[:2] == [1, 1] and arrays["ends_sentence"][-1] == 1
    # the first piece of each word is where word_positions points
    for row, source in enumerate(sources):
        sentence = [short, conll.Sentence(words, tags)][source.sentence]
        for slot in range(source.num_words):
            word = sentence.words[source.begin + slot]
            assert arrays["input_word_ids"][row, arrays["word_positions"][row, slot]] == pieces[word][0]
    # Predicting each window's gold tags and stitching gives back the gold sentence exactly.
    stitched = conll.stitch(arrays["tags"], arrays["owned_mask"], arrays["example_index"], sources, [2, 23])
    label_ids = {t: i for i, t in enumerate(conll.CONLL2003_LABELS)}
    assert stitched == [[label_ids[t] for t in short.tags], [label_ids[t] for t in tags]]
    assert int(arrays["owned_mask"].sum()) == 25  # each word scored exactly once
    with pytest.raises(ValueError, match="got no prediction"):
        conll.stitch(arrays["tags"][:-1], arrays["owned_mask"][:-1], arrays["example_index"][:-1], sources, [2, 23])


@pytest.mark.parametrize("word, shape", [
    ("EU", conll.SHAPE_UPPER), ("I", conll.SHAPE_UPPER), ("U.S.", conll.SHAPE_UPPER), ("Germany", conll.SHAPE_TITLE),
    ("McDonald", conll.SHAPE_TITLE), ("Ångström", conll.SHAPE_TITLE), ("said", conll.SHAPE_LOWER),
    ("1990s", conll.SHAPE_LOWER), ("iPhone", conll.SHAPE_MIXED), ("1996-08-22", conll.SHAPE_NO_LETTERS),
    (",", conll.SHAPE_NO_LETTERS), ("東京", conll.SHAPE_NO_LETTERS)])  # CJK letters are uncased (Lo)
def test_word_shape(word, shape):
    assert conll.word_shape(word) == shape


def test_every_piece_carries_its_words_shape_and_specials_none():
    pieces = {"Peter": [11, 12], "visited": [13], "EU": [14, 15, 16]}
    sentence = conll.Sentence(("Peter", "visited", "EU"), ("B-PER", "O", "B-ORG"))
    arrays, _ = conll.encode_sentences([sentence], pieces, labels=conll.CONLL2003_LABELS, max_seq_length=10,
                                       max_words=8, cls_id=1, sep_id=2, pad_id=0)
    title, lower, upper = conll.SHAPE_TITLE, conll.SHAPE_LOWER, conll.SHAPE_UPPER
    assert arrays["input_word_ids"][0].tolist() == [1, 11, 12, 13, 14, 15, 16, 2, 0, 0]
    assert arrays["input_case_ids"][0].tolist() == [0, title, title, lower, upper, upper, upper, 0, 0, 0]


def _perturb(tags, rng):
    """Prediction errors of every kind conlleval must judge: type swaps, B<->I, stray I-, misses."""
    types = ["PER", "LOC", "ORG", "MISC"]
    out = []
    for tag in tags:
        r = rng.random()
        if r < 0.05:
            tag = "O"
        elif r < 0.10:
            tag = f"I-{rng.choice(types)}"
        elif r < 0.15:
            tag = f"B-{rng.choice(types)}"
        elif r < 0.20 and tag != "O":
            tag = ("I-" if tag.startswith("B-") else "B-") + tag[2:]
        out.append(tag)
    return out


def test_span_metrics_match_conlleval_pl_on_real_data():
    sentences = conll.read_conll(os.path.join(DATA_DIR, "conll2003", "valid.txt"))[:600]
    rng = random.Random(1)
    predictions = [_perturb(s.tags, rng) for s in sentences]
    text = "".join(line for s, p in zip(sentences, predictions)
                   for line in span_metrics.conlleval_lines(s.words, s.tags, p))
    counts = span_metrics.evaluate([s.tags for s in sentences], predictions)
    expected = _perl_conlleval(text)
    assert counts.report() == expected
    assert 20 < counts.scores()["f1"] < 95  # the perturbation produced a non-trivial case
    perfect = span_metrics.evaluate([s.tags for s in sentences], [s.tags for s in sentences]).scores()
    assert perfect["f1"] == 100.0


def test_span_metrics_match_conlleval_reference_output_on_chunking_sample():
    with open(os.path.join(EVAL_DIR, "output.txt"), encoding="utf-8") as f:
        blocks = [block.splitlines() for block in f.read().split("\n\n") if block.strip()]
    gold = [[line.split()[-2] for line in block] for block in blocks]
    predicted = [[line.split()[-1] for line in block] for block in blocks]
    with open(os.path.join(EVAL_DIR, "result.txt"), encoding="utf-8", newline="") as f:
        expected = f.read().replace("\r\n", "\n")
    assert span_metrics.evaluate(gold, predicted).report() == expected


def _entities(sentences, labels=conll.CONLL2003_LABELS):
    """decoding.entities of tag-string sentences as [(type, first word, end word exclusive)] per sentence."""
    rules = decoding.chunk_rules(labels)
    splits = np.cumsum([0] + [len(tags) for tags in sentences])
    found = decoding.entities(np.array([labels.index(t) for tags in sentences for t in tags], np.int32), splits,
                              rules)
    spans = [[] for _ in sentences]
    for sentence, first, last, tag in zip(*(v.numpy().tolist() for v in found)):
        spans[sentence].append((rules.types[tag], first - splits[sentence], last + 1 - splits[sentence]))
    return spans


def test_entities_follow_conlleval_chunking_by_hand():
    assert _entities([["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-MISC", "B-MISC", "B-MISC"]]) == [[
        ("PER", 0, 2),     # B I
        ("LOC", 3, 5),     # I- after O opens a chunk
        ("ORG", 5, 6),     # a type change ends it
        ("MISC", 6, 7),    # I-MISC after B-ORG: a new chunk
        ("MISC", 7, 8), ("MISC", 8, 9)]]  # B after B: two chunks
    # Sentence ends close chunks: an I- at the start of the next sentence is a new entity; empty sentences
    # have none; a whole-sentence entity ends at the last word.
    assert _entities([["O", "B-LOC", "I-LOC"], [], ["I-LOC", "I-ORG"], ["B-PER"], ["O", "O"]]) == [
        [("LOC", 1, 3)], [], [("LOC", 0, 1), ("ORG", 1, 2)], [("PER", 0, 1)], []]
    assert _entities([]) == []
    with pytest.raises(ValueError, match="IOB2"):
        decoding.chunk_rules(("B-PER", "O"))  # tag id 0 pads sentences: it must be O


def test_entities_scored_by_exact_match_equal_conlleval_pl():
    """Chunks from decoding.entities, counted as correct when gold and prediction have the same (type, first,
    last), give conlleval.pl's phrase counts, precision, recall and F1 on perturbed real predictions."""
    sentences = conll.read_conll(os.path.join(DATA_DIR, "conll2003", "valid.txt"))[:600]
    rng = random.Random(2)
    predictions = [_perturb(s.tags, rng) for s in sentences]
    gold_spans, predicted_spans = _entities([s.tags for s in sentences]), _entities(predictions)
    found = sum(map(len, predicted_spans))
    gold = sum(map(len, gold_spans))
    correct = sum(len(set(g) & set(p)) for g, p in zip(gold_spans, predicted_spans))
    text = "".join(line for s, p in zip(sentences, predictions)
                   for line in span_metrics.conlleval_lines(s.words, s.tags, p))
    header = _perl_conlleval(text).splitlines()
    assert header[0].endswith(f"with {gold} phrases; found: {found} phrases; correct: {correct}.")
    precision, recall = 100 * correct / found, 100 * correct / gold
    f1 = 2 * precision * recall / (precision + recall)
    assert f"precision: {precision:6.2f}%; recall: {recall:6.2f}%; FB1: {f1:6.2f}" in header[1]
    assert 20 < f1 < 95


def test_entities_across_window_boundaries_come_from_the_owning_windows():
    """A 12-word sentence in windows of at most 5 words: stitching takes each word's tag from its owner only
    (the other windows' tags for it are wrong on purpose) and entities cross the cuts."""
    words = tuple(f"w{i}" for i in range(12))
    tags = ("B-PER", "I-PER", "I-PER", "I-PER", "O", "B-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "B-LOC")
    pieces = {w: [100 + i] for i, w in enumerate(words)}
    arrays, sources = conll.encode_sentences([conll.Sentence(words, tags)], pieces, labels=conll.CONLL2003_LABELS,
                                             max_seq_length=7, max_words=5, cls_id=1, sep_id=2, pad_id=0)
    assert len(sources) >= 3 and all(s.num_words <= 5 for s in sources)
    assert sum(s.num_words for s in sources) > len(words)  # windows overlap
    wrong = np.where(arrays["owned_mask"] == 1, arrays["tags"], conll.CONLL2003_LABELS.index("B-MISC"))
    order = np.arange(len(sources))[::-1]  # rows in any order
    stitched = conll.stitch(wrong[order], arrays["owned_mask"][order], order, sources, [len(words)])
    labels = conll.CONLL2003_LABELS
    assert [labels[t] for t in stitched[0]] == list(tags)
    assert _entities([[labels[t] for t in stitched[0]]]) == [[("PER", 0, 4), ("ORG", 5, 10), ("LOC", 11, 12)]]
