"""WordPieceTokenizer against HF `tokenizers` (the tokenizer MiniLM/BERT weights were trained with)."""
import os

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf
from tokenizers import Tokenizer

from tasks.encoders.bert import minilm_dir
from tasks.encoders.tokenization import MAX_CHARS_PER_WORD, WordPieceTokenizer

from conftest import DATA_DIR  # noqa: E402  (../shared/data beside the repository, or $DATA_DIR)

SEQ_LENGTH = 256

TRICKY = [
    "Café déjà vu — naïve façade, Ünïcödé ÀÉÎÕÜ",  # accents are stripped
    "東京は日本の首都です 𠀀 ext-b",  # CJK ideographs split one per token, kana do not
    "Hello, world!!! (really?) ... $5 ^_^ `~ ¿qué? «quotes» 100€ ©",  # ASCII / Unicode punctuation
    "a" * (MAX_CHARS_PER_WORD + 1) + " " + "a" * MAX_CHARS_PER_WORD,  # > 100 characters -> [UNK]
    "λ" * 60,  # 60 characters but 120 bytes: still wordpieces (the limit counts characters)
    "supercalifragilisticexpialidocious",
    "ﬁ ligature, Ⅻ roman, ＡＢＣ fullwidth, ǅ titlecase",  # no compatibility (NFKC) folding
    "ß straße ẞ, İstanbul, ΣΑΣ",  # lower-casing, not case folding
    "\x00nul\x07bell tab\there\nnew\rline\x0cform\x85next",  # control characters are deleted
    "x\u200by zero width, a\u00adb soft hyphen, \ufeffbom, \ue000private, \ufffdreplacement",
    "no\u00a0break, ideographic\u3000space, line\u2028separator",  # Unicode whitespace splits
    "emoji 😀 test, don't stop-believing #1 @home",
]


def hf_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    return WordPieceTokenizer(os.path.join(minilm_dir(), "vocab.txt"), seq_length=SEQ_LENGTH), hf_tokenizer()


@pytest.fixture(scope="module")
def sentences():
    with open(os.path.join(DATA_DIR, "sst2", "train.tsv"), encoding="utf-8") as f:
        next(f)  # header
        return [line.split("\t")[0] for _, line in zip(range(300), f)]


def _assert_same_ids(ours, theirs, texts):
    ours_ids = ours.tokenize(tf.constant(texts)).to_list()
    for text, ids in zip(texts, ours_ids):
        expected = theirs.encode(text, add_special_tokens=False).ids
        assert ids == expected, (text, [ours.vocab[i] for i in ids], [ours.vocab[i] for i in expected])


def test_single_sentences_match_hf(tokenizers, sentences):
    _assert_same_ids(*tokenizers, sentences)


def test_tricky_strings_match_hf(tokenizers):
    _assert_same_ids(*tokenizers, TRICKY)
    ours, _ = tokenizers
    too_long, lambdas = ours.tokenize(tf.constant(TRICKY[3:5])).to_list()
    # The length cases really are exercised: 101 a's -> [UNK], 100 a's and 60 lambdas -> wordpieces.
    assert too_long[0] == ours.unk_id and ours.unk_id not in too_long[1:] and ours.unk_id not in lambdas


def test_packed_pairs_match_hf(tokenizers, sentences):
    ours, theirs = tokenizers
    firsts, seconds = sentences[0::2], sentences[1::2]
    packed = {k: v.numpy() for k, v in ours.encode(tf.constant(firsts), tf.constant(seconds)).items()}
    for row, (a, b) in enumerate(zip(firsts, seconds)):
        expected = theirs.encode(a, b)  # [CLS] a [SEP] b [SEP], type ids 0 then 1
        n = len(expected.ids)
        assert n <= SEQ_LENGTH
        np.testing.assert_array_equal(packed["input_word_ids"][row, :n], expected.ids)
        np.testing.assert_array_equal(packed["input_type_ids"][row, :n], expected.type_ids)
        np.testing.assert_array_equal(packed["input_mask"][row], np.arange(SEQ_LENGTH) < n)
        assert (packed["input_word_ids"][row, n:] == ours.pad_id).all()


