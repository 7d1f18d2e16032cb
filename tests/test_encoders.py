"""Encoders: HF safetensors loaded into BertEncoderV2 against an independent NumPy forward pass."""
import os

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file, save_file

import bert_numpy_reference as ref
from engine_helpers import reads_alias
from tasks.encoders import bert, loading
from tasks.encoders.tokenization import WordPieceTokenizer

from conftest import DATA_DIR  # noqa: E402  (../shared/data beside the repository, or $DATA_DIR)

TINY = bert.BertConfig.tiny(vocab_size=100)
TINY_SHAPES = dict(vocab_size=100, hidden_size=64, num_layers=2, intermediate_size=128)


def sst2_sentences(count: int, split: str = "dev") -> list[str]:
    with open(os.path.join(DATA_DIR, "sst2", f"{split}.tsv"), encoding="utf-8") as f:
        next(f)  # header: sentence \t label
        return [line.split("\t")[0] for _, line in zip(range(count), f)]


def numpy_inputs(features) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in features.items()}


def test_minilm_matches_numpy_reference():
    encoder, vocab_file = loading.make_encoder("minilm")
    tokenizer = WordPieceTokenizer(vocab_file, seq_length=64)
    sentences = sst2_sentences(8)
    inputs = numpy_inputs(tokenizer.encode(tf.constant(sentences)))
    assert inputs["input_mask"].sum(1).min() < 64, "want some padding, so the mask is exercised"

    outputs = encoder(inputs)
    weights = load_file(os.path.join(bert.minilm_dir(), "model.safetensors"))
    expected = ref.bert_forward(weights, 12, **inputs)
    seq_diff, pooled_diff = ref.max_abs_diffs(expected, outputs, inputs["input_mask"])
    print(f"MiniLM parity: sequence_output {seq_diff:.2e}, pooled_output {pooled_diff:.2e}")
    assert seq_diff <= 1e-4 and pooled_diff <= 1e-4
    assert len(outputs["encoder_outputs"]) == 6
    np.testing.assert_array_equal(outputs["encoder_outputs"][-1], outputs["sequence_output"])


