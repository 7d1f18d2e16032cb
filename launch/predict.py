"""Answers raw inputs with a fine-tuned model from a `launch.train` model_dir.

  python -m launch.predict --task=squad --model_dir=runs/squad \\
      --question="Who wrote it?" --context="It was written by Ada Lovelace in 1843."
  python -m launch.predict --task=squad --model_dir=runs/squad --input_json=pairs.json --output_json=answers.json

`--input_json` for squad is a list of {"question", "context"[, "id"]} objects, or a SQuAD v1.1 file
(every question in it; the output then scores with the official evaluate-v1.1.py).

One `Predictor` per task: how to read its raw inputs from flags, how to run the Task on them, and
what to write. Add a task by adding an entry to PREDICTORS (and its input flags below).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("task", "squad", "Task the model was trained on: squad.")
flags.DEFINE_string("model_dir", None, "A launch.train model_dir (latest checkpoint) or a checkpoint path.")
flags.mark_flag_as_required("model_dir")
flags.DEFINE_string("init_encoder", "minilm", "The encoder the model was trained from (sets its architecture).")
flags.DEFINE_string("vocab_file", None, "WordPiece vocab (default: the encoder's own).")
flags.DEFINE_integer("max_seq_length", None, "As in training (task default if unset).")
flags.DEFINE_string("input_json", None, "Raw inputs (format per task, see the module docstring).")
flags.DEFINE_string("output_json", None, "Where to write the predictions (default: print only).")
flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")

# --- squad
flags.DEFINE_string("question", None, "squad: one question (with --context) instead of --input_json.")
flags.DEFINE_string("context", None, "squad: the passage that answers --question.")
flags.DEFINE_integer("doc_stride", None, "squad: as in training.")
flags.DEFINE_integer("max_query_length", None, "squad: as in training.")
flags.DEFINE_integer("n_best_size", None, "squad: start/end candidates per window.")
flags.DEFINE_integer("max_answer_length", None, "squad: longest answer in tokens.")


@dataclasses.dataclass(frozen=True)
class Predictor:
    read_inputs: Callable[[], list[dict]]            # flags -> raw records
    predict: Callable[..., list[dict]]               # (task, model, records) -> records with predictions
    write: Callable[[list[dict], str], None]         # (predictions, path) -> file


def _read_squad_inputs() -> list[dict]:
    if FLAGS.question is not None or FLAGS.context is not None:
        if not (FLAGS.question and FLAGS.context):
            raise app.UsageError("--question and --context go together")
        return [{"id": "0", "question": FLAGS.question, "context": FLAGS.context}]
    if not FLAGS.input_json:
        raise app.UsageError("give --question and --context, or --input_json")
    from tasks import squad_data  # noqa: PLC0415
    raw = squad_data.load_json(FLAGS.input_json)
    if isinstance(raw, dict) and "data" in raw:  # a SQuAD file: every question, ids kept
        return [{"id": qa["id"], "question": qa["question"], "context": paragraph["context"]}
                for article in raw["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    if not isinstance(raw, list) or not all(isinstance(r, dict) and {"question", "context"} <= set(r) for r in raw):
        raise app.UsageError(f"{FLAGS.input_json}: expected a SQuAD file or a list of {{question, context}} objects")
    return [{"id": str(r.get("id", i)), "question": r["question"], "context": r["context"]} for i, r in enumerate(raw)]


def _predict_squad(task, model, records: list[dict]) -> list[dict]:
    answers = task.predict(model, [r["question"] for r in records], [r["context"] for r in records],
                           batch_size=FLAGS.batch_size)
    return [dict(r, answer=a) for r, a in zip(records, answers)]


def _write_squad(predictions: list[dict], path: str) -> None:
    from tasks.squad import write_predictions  # noqa: PLC0415
    write_predictions(path, {p["id"]: p["answer"] for p in predictions})  # the official {id: answer} format


PREDICTORS: dict[str, Predictor] = {
    "squad": Predictor(_read_squad_inputs, _predict_squad, _write_squad),
}


def restore_model(task, model_dir: str):
    """Builds the Task's model and loads the weights the Trainer saved (`Checkpoint(model=...)`)."""
    import tensorflow as tf  # noqa: PLC0415
    path = tf.train.latest_checkpoint(model_dir) if os.path.isdir(model_dir) else model_dir
    if not path:
        raise app.UsageError(f"--model_dir={model_dir}: no checkpoint found")
    model = task.build_model()
    status = tf.train.Checkpoint(model=model).read(path)
    # Every model variable must come from the checkpoint: a different --init_encoder or --max_seq_length
    # architecture fails here instead of answering with random weights.
    status.assert_existing_objects_matched().expect_partial()
    return model, path


def main(argv):
    del argv
    from tasks import registry  # noqa: PLC0415
    if FLAGS.task not in PREDICTORS:
        raise app.UsageError(f"--task={FLAGS.task!r}: predict supports {sorted(PREDICTORS)}")
    predictor = PREDICTORS[FLAGS.task]
    records = predictor.read_inputs()
    values = {k: v for k, v in FLAGS.flag_values_dict().items() if k not in ("model_dir", "predictions_dir")}
    task, _ = registry.build_task(FLAGS.task, values)
    model, path = restore_model(task, FLAGS.model_dir)
    print(f"{FLAGS.task}: {len(records)} inputs, weights from {path}", file=sys.stderr, flush=True)
    predictions = predictor.predict(task, model, records)
    for p in predictions:
        print(json.dumps({k: v for k, v in p.items() if k != "context"}, ensure_ascii=False), flush=True)
    if FLAGS.output_json:
        predictor.write(predictions, FLAGS.output_json)


if __name__ == "__main__":
    app.run(main)
