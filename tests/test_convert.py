"""Conversion of HF and google-research/bert TF1 checkpoints, checked against the NumPy forward pass."""
import json
import os
import shutil

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from safetensors.numpy import load_file

import bert_numpy_reference as ref
from launch import convert as convert_launcher
from tasks.encoders import convert
from tasks.encoders import bert, loading
from tasks.encoders.tokenization import WordPieceTokenizer

from conftest import DATA_DIR  # noqa: E402  (../shared/data beside the repository, or $DATA_DIR)

TINY_SHAPES = dict(vocab_size=100, hidden_size=64, num_layers=2, intermediate_size=128)


def hf_to_tf1(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF BertModel tensors under google-research/bert TF1 names, kernels transposed to [in, out].

    Written out by hand from the two layouts, independently of tasks.encoders' name mapping."""
    out = {}
    for name, value in weights.items():
        if name.endswith("position_ids"):
            continue
        tf1 = "bert/" + name.replace("encoder.layer.", "encoder/layer_").replace(".", "/")
        if "/LayerNorm/" in tf1:
            tf1 = tf1.replace("/weight", "/gamma").replace("/bias", "/beta")
        elif tf1.endswith("_embeddings/weight"):
            tf1 = tf1.removesuffix("/weight")
        elif tf1.endswith("/weight"):
            tf1, value = tf1.removesuffix("/weight") + "/kernel", value.T
        out[tf1] = np.ascontiguousarray(value)
    return out


def write_tf1_checkpoint(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    """A name-based TF1 checkpoint, as tf.compat.v1.train.Saver writes (SaveV2 is the op it runs)."""
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])


@pytest.fixture(scope="module")
def minilm_tf1(tmp_path_factory):
    """MiniLM as a google-research/bert release: bert_model.ckpt + bert_config.json + vocab.txt."""
    folder = tmp_path_factory.mktemp("minilm_tf1")
    weights = load_file(os.path.join(bert.minilm_dir(), "model.safetensors"))
    tensors = hf_to_tf1(weights)
    # What real TF1 checkpoints carry besides the encoder: pre-training head, step counter, Adam slots.
    tensors["cls/predictions/output_bias"] = np.zeros([30522], np.float32)
    tensors["global_step"] = np.array(1000, np.int64)
    tensors["bert/pooler/dense/bias/adam_m"] = np.zeros([384], np.float32)
    write_tf1_checkpoint(str(folder / "bert_model.ckpt"), tensors)
    shutil.copyfile(os.path.join(bert.minilm_dir(), "config.json"), folder / "bert_config.json")
    shutil.copyfile(os.path.join(bert.minilm_dir(), "vocab.txt"), folder / "vocab.txt")
    return folder, weights


def sst2_inputs(vocab_file: str) -> dict[str, np.ndarray]:
    with open(os.path.join(DATA_DIR, "sst2", "dev.tsv"), encoding="utf-8") as f:
        next(f)
        sentences = [line.split("\t")[0] for _, line in zip(range(8), f)]
    features = WordPieceTokenizer(vocab_file, seq_length=64).encode(tf.constant(sentences))
    return {k: v.numpy() for k, v in features.items()}


def test_tf1_checkpoint_converts_with_parity(minilm_tf1, tmp_path):
    folder, weights = minilm_tf1
    output_dir = str(tmp_path / "converted")
    # Through the absl launcher's flags (own FlagValues: other launchers define overlapping names).
    flag_values = flags.FlagValues()
    convert_launcher.define_flags(flag_values)
    flag_values(["convert", "--from=tf1", f"--checkpoint={folder}/bert_model.ckpt",
                 f"--bert_config={folder}/bert_config.json", f"--output_dir={output_dir}"])
    assert convert_launcher.run(flag_values) == os.path.join(output_dir, "bert_model.ckpt")
    assert sorted(os.listdir(output_dir)) == [
        "bert_config.json", "bert_model.ckpt.data-00000-of-00001", "bert_model.ckpt.index", "vocab.txt"]

    encoder, vocab_file = loading.make_encoder(output_dir)
    inputs = sst2_inputs(vocab_file)
    expected = ref.bert_forward(weights, 12, **inputs)
    seq_diff, pooled_diff = ref.max_abs_diffs(expected, encoder(inputs), inputs["input_mask"])
    print(f"TF1 -> TF2 parity: sequence_output {seq_diff:.2e}, pooled_output {pooled_diff:.2e}")
    assert seq_diff <= 1e-4 and pooled_diff <= 1e-4

    # The TF1 release folder itself is also a valid make_encoder init (converted on the fly).
    direct, _ = loading.make_encoder(str(folder))
    np.testing.assert_array_equal(direct(inputs)["pooled_output"], encoder(inputs)["pooled_output"])


def test_hf_converts_to_the_same_encoder(tmp_path):
    convert.convert_hf(os.path.join(bert.minilm_dir(), "model.safetensors"), str(tmp_path))
    converted, vocab_file = loading.make_encoder(str(tmp_path))
    original, _ = loading.make_encoder("minilm")
    assert json.loads((tmp_path / "bert_config.json").read_text())["num_hidden_layers"] == 6
    for a, b in zip(converted.weights, original.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert open(vocab_file).read() == open(os.path.join(bert.minilm_dir(), "vocab.txt")).read()


def test_mismatched_tf1_checkpoint_lists_every_problem(tmp_path):
    tensors = hf_to_tf1(ref.random_hf_weights(seed=0, **TINY_SHAPES))
    del tensors["bert/encoder/layer_0/attention/output/LayerNorm/beta"]
    tensors["bert/encoder/layer_1/attention/self/value/kernel"] = np.zeros([64, 32], np.float32)
    tensors["bert/encoder/layer_7/output/dense/bias"] = np.zeros([64], np.float32)
    tensors["global_step"] = np.array(5, np.int64)  # ignored: not part of the encoder
    prefix = str(tmp_path / "bert_model.ckpt")
    write_tf1_checkpoint(prefix, tensors)
    (tmp_path / "bert_config.json").write_text(json.dumps(dict(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)))

    with pytest.raises(ValueError) as error:
        convert.convert_tf1(prefix, str(tmp_path / "out"), vocab_file=__file__)
    message = str(error.value)
    assert f"TF1 checkpoint {prefix}" in message
    assert "1 missing:\n    bert/encoder/layer_0/attention/output/LayerNorm/beta [64]" in message
    assert "1 unexpected:\n    bert/encoder/layer_7/output/dense/bias" in message
    assert "1 mis-shaped:\n    bert/encoder/layer_1/attention/self/value/kernel: expected [64, 64], found [64, 32]" \
        in message
    assert "global_step" not in message
    assert not (tmp_path / "out").exists()

    with pytest.raises(FileNotFoundError, match="TF1 checkpoint not found: .*nope.index"):
        convert.convert_tf1(str(tmp_path / "nope"), str(tmp_path / "out"))
