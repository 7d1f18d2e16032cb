"""SquadConfig: the options of tasks/squad/task.py, light (no TensorFlow) for launch's flags."""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Mapping, Optional

from engine.options import option
from tasks import options, textfiles

if TYPE_CHECKING:
    from tasks.encoders.loading import EncoderInit
    from tasks.squad.data import FeatureSettings


@dataclasses.dataclass(frozen=True)
class SquadConfig:
    """SQuAD options; field names double as launch flag names (see tasks/registry.py)."""
    data_dir: str = option(text="holds squad/dev-v1.1.json (the launch flag --data_dir)", flag=False,
                           default_factory=textfiles.default_data_dir)
    # Split -> SQuAD v1.1-format JSON ("train", "validation"/"eval"; --train_data, --eval_data). With both, each
    # file is read whole; otherwise the one file given, or squad_file, is split by article (squad_data).
    data_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    squad_file: Optional[str] = option(None, "squad: SQuAD v1.1 JSON split by article into train and evaluation "
                                       "(default <data_dir>/squad/dev-v1.1.json).")
    encoder: EncoderInit = options.encoder()
    vocab_file: Optional[str] = options.vocab_file()
    lower_case: bool = options.lower_case()
    max_seq_length: int = options.max_seq_length(384)
    doc_stride: int = option(128, "squad: tokens between the starts of overlapping context windows.", model=True)
    max_query_length: int = option(64, "squad: question tokens kept.", model=True)
    n_best_size: int = option(20, "squad: start and end candidates per window when decoding.", model=True)
    max_answer_length: int = option(30, "squad: longest answer in tokens.", model=True)
    # Off by default for SQuAD: configs/squad.flags trained 1.2x faster grouped (16) but scored 0.7-1.8 F1 lower
    # (two seeds each; bench/RESULTS.md, 2026-12-02). Classification and NER lost nothing measurable.
    group_by_length: int = options.group_by_length(0)
    max_examples: Optional[int] = option(None, "squad: first N questions of each split (smoke runs).")
    cache_dir: Optional[str] = option(None, "squad: feature cache (default ~/.cache/bert_engine/squad).")
    predictions_dir: Optional[str] = option(None, "squad: where predictions_<split>.json go (default: the run's "
                                            "model_dir).")
    model_dir: Optional[str] = None         # the run's, for predictions_dir's default; neither set: not written
    shuffle_buffer: int = 10000
    seed: int = options.seed()

    def __post_init__(self):
        options.check_group_by_length(self.group_by_length)
        if self.squad_file and self.data_files:
            raise ValueError("--squad_file (one file, split by article) or --train_data/--eval_data (a file per "
                             "split), not both")

    @property
    def input_path(self) -> str:
        """The one file split by article when not both a training and an evaluation file are given."""
        files = list(self.data_files.values())
        return self.squad_file or (files[0] if len(files) == 1 else os.path.join(self.data_dir, "squad",
                                                                                  "dev-v1.1.json"))

    def source(self, split: str) -> tuple[str, str]:
        """(file, part of it) that holds `split`: a split's own file whole ("all"), else `split` of input_path."""
        from tasks.squad import data as squad_data  # noqa: PLC0415 - TensorFlow: not for launch's flags
        split = squad_data.canonical_split(split)
        files = {squad_data.canonical_split(k): v for k, v in self.data_files.items()}
        if split != "all" and {"train", "eval"} <= set(files):
            return files[split], "all"
        return self.input_path, split

    @property
    def feature_settings(self) -> FeatureSettings:
        from tasks.squad import data as squad_data  # noqa: PLC0415
        return squad_data.FeatureSettings(self.max_seq_length, self.doc_stride, self.max_query_length)
