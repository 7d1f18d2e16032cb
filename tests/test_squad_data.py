"""SQuAD data: reader errors, article split, character offsets on the real dev file, windows, cache."""
import dataclasses
import json
import os

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf

from tasks.encoders import bert
from tasks.squad import cache as squad_cache
from tasks.squad import data as squad_data
from tasks.encoders import tokenization
from tasks.textfiles import default_data_dir

DEV_FILE = os.path.join(default_data_dir(), "squad", "dev-v1.1.json")


@pytest.fixture(scope="module")
def vocab_file():
    return os.path.join(bert.minilm_dir(), "vocab.txt")


@pytest.fixture(scope="module")
def dev():
    return squad_data.read_squad(DEV_FILE)


@pytest.fixture(scope="module")
def dev_tokens(dev, vocab_file):
    return squad_data.OffsetTokenizer(vocab_file).tokenize(dev.contexts)


def _write(tmp_path, payload, name="squad.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload), encoding="utf-8")
    return str(path)


def _one_article(context, qas):
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


# ------------------------------------------------------------------------------------------ reader

def test_reads_the_whole_dev_file(dev):
    assert (len(dev.examples), len(dev.contexts), dev.num_articles, dev.skipped_ids) == (10570, 2067, 48, [])


def test_split_by_article_is_disjoint_and_complete(dev):
    train = squad_data.read_squad(DEV_FILE, "train")
    held_out = squad_data.read_squad(DEV_FILE, "validation")
    assert {e.article_index for e in train.examples} == set(range(38))
    assert {e.article_index for e in held_out.examples} == set(range(38, 48))
    train_ids, eval_ids = {e.qas_id for e in train.examples}, {e.qas_id for e in held_out.examples}
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == {e.qas_id for e in dev.examples}
    assert not set(train.contexts) & set(held_out.contexts)


def test_answer_not_matching_answer_start_is_listed_and_skipped(tmp_path):
    qas = [{"id": "good", "question": "Who?", "answers": [{"text": "Ada", "answer_start": 0}]},
           {"id": "bad", "question": "What?", "answers": [{"text": "Lovelace", "answer_start": 2}]},
           {"id": "bad2", "question": "And?", "answers": [{"text": "Ada", "answer_start": 0},
                                                          {"text": "wrote", "answer_start": 1}]}]
    data = squad_data.read_squad(_write(tmp_path, _one_article("Ada Lovelace wrote programs.", qas)))
    assert [e.qas_id for e in data.examples] == ["good"]
    assert data.skipped_ids == ["bad", "bad2"]


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = _write(tmp_path, '{"version": "1.1",\n  "data": [\n    {"title": "x",, }\n  ]}')
    with pytest.raises(ValueError, match=r"squad\.json:3: malformed JSON at column 19"):
        squad_data.read_squad(path)


def test_missing_file_is_a_clear_error(tmp_path, vocab_file):
    missing = str(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match=r"SQuAD file not found: .*nowhere\.json \(set --data_dir"):
        squad_data.read_squad(missing)
    with pytest.raises(FileNotFoundError, match=r"SQuAD file not found"):
        squad_cache.cached_features(missing, "train", vocab_file=vocab_file, cache_dir=str(tmp_path))


def test_missing_fields_are_a_clear_error(tmp_path):
    path = _write(tmp_path, {"data": [{"title": "x", "paragraphs": [{"qas": []}]}]})
    with pytest.raises(ValueError, match=r"squad\.json: not SQuAD v1\.1 JSON: .*'context'"):
        squad_data.read_squad(path)


@pytest.mark.parametrize("context, question", [("   ", "Who?"), ("Ada wrote.", " \n")])
def test_empty_question_or_context_names_the_id(tmp_path, context, question):
    qas = [{"id": "q-17", "question": question, "answers": [{"text": "A", "answer_start": 0}]}]
    with pytest.raises(ValueError, match=r"question q-17: empty (context|question)"):
        squad_data.read_squad(_write(tmp_path, _one_article(context, qas)))


# ------------------------------------------------------------------------------------- offsets

def test_tokens_equal_the_in_graph_tokenizer_on_the_whole_dev_file(dev, dev_tokens, vocab_file):
    """Normalising ourselves must not change what the model sees: same ids as WordPieceTokenizer."""
    reference = tokenization.WordPieceTokenizer(vocab_file).tokenize(tf.constant(dev.contexts)).to_list()
    assert [t.ids.tolist() for t in dev_tokens] == reference


def test_token_offsets_point_at_the_text_the_token_came_from(dev, dev_tokens, vocab_file):
    """Independent check with the in-graph normaliser: each token's original substring, normalised by
    WordPieceTokenizer.normalize, contains the token's text (and equals it for ordinary tokens)."""
    vocab = tokenization.read_vocab(vocab_file)
    in_graph = tokenization.WordPieceTokenizer(vocab_file)
    pieces, substrings = [], []
    for context, tokens in zip(dev.contexts, dev_tokens):
        if context.isascii():
            continue  # the non-ASCII contexts are where byte offsets would go wrong
        for token_id, start, end in zip(tokens.ids, tokens.char_start, tokens.char_end):
            pieces.append(vocab[token_id].removeprefix("##"))
            substrings.append(context[start:end])
    normalised = [s.decode() for s in in_graph.normalize(tf.constant(substrings)).numpy()]
    assert len(pieces) > 10000
    mismatched = [(p, s) for p, s, n in zip(pieces, substrings, normalised) if p != "[UNK]" and p not in n]
    assert not mismatched
    equal = sum(p == n for p, n in zip(pieces, normalised))
    assert equal / len(pieces) > 0.99


# Real dev answers next to accents, ł, ß, ½, Chinese, U+FEFF/U+200B, newlines and double spaces.
UNICODE_AND_WHITESPACE_IDS = [
    "56be5333acb8001400a5030d", "57332442d058e614000b5724", "56beb6533aeaaa14008c928e",
    "572fe60fb2c2fd140056858e", "5727b0892ca10214002d93ea", "5727b0892ca10214002d93e9",
    "56e0d6367aa994140058e775", "572915e43f37b31900478007", "571a484210f8ca1400304fbf",
    "572f5875947a6a140053c89b", "572758c3dd62a815002e9b7a", "572f55e8a23a5019007fc56b",
    "5729f5a03f37b31900478609", "56e2042ecd28a01900c67c1e",
]


def test_answer_offsets_map_back_to_the_identical_substring(dev, dev_tokens):
    by_id = {e.qas_id: e for e in dev.examples}
    for qas_id in UNICODE_AND_WHITESPACE_IDS:
        example = by_id[qas_id]
        context, tokens = dev.contexts[example.context_index], dev_tokens[example.context_index]
        text, start = example.answers[0]
        first, last = squad_data.char_span_to_tokens(tokens, start, start + len(text))
        assert context[tokens.char_start[first]:tokens.char_end[last]] == text, qas_id


def test_every_dev_answer_is_recovered(dev, dev_tokens):
    """All 34,726 answers come back as a substring containing them; exactly, unless the annotator
    cut inside a word ("gold" of "golden"), which no tokenizer boundary can reproduce."""
    exact = total = 0
    for example in dev.examples:
        context, tokens = dev.contexts[example.context_index], dev_tokens[example.context_index]
        for text, start in example.answers:
            first, last = squad_data.char_span_to_tokens(tokens, start, start + len(text))
            recovered = context[tokens.char_start[first]:tokens.char_end[last]]
            assert text.strip() in recovered
            total += 1
            exact += recovered == text.strip()
    assert total == 34726 and exact / total > 0.997


# ------------------------------------------------------------------------------------- windows

def test_long_context_windows_and_labels(dev, vocab_file):
    """A context much longer than one window: labels point at the answer in exactly the windows that
    hold all of it, and at [CLS] elsewhere."""
    settings = squad_data.FeatureSettings(max_seq_length=64, doc_stride=16, max_query_length=64)
    tokenizer = squad_data.OffsetTokenizer(vocab_file)
    example = next(e for e in dev.examples if e.qas_id == "56be5333acb8001400a5030d")  # Beyoncé and Bruno Mars
    context = dev.contexts[example.context_index]
    data = squad_data.SquadData([context], [dataclasses.replace(example, context_index=0)], [], 1)
    features = squad_data.build_features(data, tokenizer, settings)
    text, answer_start = example.answers[0]
    context_ids = tokenizer.tokenize([context])[0]
    question_ids = tokenizer.tokenize([example.question])[0].ids
    assert features.num_features >= 4

    covered, holding = set(), 0
    arrays = features.arrays
    for i, (example_index, doc_start, doc_len, seq_offset) in enumerate(features.windows):
        ids = arrays["input_word_ids"][i]
        # Layout: [CLS] question [SEP] window [SEP] padding, segment 1 from the window on.
        assert ids[0] == tokenizer.cls_id and ids[seq_offset - 1] == tokenizer.sep_id
        assert ids[1:seq_offset - 1].tolist() == question_ids.tolist()
        assert ids[seq_offset:seq_offset + doc_len].tolist() == context_ids.ids[doc_start:doc_start + doc_len].tolist()
        assert ids[seq_offset + doc_len] == tokenizer.sep_id
        assert arrays["input_mask"][i].sum() == seq_offset + doc_len + 1
        assert arrays["input_type_ids"][i].tolist() == [0] * seq_offset + [1] * (doc_len + 1) + [0] * (
            64 - seq_offset - doc_len - 1)
        covered.update(range(doc_start, doc_start + doc_len))
        # Independent test of "holds the answer", in characters.
        window_chars = (context_ids.char_start[doc_start], context_ids.char_end[doc_start + doc_len - 1])
        holds = window_chars[0] <= answer_start and answer_start + len(text) <= window_chars[1]
        start, end = arrays["start_positions"][i], arrays["end_positions"][i]
        if holds:
            holding += 1
            first, last = doc_start + start - seq_offset, doc_start + end - seq_offset
            assert context[context_ids.char_start[first]:context_ids.char_end[last]] == text
        else:
            assert (start, end) == (0, 0)
    assert holding >= 2  # stride 16 < window: the answer sits in more than one window
    assert covered == set(range(len(context_ids.ids)))
    starts = features.windows[:, 1].tolist()
    assert all(b - a == 16 for a, b in zip(starts, starts[1:]))


def test_window_starts_cover_the_end_exactly():
    assert squad_data.window_starts(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
    assert squad_data.window_starts(3, 4, 3) == [(0, 3)]
    assert squad_data.window_starts(9, 4, 5) == [(0, 4), (4, 4), (8, 1)]  # stride > window: no gaps


# --------------------------------------------------------------------------------------- cache

def test_second_run_reads_the_cache_and_not_the_tokenizer(tmp_path, vocab_file, monkeypatch):
    settings = squad_data.FeatureSettings(max_seq_length=128, doc_stride=64)
    first, path = squad_cache.cached_features(DEV_FILE, "train", vocab_file=vocab_file, settings=settings,
                                             cache_dir=str(tmp_path), max_examples=20)
    assert not first.from_cache

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache exists")
    monkeypatch.setattr(squad_data, "build_features", fail)
    second, path2 = squad_cache.cached_features(DEV_FILE, "train", vocab_file=vocab_file, settings=settings,
                                               cache_dir=str(tmp_path), max_examples=20)
    assert second.from_cache and path2 == path
    assert second.windows.tolist() == first.windows.tolist()
    assert [e.qas_id for e in second.data.examples] == [e.qas_id for e in first.data.examples]
    assert [t.char_end.tolist() for t in second.context_tokens] == [t.char_end.tolist() for t in first.context_tokens]
    # The TFRecord holds exactly the arrays that were built.
    parse = squad_cache.parse_batch_fn(128)
    features, labels = next(iter(tf.data.TFRecordDataset(path).batch(1000).map(parse)))
    for name, value in {**features, **labels}.items():
        np.testing.assert_array_equal(value.numpy(), first.arrays[name], err_msg=name)


def test_cache_key_follows_content_and_settings(tmp_path, vocab_file):
    path = _write(tmp_path, _one_article("Ada wrote.", [
        {"id": "q", "question": "Who?", "answers": [{"text": "Ada", "answer_start": 0}]}]))
    key = squad_cache.cache_key(path, vocab_file, True, squad_data.FeatureSettings(), "all")
    assert key == squad_cache.cache_key(path, vocab_file, True, squad_data.FeatureSettings(), "all")
    assert key != squad_cache.cache_key(path, vocab_file, True, squad_data.FeatureSettings(doc_stride=64), "all")
    assert key != squad_cache.cache_key(path, vocab_file, True, squad_data.FeatureSettings(), "train")
    with open(path, "a", encoding="utf-8") as f:
        f.write(" ")
    assert key != squad_cache.cache_key(path, vocab_file, True, squad_data.FeatureSettings(), "all")


# ------------------------------------------------------------------------ files per split (--task=squad)

def _articles(prefix, count):
    """`count` one-question articles; question ids "<prefix><article>" so each split's ids are known by hand."""
    context = "Ada Lovelace wrote the first program in 1843."
    return {"version": "1.1", "data": [
        {"title": f"{prefix}{i}", "paragraphs": [{"context": context, "qas": [
            {"id": f"{prefix}{i}", "question": f"Who wrote program {i}?",
             "answers": [{"text": "Ada Lovelace", "answer_start": 0}]}]}]} for i in range(count)]}


def _squad_ids(values, tmp_path):
    from tasks import registry  # noqa: PLC0415
    task, eval_split = registry.build_task("squad", dict(values, cache_dir=str(tmp_path / "cache"),
                                                         max_seq_length=64, doc_stride=32, max_query_length=16))
    return [[e.qas_id for e in task.features(split)[0].data.examples] for split in ("train", eval_split)]


def test_train_data_and_eval_data_are_each_read_whole(tmp_path, capsys):
    train = _write(tmp_path, _articles("train", 3), "tiny_train.json")  # fewer than the dev file's 38 + 1
    evaluation = _write(tmp_path, _articles("eval", 1), "tiny_eval.json")
    assert _squad_ids({"train_data": train, "eval_data": evaluation}, tmp_path) == [
        ["train0", "train1", "train2"], ["eval0"]]
    printed = capsys.readouterr().out
    assert f"squad | train: {train}, all 3 articles: 3 questions" in printed
    assert f"squad | eval: {evaluation}, all 1 articles: 1 questions" in printed


def test_one_file_is_split_by_article_and_the_split_printed(tmp_path, capsys):
    path = _write(tmp_path, _articles("a", 5), "five.json")
    # The last fifth of the articles (at least one) is the evaluation split.
    assert _squad_ids({"squad_file": path}, tmp_path) == [["a0", "a1", "a2", "a3"], ["a4"]]
    assert _squad_ids({"train_data": path}, tmp_path) == [["a0", "a1", "a2", "a3"], ["a4"]]
    printed = capsys.readouterr().out
    assert f"squad | train: {path}, articles 1-4 of 5 (one file split by article): 4 questions" in printed
    assert f"squad | eval: {path}, articles 5-5 of 5 (one file split by article): 1 questions" in printed


def test_split_needs_two_articles_and_files_are_not_mixed(tmp_path):
    one = _write(tmp_path, _articles("a", 1), "one.json")
    with pytest.raises(ValueError, match=r"one\.json: one file is split by article .* it has 1\. Pass --train_data"):
        _squad_ids({"squad_file": one}, tmp_path)
    with pytest.raises(ValueError, match=r"--squad_file .* or --train_data/--eval_data .*, not both"):
        _squad_ids({"squad_file": one, "train_data": one, "eval_data": one}, tmp_path)
