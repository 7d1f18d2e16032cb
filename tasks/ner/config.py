"""TaggingConfig: the options of tasks/ner/task.py, light (no TensorFlow) for launch's flags."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Optional

from engine.options import option
from tasks import options

if TYPE_CHECKING:
    from tasks.encoders.loading import EncoderInit


def _conll2003_labels() -> tuple:
    from tasks.ner import conll  # noqa: PLC0415 - numpy: not for launch's flags
    return conll.CONLL2003_LABELS


@dataclasses.dataclass(frozen=True)
class TaggingConfig:
    encoder: EncoderInit = options.encoder()
    vocab_file: Optional[str] = options.vocab_file()
    lower_case: bool = options.lower_case()
    data_dir: Optional[str] = None                # holds conll2003/{train,valid,test}.txt; default_data_dir()
    data_files: Optional[Mapping[str, str]] = None  # split -> CoNLL file; overrides data_dir for those splits
    labels: tuple = dataclasses.field(default_factory=_conll2003_labels)
    head: str = option("crf", "conll_ner: crf, or softmax (the baseline).", choices=("crf", "softmax"), model=True)
    iob2_constraints: bool = option(True, "conll_ner CRF: forbid I-X after anything but B-X/I-X.", model=True)
    max_seq_length: int = options.max_seq_length(128)
    max_words: int = option(0, "conll_ner: words per window (0: max_seq_length - 2, every word fits).", model=True)
    dropout: float = 0.1
    casing_features: Optional[bool] = option(
        None, "conll_ner: add a word-shape embedding (capitalisation, conll.word_shape; zero-initialised, so "
        "training starts from the pretrained encoder exactly) to the word-piece embeddings, giving an uncased "
        "encoder back what it never sees. Needs a Model Garden encoder (not a hub.KerasLayer). Unset: on when "
        "lower_case and the encoder accepts input embeddings.", model=True)
    max_train_sentences: int = option(0, "conll_ner: first N training sentences (smoke runs; 0: all).")
    max_eval_sentences: int = option(0, "conll_ner: first N evaluation sentences (smoke runs; 0: all).")
    shuffle_buffer: int = 20000
    # Word-piece tensors are cut to the longest sentence of a batch; word-level tensors keep their length. On by
    # default, as for classification: CoNLL sentences fill ~a third of seq 64, and the CRF recipe trained 1.76x
    # faster per update grouped (3.5 vs 2.0 updates/s, test F1 89.47 vs 89.53: bench/RESULTS.md).
    group_by_length: int = options.group_by_length(16)
    seed: int = options.seed()
    predictions_dir: Optional[str] = option(None, "conll_ner: where {split}_predictions.txt go (unset: not "
                                            "written).")

    def __post_init__(self):
        if self.head not in ("crf", "softmax"):
            raise ValueError(f"head={self.head!r}: expected 'crf' or 'softmax'")
        options.check_group_by_length(self.group_by_length)
        if self.max_seq_length < 3:
            raise ValueError(f"max_seq_length={self.max_seq_length}: needs room for [CLS], a word and [SEP]")
        if self.labels[0] != "O":
            # Tag id 0 doubles as the padding tag; it must be the harmless one.
            raise ValueError(f"labels must start with 'O', got {self.labels[0]!r}")

    @property
    def words_per_window(self) -> int:
        return self.max_words or self.max_seq_length - 2
