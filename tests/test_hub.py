"""TF Hub round trip: exported encoder/preprocessor SavedModels against the in-memory encoder and tokenizer."""
import os
import shutil

import tasks  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np
import pytest
from absl import flags
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras

from launch import export as export_launcher
from tasks.encoders import bert, loading
from tasks.encoders import hub as thub
from tasks.encoders.tokenization import WordPieceTokenizer

from conftest import DATA_DIR  # noqa: E402  (../shared/data beside the repository, or $DATA_DIR)

SEQ_LENGTH = 32
TRICKY = ["Café déjà vu, naïve ﬁ ＡＢＣ", "tab\there\x07bell 東京 ΣΑΣ"]


def sst2(count: int, split: str = "dev") -> list[str]:
    with open(os.path.join(DATA_DIR, "sst2", f"{split}.tsv"), encoding="utf-8") as f:
        next(f)
        return [line.split("\t")[0] for _, line in zip(range(count), f)]


def assert_same_outputs(actual, expected, mask, atol=1e-5):
    """pooled_output and every layer's output over unpadded positions (padded ones are don't-care)."""
    keep = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(actual["pooled_output"], expected["pooled_output"], atol=atol, rtol=0)
    assert len(actual["encoder_outputs"]) == len(expected["encoder_outputs"])
    for got, want in zip(actual["encoder_outputs"] + [actual["sequence_output"]],
                         expected["encoder_outputs"] + [expected["sequence_output"]]):
        np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def vocab_file():
    return os.path.join(bert.minilm_dir(), "vocab.txt")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, vocab_file):
    """A random tiny encoder (MiniLM's vocab) and its preprocessor, exported; returns (encoder, folder)."""
    folder = tmp_path_factory.mktemp("tiny_export")
    tf_keras.utils.set_random_seed(1)  # the fine-tuning test's step count is tuned on seeds 0-2
    encoder, _ = loading.make_encoder(bert.BertConfig.tiny())
    thub.save_encoder(encoder, str(folder / "encoder"), vocab_file=vocab_file)
    thub.save_preprocessor(str(folder / "preprocessor"), vocab_file=vocab_file, seq_length=SEQ_LENGTH)
    return encoder, folder


def test_tiny_encoder_round_trip(tiny_export, vocab_file):
    encoder, folder = tiny_export
    inputs = WordPieceTokenizer(vocab_file, seq_length=SEQ_LENGTH).encode(tf.constant(sst2(6)))
    layer = hub.KerasLayer(str(folder / "encoder"), trainable=False)
    outputs = layer(inputs)
    assert_same_outputs(outputs, encoder(inputs), inputs["input_mask"])
    np.testing.assert_array_equal(outputs["default"], outputs["pooled_output"])
    loaded = hub.load(str(folder / "encoder"))  # the extras TF Hub BERT encoders carry
    assert open(loaded.vocab_file.asset_path.numpy()).read() == open(vocab_file).read()
    assert bool(loaded.do_lower_case.numpy())


def test_preprocessor_matches_wordpiece_tokenizer(tiny_export, vocab_file):
    _, folder = tiny_export
    tokenizer = WordPieceTokenizer(vocab_file, seq_length=SEQ_LENGTH)
    firsts, seconds = sst2(6) + TRICKY, sst2(8, "train")

    # One segment through hub.KerasLayer, as in the TF Hub examples (default seq_length of the export).
    single = hub.KerasLayer(str(folder / "preprocessor"))(tf.constant(firsts))
    for key, value in tokenizer.encode(tf.constant(firsts)).items():
        np.testing.assert_array_equal(single[key], value, err_msg=key)

    # Pairs through tokenize + bert_pack_inputs with a seq_length override, as bert_en_uncased_preprocess.
    preprocessor = thub.hub_preprocessor(str(folder / "preprocessor"))
    tokens = preprocessor.tokenize(tf.constant(firsts))
    assert tokens.ragged_rank == 2  # [batch, (words), (wordpieces)] as on TF Hub
    pairs = preprocessor(tf.constant(firsts), tf.constant(seconds), seq_length=48)
    for key, value in tokenizer.encode(tf.constant(firsts), tf.constant(seconds), seq_length=48).items():
        np.testing.assert_array_equal(pairs[key], value, err_msg=key)
    assert (pairs["input_type_ids"].numpy() == 1).any()


