"""Input files as people really have them: a UTF-8 BOM, CRLF line ends, very long fields, IOB1 tags, bytes
that are not UTF-8. Each reader must give what it gives for the plain file, or an error naming file and line."""
import json
import logging
import os

import numpy as np
import pytest

from conftest import DATA_DIR
from tasks.ner import conll
from tasks.encoders import bert
from tasks.squad import data as squad_data
from tasks import textfiles
from tasks.classification.task import ClassificationConfig, read_tsv
from tasks.encoders.tokenization import WordPieceTokenizer, read_vocab

BOM = "\ufeff".encode("utf-8")
VOCAB = os.path.join(bert.minilm_dir(), "vocab.txt")


def first_lines(path, count):
    with open(path, encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(count)]


def write_plain_and_windows(folder, name, lines):
    """The same lines as plain UTF-8 ("\\n") and as a Windows editor saves them (BOM, "\\r\\n")."""
    plain, windows = folder / f"plain_{name}", folder / f"windows_{name}"
    plain.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    windows.write_bytes(BOM + "".join(line + "\r\n" for line in lines).encode("utf-8"))
    return str(plain), str(windows)


def test_tsv_with_bom_and_crlf_reads_as_the_plain_file(tmp_path):
    lines = first_lines(os.path.join(DATA_DIR, "sst2", "dev.tsv"), 41)
    plain, windows = write_plain_and_windows(tmp_path, "dev.tsv", lines)
    config = ClassificationConfig(data_files={})
    got, want = read_tsv(windows, config), read_tsv(plain, config)
    assert got.texts == want.texts and np.array_equal(got.labels, want.labels)
    # ... and both are what splitting the lines at tabs gives (not just equal to each other)
    rows = [line.split("\t") for line in lines[1:]]
    assert got.texts == (tuple(r[0] for r in rows),) and got.labels.tolist() == [int(r[1]) for r in rows]


def test_tsv_field_longer_than_the_csv_module_limit_is_read_whole(tmp_path):
    long_text = ("a remarkably long review " * 8000)[:200_000]  # > csv's 131,072-character field limit
    path = tmp_path / "long.tsv"
    path.write_text(f"sentence\tlabel\nshort\t0\n{long_text}\t1\nlast\t0\n", encoding="utf-8")
    examples = read_tsv(str(path), ClassificationConfig(data_files={}))
    assert examples.texts[0] == ("short", long_text, "last") and examples.labels.tolist() == [0, 1, 0]
    # A bad row after it is still reported with its own line number.
    path.write_text(f"sentence\tlabel\n{long_text}\t1\nbad\t1\textra\n", encoding="utf-8")
    with pytest.raises(textfiles.InputError, match=f"^{path}:3: 3 fields, the header has 2$"):
        read_tsv(str(path), ClassificationConfig(data_files={}))


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("sentence\tlabel\nfine\t1\ncaf\u00e9\t0\n".encode("latin-1"))
    with pytest.raises(textfiles.InputError, match=f"^{path}:3: not UTF-8 text \\(byte 0xe9\\)"):
        read_tsv(str(path), ClassificationConfig(data_files={}))


def test_conll_with_bom_and_crlf_reads_as_the_plain_file(tmp_path):
    lines = first_lines(os.path.join(DATA_DIR, "conll2003", "valid.txt"), 60)
    assert lines[0].startswith("-DOCSTART-")  # where a BOM would stick: "\ufeff-DOCSTART-" is a word
    plain, windows = write_plain_and_windows(tmp_path, "valid.txt", lines)
    got, want = conll.read_conll(windows), conll.read_conll(plain)
    assert got == want
    words = [line.split() for line in lines if line.strip() and not line.startswith("-DOCSTART-")]
    assert [w for s in got for w in s.words] == [w[0] for w in words]
    assert [t for s in got for t in s.tags] == [w[-1] for w in words]


def test_squad_json_with_bom_and_crlf_reads_as_the_plain_file(tmp_path):
    article = {"title": "T", "paragraphs": [{"context": "Ada Lovelace wrote the first program.", "qas": [
        {"id": "q1", "question": "Who wrote it?", "answers": [{"text": "Ada Lovelace", "answer_start": 0}]}]}]}
    lines = json.dumps({"version": "1.1", "data": [article, article]}, indent=1).split("\n")
    plain, windows = write_plain_and_windows(tmp_path, "squad.json", lines)
    got, want = squad_data.read_squad(windows), squad_data.read_squad(plain)
    assert got == want and got.examples[0].answers == (("Ada Lovelace", 0),)


