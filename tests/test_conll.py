"""CoNLL reading, windowing and stitching, and span metrics against the reference `conlleval.pl`."""
import os
import random
import subprocess

import pytest

from tasks.ner import conll, span_metrics

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
        owners = conll.window_owners(windows, len(counts))
        assert all(windows[o][0] <= w < windows[o][1] for w, o in enumerate(owners))


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


def test_extract_spans_follow_conlleval_chunking():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-MISC", "B-MISC", "B-MISC"]
    assert span_metrics.extract_spans(tags) == [("PER", 0, 2), ("LOC", 3, 5), ("ORG", 5, 6), ("MISC", 6, 7),
                                                ("MISC", 7, 8), ("MISC", 8, 9)]
    counts = span_metrics.evaluate([tags], [tags])
    assert counts.gold_chunks == len(span_metrics.extract_spans(tags))
