"""ClassificationConfig: the options of tasks/classification/task.py, light (no TensorFlow) for launch's flags."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Optional

from engine.options import option
from tasks import options

if TYPE_CHECKING:
    from tasks.encoders.loading import EncoderInit


@dataclasses.dataclass(frozen=True)
class ClassificationConfig:
    data_files: Mapping[str, str]                     # split name ("train", "validation", ...) -> TSV path
    encoder: EncoderInit = options.encoder()
    vocab_file: Optional[str] = options.vocab_file()
    lower_case: bool = options.lower_case()
    max_seq_length: int = options.max_seq_length(128)
    text_columns: tuple = option(("sentence",), "TSV column(s) with the text: one, or two for sentence pairs (the "
                                 "serving signature then takes `sentence` and `sentence_b`).", model=True)
    label_column: str = option("label", "TSV column with the label.")
    label_names: tuple = option(
        (), "Label strings in class-id order (the file may hold the names or the ids 0, 1, ...); predictions and "
        "the serving export answer with them (unset: integer labels, answered as \"0\", \"1\", ...).", model=True)
    num_classes: int = option(2, "Classes, for integer labels.", model=True)
    head: str = option("softmax", "classification: softmax, or sigmoid (binary only).",
                       choices=("softmax", "sigmoid"), model=True)
    pooling: str = option(
        "cls", "classification: the pooled [CLS] output (BERT's recipe), or the masked mean of the token vectors "
        "(how sentence-transformers encoders such as all-MiniLM were trained).", choices=("cls", "mean"), model=True)
    last_layer_cls_only: bool = option(
        True, "With --pooling=cls: the encoder's last layer computes the [CLS] position only (its attention still "
        "reads every token; Model Garden's output_range=1). The head reads nothing else, so the logits are the "
        "same and MiniLM does ~14 % less arithmetic per example, in training and inference. Off: every position, "
        "as Hugging Face's BertForSequenceClassification computes. Ignored for TF Hub encoders.")
    class_weights: tuple = option((), "Loss weight per class, for imbalanced data.", item=float)
    dropout: float = 0.1
    shuffle_buffer: int = 20000
    group_by_length: int = options.group_by_length(16)
    seed: int = options.seed()

    def __post_init__(self):
        if self.head not in ("softmax", "sigmoid"):
            raise ValueError(f"head={self.head!r}: expected 'softmax' or 'sigmoid'")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling={self.pooling!r}: expected 'cls' or 'mean'")
        if self.head == "sigmoid" and self.classes != 2:
            raise ValueError(f"head='sigmoid' is for 2 classes, got {self.classes}")
        if self.class_weights and len(self.class_weights) != self.classes:
            raise ValueError(f"class_weights has {len(self.class_weights)} values for {self.classes} classes")
        options.check_group_by_length(self.group_by_length)
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"text_columns={self.text_columns}: one sentence or a sentence pair")

    @property
    def classes(self) -> int:
        return len(self.label_names) or self.num_classes

    @property
    def answer_labels(self) -> tuple:
        """What predict and the serving export answer for each class id: its name, else the id as a string."""
        return tuple(self.label_names) or tuple(str(i) for i in range(self.num_classes))