def test_vocab_with_bom_and_crlf_gives_the_ids_of_the_plain_file(tmp_path):
    tokens = read_vocab(VOCAB)
    plain, windows = write_plain_and_windows(tmp_path, "vocab.txt", tokens)
    assert read_vocab(windows) == tokens
    sentences = ["Hello, world! It's a gorgeous, witty film.", "[CLS] unaffable ##s Zürich"]
    import tensorflow as tf  # noqa: PLC0415
    got = WordPieceTokenizer(windows).tokenize(tf.constant(sentences)).to_list()
    assert got == WordPieceTokenizer(plain).tokenize(tf.constant(sentences)).to_list()
    # Independent of our tokenizer: the ids of the plain vocab's whole-word tokens, by their line number.
    assert got[0][:2] == [tokens.index("hello"), tokens.index(",")]


IOB1 = """-DOCSTART- -X- -X- O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER
met VBD I-VP O
Angela NNP I-NP I-PER
Merkel NNP I-NP I-PER
, , O O
Boris NNP I-NP B-PER
in IN I-PP O
New NNP I-NP I-LOC
York NNP I-NP I-LOC
. . O O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
call NN I-NP O
"""
# Converted by hand: every I- that begins an entity (sentence start, after O, after another type) is B-;
# B-PER after I-PER (IOB1's mark of a second adjacent entity) and continuations stay.
IOB2 = [["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC", "O"],
        ["B-ORG", "O", "B-MISC", "O"]]


def test_iob1_is_converted_to_iob2_with_one_line_saying_so(tmp_path, caplog):
    path = tmp_path / "iob1.txt"
    path.write_text(IOB1, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sentences = conll.read_conll(str(path))
    assert [list(s.tags) for s in sentences] == IOB2
    assert [s.words[:2] for s in sentences] == [("Peter", "Blackburn"), ("EU", "rejects")]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"{path}: IOB1 tags: 5 I- tags"), messages


def test_iob1_adjacent_entities_of_another_type_and_sentence_starts():
    assert conll.iob1_to_iob2(["I-PER", "I-LOC", "I-LOC", "O", "I-MISC", "B-MISC"]) == (
        ("B-PER", "B-LOC", "I-LOC", "O", "B-MISC", "B-MISC"), 3)
    assert conll.iob1_to_iob2(["B-PER", "I-PER", "O"]) == (("B-PER", "I-PER", "O"), 0)


def test_real_conll2003_is_iob2_and_read_unchanged(caplog):
    with caplog.at_level(logging.WARNING):
        for name in ("train.txt", "valid.txt", "test.txt"):
            path = os.path.join(DATA_DIR, "conll2003", name)
            for sentence in conll.read_conll(path):
                # IOB2 by its definition, checked here without the converter: an I-X follows B-X or I-X.
                for previous, tag in zip(("O",) + sentence.tags, sentence.tags):
                    assert not tag.startswith("I-") or previous in ("B-" + tag[2:], tag), (path, sentence)
    assert not caplog.records


def test_files_on_tensorflow_file_systems_are_read_through_gfile():
    """gs:// on a TPU VM; ram:// (TF's in-memory file system) stands in for it here."""
    import tensorflow as tf  # noqa: PLC0415

    tf.io.gfile.makedirs("ram://textfiles")
    with tf.io.gfile.GFile("ram://textfiles/a.tsv", "w") as f:
        f.write("\ufeffsentence\tlabel\r\nhello\t1\r\n")
    assert list(textfiles.read_lines("ram://textfiles/a.tsv")) == [(1, "sentence\tlabel"), (2, "hello\t1")]
    assert textfiles.read_text("ram://textfiles/a.tsv").startswith("sentence")
    with pytest.raises(FileNotFoundError, match=r"ram://textfiles/none.tsv: cannot open .*\(--train_data\)"):
        list(textfiles.read_lines("ram://textfiles/none.tsv", missing="--train_data"))
