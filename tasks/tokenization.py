"""WordPiece tokenization and BERT input packing, in-graph with tensorflow-text.

Runs inside `tf.data` so the input pipeline is checkpointable and needs no Python per example.
Packing reuses Model Garden's `BertPackInputs` (the same op TF Hub preprocessors export), so
what we train on is exactly what an exported preprocessor produces.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import tensorflow as tf
import tensorflow_text as tf_text
from official.nlp.modeling.layers import text_layers


def read_vocab(vocab_file: str) -> list[str]:
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"vocab file not found: {vocab_file}")
    with open(vocab_file, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


class WordPieceTokenizer:
    """Lower-casing BERT tokenizer + `[CLS] a [SEP] (b [SEP])` packing to a fixed `seq_length`."""

    def __init__(self, vocab_file: str, *, lower_case: bool = True, seq_length: int = 128):
        self.vocab_file = vocab_file
        self.vocab = read_vocab(vocab_file)
        self.lower_case = lower_case
        self.seq_length = seq_length
        index = {token: i for i, token in enumerate(self.vocab)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in index]
        if missing:
            raise ValueError(f"{vocab_file}: special tokens {missing} are missing; is this a BERT vocab.txt?")
        self.pad_id, self.unk_id = index["[PAD]"], index["[UNK]"]
        self.cls_id, self.sep_id = index["[CLS]"], index["[SEP]"]
        # tensorflow-text's BertTokenizer: BasicTokenizer (lower case, strip accents, split punctuation
        # and CJK) then WordPiece, the same algorithm as google-research/bert and HF BertTokenizer.
        self._tokenizer = tf_text.BertTokenizer(
            vocab_file, lower_case=lower_case, token_out_type=tf.int32, unknown_token="[UNK]")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """[batch] strings -> [batch, (wordpieces)] int32 ids."""
        return self._tokenizer.tokenize(texts).merge_dims(-2, -1)

    def tokenize_with_offsets(self, texts: tf.Tensor):
        """[batch] strings -> (ids, begin, end) ragged [batch, (words), (wordpieces)]; byte offsets."""
        return self._tokenizer.tokenize_with_offsets(texts)

    def pack(self, segments: Sequence[tf.RaggedTensor], seq_length: int | None = None) -> Mapping[str, tf.Tensor]:
        """Packs 1 or 2 tokenized segments, truncating round-robin, into BERT's three int32 inputs."""
        return text_layers.BertPackInputs.bert_pack_inputs(
            list(segments), seq_length or self.seq_length,
            start_of_sequence_id=self.cls_id, end_of_segment_id=self.sep_id, padding_id=self.pad_id,
            truncator="round_robin")

    def encode(self, *texts: tf.Tensor, seq_length: int | None = None) -> Mapping[str, tf.Tensor]:
        """Raw strings ([batch] each, one or two segments) -> packed model inputs."""
        return self.pack([self.tokenize(t) for t in texts], seq_length)
