"""Answers raw inputs with a fine-tuned model from a `launch.train` model_dir.

  python -m launch.predict --model_dir=runs/sst2_demo --text="a gripping, funny film"
  python -m launch.predict --task=conll_ner --model_dir=runs/conll_crf \\
      --text="Angela Merkel met Emmanuel Macron in Paris on Monday ."
  python -m launch.predict --task=squad --model_dir=runs/squad \\
      --question="Who wrote it?" --context="It was written by Ada Lovelace in 1843."
  python -m launch.predict --task=squad --model_dir=runs/squad --input_json=pairs.json --output_json=answers.json

Inputs: `--text` (repeatable) or `--input_file` (one text per line; for sentence-pair classification
the two texts separated by a tab) for sst2/classification/conll_ner; for squad `--question`/`--context`,
or `--input_json`: a list of {"question", "context"[, "id"]} objects or a SQuAD v1.1 file (every
question in it; the output then scores with the official evaluate-v1.1.py). --task and the task flags
(--max_seq_length, --head, --label_names, ...) default to those launch.train saved in the model_dir
(model_flags.json); flags given here win. A model that does not match the checkpoint is refused with
the difference, never run with random weights.

Output: one JSON line per input on stdout; `--output_json` also writes them (squad: the official
{id: answer} file). conll_ner entities carry character offsets into the input text.

One `Predictor` per task: how to read its raw inputs from flags, how to run the Task on them, and
what to write. Add a task by adding an entry to PREDICTORS (and its input flags below); the model's
flags come from the Task's config (launch/config_flags.py).
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

from launch import common_flags, config_flags, errors  # noqa: E402
from tasks import registry  # noqa: E402  (light: TensorFlow loads when a Task is built)

FLAGS = flags.FLAGS

common_flags.define_task()
flags.DEFINE_string("model_dir", None, "A launch.train model_dir (latest checkpoint) or a checkpoint path.")
flags.mark_flag_as_required("model_dir")
flags.DEFINE_string("input_json", None, "Raw inputs (format per task, see the module docstring).")
flags.DEFINE_string("output_json", None, "Where to write the predictions (default: print only).")
# 32, not 16: on 2 CPU cores task.predict of 512 SST-2 sentences ran 1.09-1.47x faster at 32 than at 16 (bigger
# products) and the same at 64 (bench/RESULTS.md, 2026-12-08); bench/vs_pytorch.py times it at 32.
flags.DEFINE_integer("batch_size", 32, "Sequences per forward pass.")
# sst2 / classification / conll_ner
flags.DEFINE_multi_string("text", None, "A text to classify or tag (repeatable); or use --input_file.")
flags.DEFINE_string("input_file", None, "One text per line (sentence pairs: tab-separated).")
# squad
flags.DEFINE_string("question", None, "squad: one question (with --context) instead of --input_json.")
flags.DEFINE_string("context", None, "squad: the passage that answers --question.")
# The flags that shape the model, from the Task configs (default: as launch.train saved them in the model_dir).
config_flags.define(registry.MODEL_FLAGS)


@dataclasses.dataclass(frozen=True)
class Predictor:
    read_inputs: Callable[[], list[dict]]            # flags -> raw records
    predict: Callable[..., list[dict]]               # (task, model, records) -> records with predictions
    write: Callable[[list[dict], str], None]         # (predictions, path) -> file


def _read_texts() -> list[dict]:
    if bool(FLAGS.text) == bool(FLAGS.input_file):
        raise app.UsageError("give --text (repeatable) or --input_file, one of the two")
    if FLAGS.text:
        return [{"text": text} for text in FLAGS.text]
    from tasks import textfiles  # noqa: PLC0415
    return [{"text": line} for _, line in textfiles.read_lines(FLAGS.input_file, missing="--input_file")
            if line.strip()]


def _predict_classification(task, model, records: list[dict]) -> list[dict]:
    pairs = len(task.config.text_columns) == 2
    columns = [r["text"].split("\t") for r in records]
    for i, texts in enumerate(columns):
        if len(texts) != (2 if pairs else 1):
            raise app.UsageError(f"input {i + 1}: expected {'two tab-separated texts' if pairs else 'one text'} "
                                 f"for --text_columns={','.join(task.config.text_columns)}, got {len(texts)}")
    labels, probabilities = task.predict(model, *zip(*columns), batch_size=FLAGS.batch_size)
    return [dict(r, label=label, probabilities=[round(float(p), 6) for p in row])
            for r, label, row in zip(records, labels, probabilities)]


def _predict_entities(task, model, records: list[dict]) -> list[dict]:
    entities = task.predict(model, [r["text"] for r in records], batch_size=FLAGS.batch_size)
    return [dict(r, entities=[dataclasses.asdict(e) for e in found]) for r, found in zip(records, entities)]


def _write_json_lines(predictions: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)


def _read_squad_inputs() -> list[dict]:
    if FLAGS.question is not None or FLAGS.context is not None:
        if not (FLAGS.question and FLAGS.context):
            raise app.UsageError("--question and --context go together")
        return [{"id": "0", "question": FLAGS.question, "context": FLAGS.context}]
    if not FLAGS.input_json:
        raise app.UsageError("give --question and --context, or --input_json")
    from tasks.squad import data as squad_data  # noqa: PLC0415
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
    from tasks.squad.task import write_predictions  # noqa: PLC0415
    write_predictions(path, {p["id"]: p["answer"] for p in predictions})  # the official {id: answer} format


PREDICTORS: dict[str, Predictor] = {
    "sst2": Predictor(_read_texts, _predict_classification, _write_json_lines),
    "classification": Predictor(_read_texts, _predict_classification, _write_json_lines),
    "conll_ner": Predictor(_read_texts, _predict_entities, _write_json_lines),
    "squad": Predictor(_read_squad_inputs, _predict_squad, _write_squad),
}


def restore_model(task, model_dir: str, values: dict):
    """Builds the Task's model and loads the weights the Trainer saved, refusing any architecture mismatch."""
    from engine import checkpoints, fusion  # noqa: PLC0415
    checkpoint = checkpoints.resolve_checkpoint(model_dir)  # a missing checkpoint fails before a model is built
    model = task.build_model()
    shown = " ".join(f"--{k}={v}" for k, v in sorted(values.items()) if v is not None and k in registry.MODEL_FLAGS)
    path = checkpoints.restore_model(model, checkpoint, expected=f"--task={FLAGS.task} {shown}")
    fusion.for_inference(model)  # fused CPU kernels (engine/fusion.py); the same values
    return model, path


def main(argv):
    del argv
    registry.fill_unset_flags(FLAGS, FLAGS.model_dir)
    if FLAGS.task is None:
        raise app.UsageError(f"--task is needed: {FLAGS.model_dir} has no {registry.MODEL_FLAGS_FILE} from launch.train")
    predictor = PREDICTORS[FLAGS.task]
    records = predictor.read_inputs()
    values = config_flags.launch_values(FLAGS, exclude=("model_dir", "predictions_dir", "text"))
    task, _ = registry.build_task(FLAGS.task, values)
    model, path = restore_model(task, FLAGS.model_dir, values)
    print(f"{FLAGS.task}: {len(records)} inputs, weights from {path}", file=sys.stderr, flush=True)
    predictions = predictor.predict(task, model, records)
    for p in predictions:
        print(json.dumps({k: v for k, v in p.items() if k != "context"}, ensure_ascii=False), flush=True)
    print(f"{FLAGS.task}: {len(predictions)} predictions", file=sys.stderr, flush=True)
    if FLAGS.output_json:
        predictor.write(predictions, FLAGS.output_json)


if __name__ == "__main__":
    errors.run(main)  # input, flag and checkpoint errors: one line, no traceback