def _tiny_inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, size=(3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = mask[2, 3:] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return {"input_word_ids": ids * mask, "input_mask": mask, "input_type_ids": types * mask}


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_random_tiny_weights_match_numpy_reference(tmp_path, prefix):
    """Random (not pretrained) weights: a transposition or head reshape that MiniLM hides would show here."""
    weights = {prefix + k: v for k, v in ref.random_hf_weights(seed=3, **TINY_SHAPES).items()}
    path = str(tmp_path / "model.safetensors")
    save_file(weights, path)
    encoder, _ = loading.make_encoder(TINY)
    bert.load_hf_weights(encoder, path)

    inputs = _tiny_inputs()
    seq_diff, pooled_diff = ref.max_abs_diffs(ref.bert_forward(weights, TINY.num_attention_heads, **inputs),
                                              encoder(inputs), inputs["input_mask"])
    assert seq_diff <= 1e-4 and pooled_diff <= 1e-4, (seq_diff, pooled_diff)


def test_hf_weights_of_a_random_encoder_drive_the_numpy_reference_to_its_outputs():
    """Our encoder handed out in HF naming (the bench's PyTorch peer of the tiny encoder loads it) is the same model."""
    encoder, _ = loading.make_encoder(TINY)
    weights = bert.hf_weights(encoder)
    assert {k: v.shape for k, v in weights.items()} == ref.hf_weight_shapes(**TINY_SHAPES)
    inputs = _tiny_inputs()
    seq_diff, pooled_diff = ref.max_abs_diffs(ref.bert_forward(weights, TINY.num_attention_heads, **inputs),
                                              encoder(inputs), inputs["input_mask"])
    assert seq_diff <= 1e-4 and pooled_diff <= 1e-4, (seq_diff, pooled_diff)


def test_cls_only_last_layer_gives_the_numpy_reference_pooled_output():
    """output_range=1 (what [CLS]-pooled classifiers build) keeps the pooled output and the [CLS] vector exact."""
    encoder, _ = loading.make_encoder(TINY, output_range=1)
    inputs = _tiny_inputs()
    reference = ref.bert_forward(bert.hf_weights(encoder), TINY.num_attention_heads, **inputs)
    outputs = encoder(inputs)
    assert outputs["sequence_output"].shape[1] == 1  # the last layer computed [CLS] only
    np.testing.assert_allclose(outputs["sequence_output"].numpy()[:, 0], reference["sequence_output"][:, 0],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(outputs["pooled_output"].numpy(), reference["pooled_output"], atol=1e-4, rtol=0)
    # Earlier layers still give every position (their output feeds the last layer's keys and values).
    assert outputs["encoder_outputs"][0].shape[1] == inputs["input_word_ids"].shape[1]


def test_flops_count_what_a_cls_only_last_layer_computes():
    h, i, s = 384, 1536, 128
    layer = 2 * (4 * h * h + 2 * h * i) + 4 * s * h  # per token: Q/K/V/output, FFN, scores and mixing
    assert bert.encoder_flops_per_token(h, i, 6, s) == 6 * layer
    # engine/first_position.py: for the one query, its projection, Wk q, Wv, output projection and FFN; per head
    # scores and mixing against each of the 128 tokens' 384-wide inputs. No keys or values per token.
    last = (2 * (4 * h * h + 2 * h * i) + 4 * s * h * 12) / s
    assert bert.encoder_flops_per_token(h, i, 6, s, output_range=1, heads=12) == pytest.approx(5 * layer + last)
    assert 0.82 < bert.encoder_flops_per_token(h, i, 6, s, output_range=1, heads=12) / (6 * layer) < 0.84
    with pytest.raises(ValueError, match="number of attention heads"):
        bert.encoder_flops_per_token(h, i, 6, s, output_range=1)
    encoder, _ = loading.make_encoder(TINY, output_range=1)
    assert bert.bert_train_flops_per_example(encoder, 32) == pytest.approx(
        3 * 32 * bert.encoder_flops_per_token(64, 128, 2, 32, output_range=1, heads=TINY.num_attention_heads))


def test_mismatched_safetensors_list_every_problem_and_assign_nothing(tmp_path):
    weights = ref.random_hf_weights(seed=4, **TINY_SHAPES)
    del weights["encoder.layer.1.attention.self.key.bias"]
    weights["encoder.layer.0.intermediate.dense.weight"] = np.zeros([128, 32], np.float32)
    weights["encoder.layer.2.output.dense.weight"] = np.zeros([64, 128], np.float32)  # a third layer
    weights["embeddings.position_ids"] = np.arange(512)[None]  # HF buffer: ignored, not "unexpected"
    path = str(tmp_path / "model.safetensors")
    save_file(weights, path)
    encoder, _ = loading.make_encoder(TINY)
    before = [w.numpy() for w in encoder.weights]

    with pytest.raises(ValueError) as error:
        bert.load_hf_weights(encoder, path)
    message = str(error.value)
    assert path in message
    assert "1 missing" in message and "encoder.layer.1.attention.self.key.bias [64]" in message
    assert "1 unexpected" in message and "encoder.layer.2.output.dense.weight" in message
    assert "1 mis-shaped" in message
    assert "encoder.layer.0.intermediate.dense.weight: expected [128, 64], found [128, 32]" in message
    assert "position_ids" not in message
    for old, new in zip(before, encoder.weights):
        np.testing.assert_array_equal(old, new.numpy())


def test_make_encoder_random_init_and_errors(tmp_path):
    encoder, vocab_file = loading.make_encoder(TINY)
    assert vocab_file is None
    outputs = encoder(_tiny_inputs())
    assert outputs["sequence_output"].shape == (3, 10, 64) and outputs["pooled_output"].shape == (3, 64)
    assert len(outputs["encoder_outputs"]) == 2

    with pytest.raises(FileNotFoundError, match="no such folder"):
        loading.make_encoder(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"expected model.safetensors \+ config.json .*found \['notes.txt'\]"):
        loading.make_encoder(str(tmp_path))


def test_make_encoder_from_hf_folder_checks_vocab(tmp_path):
    weights = ref.random_hf_weights(seed=5, **TINY_SHAPES)
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, '
        '"intermediate_size": 128, "hidden_act": "gelu", "model_type": "bert"}')
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(96)]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    encoder, vocab_file = loading.make_encoder(str(tmp_path))
    assert vocab_file == str(tmp_path / "vocab.txt")
    inputs = _tiny_inputs()
    seq_diff, _ = ref.max_abs_diffs(ref.bert_forward(weights, 2, **inputs), encoder(inputs), inputs["input_mask"])
    assert seq_diff <= 1e-4

    (tmp_path / "vocab.txt").write_text("\n".join(tokens[:-1]) + "\n")
    with pytest.raises(ValueError, match="vocab.txt has 99 tokens but the encoder's embedding table has 100 rows"):
        loading.make_encoder(str(tmp_path))


def test_building_the_encoder_leaves_the_word_embedding_out_of_copy_on_read_mode():
    encoder, _ = loading.make_encoder(bert.BertConfig.tiny())
    table = next(v for v in encoder.variables if "word_embeddings" in v.name)
    assert reads_alias(table)
    tf.gather(table, [1, 2])  # what an eager call of the stock embedding layer runs: the check sees it
    assert not reads_alias(table)
