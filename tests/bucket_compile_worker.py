"""Subprocess for tests/test_tpu_shapes.py: trains a tiny length-grouped classifier under --jit_compile with XLA
dumping on (XLA_FLAGS is read at start-up, hence a process of its own); prints the widths it saw and trace counts."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataclasses  # noqa: E402

import conftest  # noqa: E402,F401  (environment and two logical CPUs)
from engine_helpers import run_training  # noqa: E402
from tasks.encoders import bert  # noqa: E402
from tasks.classification.task import ClassificationConfig, ClassificationTask  # noqa: E402

train_file, model_dir, train_steps, seq_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
BATCH = 16
# One layer: XLA's CPU compile time grows with the graph, and one layer shows the compile count as well.
encoder = dataclasses.replace(bert.BertConfig.tiny(), num_hidden_layers=1)
config = ClassificationConfig(data_files={"train": train_file}, encoder=encoder,
                              vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"),
                              max_seq_length=seq_length, group_by_length=4)
trainer = run_training(lambda: ClassificationTask(config), global_batch_size=BATCH, train_steps=train_steps,
                       steps_per_loop=8, jit_compile=True, model_dir=model_dir)
# The same deterministic stream the Trainer read (default strategy: one pipeline, per-replica batch = global).
widths = [int(features["input_word_ids"].shape[1])
          for features, _ in ClassificationTask(config).build_inputs("train", batch_size=BATCH).take(train_steps)]
print(json.dumps({"widths": widths, "accumulate_traces": trainer.train_step._accumulate.experimental_get_tracing_count(),
                  "loop_traces": trainer.train_loop_tracing_count}))