@pytest.mark.parametrize("segments", [1, 2])
def test_pack_gives_model_gardens_bert_pack_inputs_truncated_and_cut(tokenizers, segments):
    """Our dense packing against Model Garden's BertPackInputs (ragged concatenation, tf_text's
    RoundRobinTrimmer): rows of 0-40 ids, budgets odd and even, one segment or pairs where either is the long one;
    with pad_to_multiple, its output cut to the longest real row (a Python loop) rounded up."""
    from official.nlp.modeling.layers import text_layers  # noqa: PLC0415
    ours, _ = tokenizers
    rng = np.random.default_rng(segments)
    lengths = [0, 1, 3, 7, 8, 9, 20, 40] + list(rng.integers(0, 41, 24))
    rows = [[rng.integers(5, ours.vocab_size, n).tolist() for n in rng.permutation(lengths)] for _ in range(segments)]
    ragged = [tf.ragged.constant(r, dtype=tf.int32) for r in rows]
    for seq_length in (segments + 1, 9, 16, 17, 64):
        expected = {k: v.numpy() for k, v in text_layers.BertPackInputs.bert_pack_inputs(
            ragged, seq_length, start_of_sequence_id=ours.cls_id, end_of_segment_id=ours.sep_id,
            padding_id=ours.pad_id, truncator="round_robin").items()}
        longest = max(int(row.sum()) for row in expected["input_mask"])
        for multiple in (None, 1, 16):
            packed = ours.pack(ragged, seq_length, pad_to_multiple=multiple)
            width = min(-(-longest // multiple) * multiple, seq_length) if multiple else seq_length
            for name, want in expected.items():
                got = packed[name].numpy()
                assert packed[name].dtype == tf.int32 and got.shape == (len(lengths), width), (name, got.shape)
                np.testing.assert_array_equal(got, want[:, :width], err_msg=f"{name} {seq_length} {multiple}")
    with pytest.raises(ValueError, match="seq_length 2 has no room"):
        ours.pack(ragged[:1] * 2, 2)
    with pytest.raises(ValueError, match="1 or 2 segments, not 3"):
        ours.pack(ragged[:1] * 3)


def test_offsets_point_at_the_wordpieces(tokenizers):
    ours, _ = tokenizers
    text = "the movie's " + "x" * (MAX_CHARS_PER_WORD + 5) + " unbelievably good"
    ids, begin, end = (t.merge_dims(-2, -1).to_list()[0] for t in ours.tokenize_with_offsets(tf.constant([text])))
    pieces = [ours.vocab[i].removeprefix("##") for i in ids]
    spans = [text[b:e] for b, e in zip(begin, end)]
    assert pieces[:4] == spans[:4] == ["the", "movie", "'", "s"]
    assert ids[4] == ours.unk_id and spans[4] == "x" * (MAX_CHARS_PER_WORD + 5)
    assert "".join(spans[5:]) == "unbelievablygood" and pieces[5:] == spans[5:]


# ------------------------------------------------------------------------------------ cased vocabularies

CASED = ["Angela Merkel met Emmanuel Macron in PARIS on Monday.", "Zürich's Café Ängström, naïve ÉCOLE",
         "iPhone vs IPHONE vs iphone: McDonald's O'Neill", "ΣΑΣ Straße İstanbul ǅ Ⅻ"]


def write_cased_vocab(path):
    """A small cased WordPiece vocab: the special tokens, every character of CASED alone and as "##x", and a
    few whole words in both cases, so that lower-casing or accent stripping changes the ids."""
    characters = sorted({c for text in CASED for c in text if not c.isspace()})
    words = ["Angela", "angela", "Merkel", "PARIS", "Paris", "paris", "Café", "cafe", "café", "iPhone", "iphone",
             "##hone", "Zürich", "zurich", "##ström", "##strom", "É", "e", "ΣΑΣ", "σασ", "Straße"]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + characters + ["##" + c for c in characters]
    path.write_text("".join(t + "\n" for t in dict.fromkeys(tokens)), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("lower_case", [False, True])
def test_cased_vocab_matches_hf_bert_wordpiece(tmp_path, lower_case):
    from tokenizers import BertWordPieceTokenizer  # noqa: PLC0415
    vocab = write_cased_vocab(tmp_path / "cased_vocab.txt")
    ours = WordPieceTokenizer(vocab, lower_case=lower_case)
    theirs = BertWordPieceTokenizer(vocab, lowercase=lower_case)
    _assert_same_ids(ours, theirs, CASED + TRICKY)
    ids = ours.tokenize(tf.constant(["Paris paris PARIS Café"])).to_list()[0]
    distinct = len(set(ids)) == 4  # cased: four different tokens; uncased: "paris" three times and "cafe"
    assert distinct != lower_case, [ours.vocab[i] for i in ids]