def test_fine_tuning_through_the_hub_layer_trains_the_encoder(tiny_export):
    _, folder = tiny_export
    tf_keras.utils.set_random_seed(0)  # head init and dropout
    encoder = hub.KerasLayer(str(folder / "encoder"), trainable=True)
    head = tf_keras.layers.Dense(2)
    # Toy task: class 0 sentences use word ids 1000-1099, class 1 ids 2000-2099.
    rng = np.random.default_rng(0)
    labels = np.arange(16) % 2
    ids = (1000 + 1000 * labels[:, None] + rng.integers(0, 100, size=(16, 12))).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    inputs = {"input_word_ids": ids, "input_mask": np.ones_like(ids), "input_type_ids": np.zeros_like(ids)}
    before = [v.numpy().copy() for v in encoder.trainable_variables]
    optimizer = tf_keras.optimizers.Adam(3e-3)
    losses = []
    for _ in range(16):
        with tf.GradientTape() as tape:
            logits = head(encoder(inputs, training=True)["pooled_output"])
            loss = tf.reduce_mean(tf_keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        variables = encoder.trainable_variables + head.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        losses.append(float(loss))
    encoder_grads = grads[:len(encoder.trainable_variables)]
    assert len(encoder.trainable_variables) == 39  # every tiny-encoder variable is trainable through Hub
    assert all(g is not None for g in encoder_grads)
    assert all(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in encoder_grads)
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, encoder.trainable_variables)]
    assert all(changed)
    assert losses[-1] < 0.2 * losses[0], losses  # ~0.69 -> < 0.05 on seeds 0-2


def test_minilm_export_round_trip(tmp_path):
    flag_values = flags.FlagValues()  # through the launcher's flags, as `python -m launch.export` runs it
    export_launcher.define_flags(flag_values)
    flag_values(["export", "--encoder=minilm", f"--export_dir={tmp_path}", "--seq_length=64"])
    paths = export_launcher.run(flag_values)
    reloaded, vocab_file = loading.make_encoder(paths["encoder"])  # a Hub SavedModel as an encoder init
    original, original_vocab = loading.make_encoder("minilm")
    assert isinstance(reloaded, hub.KerasLayer) and reloaded.trainable
    assert open(vocab_file).read() == open(original_vocab).read()
    inputs = thub.hub_preprocessor(paths["preprocessor"])(tf.constant(sst2(8)))  # --seq_length=64
    assert inputs["input_word_ids"].shape == (8, 64)
    assert_same_outputs(reloaded(inputs), original(inputs), inputs["input_mask"])


def test_hub_errors_name_what_was_expected(tiny_export, tmp_path):
    _, folder = tiny_export
    with pytest.raises(FileNotFoundError, match="no such SavedModel folder"):
        thub.hub_encoder(str(tmp_path / "missing"))

    class NotAnEncoder(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def predict(self, x):
            return x * 2.0

    tf.saved_model.save(NotAnEncoder(), str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"expected a callable taking a dict of int32 .*found .*signatures"):
        loading.make_encoder(str(tmp_path / "other"))

    with pytest.raises(ValueError, match=r"expected `tokenize` and `bert_pack_inputs`, missing \['tokenize'"):
        thub.hub_preprocessor(str(folder / "encoder"))

    shutil.copytree(folder / "encoder", tmp_path / "short_vocab")
    vocab = (tmp_path / "short_vocab" / "assets" / "vocab.txt").read_text().splitlines()
    (tmp_path / "short_vocab" / "assets" / "vocab.txt").write_text("\n".join(vocab[:-1]) + "\n")
    with pytest.raises(ValueError, match="has 30521 tokens but the encoder's embedding table has 30522 rows"):
        loading.make_encoder(str(tmp_path / "short_vocab"))
