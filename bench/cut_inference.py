"""NER and SQuAD evaluation and prediction: windows cut to their longest (the default off TPU) against full padding.

  .venv/bin/python bench/cut_inference.py --task=conll_ner --data_dir=../shared/data [--rounds=3] [--head=crf]
  .venv/bin/python bench/cut_inference.py --task=squad --data_dir=../shared/data --eval_examples=1000 --predict_examples=300

all-MiniLM-L6-v2 with the Task's head (untrained: the cost does not depend on the weights), float32; NER at
seq 64 with a CRF (as configs/conll_crf.flags), SQuAD at seq 384 (the README's recipe). Per round, in an order
reversed every other round:
  evaluate cut / padded:  Trainer.evaluate, one Trainer each (Task(cut_eval_batches=True / False), the same
                          weights), over CoNLL-2003 valid or the SQuAD evaluation questions (--eval_examples).
  predict cut / padded:   task.predict (what launch.predict runs) on raw text (--predict_examples sentences or
                          questions), both traced once per model.
  predict eager padded:   the model called eagerly on the same windows in order, padded to max_seq_length: how
                          task.predict ran before c60f7f1 (NER) and 4911866 (SQuAD), without its decoding.
Everything runs once before the rounds (tracing, the first oneDNN primitives); medians over rounds and
same-round ratios are printed. The script checks that cut and padded runs give the same scores and the same
predictions, and exits non-zero if they do not.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from crf_cost import cpu_model, load  # noqa: E402
from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from tasks.encoders import bert  # noqa: E402

ENCODER_INPUTS = ("input_word_ids", "input_mask", "input_type_ids")


def conll_ner(args):
    """(task factory by cut_eval_batches, task.predict's inputs, task -> the padded windows of the eager run)."""
    from tasks.ner import conll  # noqa: PLC0415
    from tasks.ner import task as ner_task  # noqa: PLC0415
    config = ner_task.TaggingConfig(
        encoder=bert.BertConfig.tiny() if args.quick else "minilm", head=args.head, data_dir=args.data_dir,
        vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"), max_seq_length=args.max_seq_length or 64,
        max_eval_sentences=args.eval_examples)
    sentences = conll.read_conll(os.path.join(args.data_dir, "conll2003", "valid.txt"))
    texts = [" ".join(s.words) for s in sentences[:args.predict_examples]]

    def eager_windows(task):
        words = [tuple(m.group() for m in ner_task._WORD.finditer(t)) for t in texts]  # pylint: disable=protected-access
        windows = task.encode([conll.Sentence(w, ("O",) * len(w)) for w in words]).arrays
        return {k: v for k, v in windows.items() if k != "tags"}
    return (lambda cut: ner_task.TaggingTask(config, cut_eval_batches=cut)), (texts,), eager_windows


def squad(args):
    """As conll_ner, for SQuAD v1.1 dev (split by article, as the Task's evaluation split is)."""
    from tasks.squad import data as squad_data  # noqa: PLC0415
    from tasks.squad import task as squad_task  # noqa: PLC0415
    config = squad_task.SquadConfig(
        encoder=bert.BertConfig.tiny() if args.quick else "minilm", data_dir=args.data_dir,
        max_seq_length=args.max_seq_length or 384, max_examples=args.eval_examples or None, cache_dir=args.cache_dir)
    features, _ = squad_task.SquadTask(config).features("validation")
    examples = features.data.examples[:args.predict_examples]
    questions = [e.question for e in examples]
    contexts = [features.data.contexts[e.context_index] for e in examples]

    def eager_windows(task):
        data = squad_data.data_from_pairs(questions, contexts)
        windows = squad_data.build_features(data, squad_data.OffsetTokenizer(task.vocab_file, lower_case=config.lower_case),
                                            config.feature_settings).arrays
        return {k: windows[k] for k in ENCODER_INPUTS}
    return (lambda cut: squad_task.SquadTask(config, cut_eval_batches=cut)), (questions, contexts), eager_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="conll_ner", choices=("conll_ner", "squad"))
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--head", default="crf", choices=("crf", "softmax"), help="conll_ner's head")
    parser.add_argument("--max_seq_length", type=int, default=0, help="0: 64 for conll_ner, 384 for squad")
    parser.add_argument("--eval_examples", type=int, default=0,
                        help="evaluate the first N sentences (conll_ner) or questions (squad); 0: all")
    parser.add_argument("--predict_examples", type=int, default=1000, help="sentences or questions predicted")
    parser.add_argument("--cache_dir", default=None, help="squad's feature cache (default ~/.cache/bert_engine/squad)")
    parser.add_argument("--jit_compile", action="store_true", help="XLA-compile the eval step (once per width)")
    parser.add_argument("--quick", action="store_true", help="a tiny random encoder (2 x 64): a smoke run")
    args = parser.parse_args()
    print(f"command: python bench/cut_inference.py {' '.join(sys.argv[1:])}")
    print(f"CPU: {cpu_model()}; load average at start {load()}", flush=True)

    make_task, predict_inputs, eager_windows = {"conll_ner": conll_ner, "squad": squad}[args.task](args)
    trainers = {cut: Trainer(make_task(cut), TrainerConfig(
        model_dir=tempfile.mkdtemp(prefix="cut_inference_"), train_steps=1, global_batch_size=32, eval_batch_size=32,
        eval_split="validation"), OptimizerConfig(), RuntimeConfig(precision="float32", jit_compile=args.jit_compile))
        for cut in (True, False)}
    trainers[False].model.set_weights(trainers[True].model.get_weights())
    model = trainers[True].model
    windows = eager_windows(trainers[False].task)

    def predict_eager_padded():
        for start in range(0, len(windows["input_mask"]), 32):
            outputs = model({k: v[start:start + 32] for k, v in windows.items()}, training=False)
            [t.numpy() for t in outputs.values()]  # pylint: disable=expression-not-assigned

    configs = {
        "evaluate cut": lambda: trainers[True].evaluate("validation"),
        "evaluate padded": lambda: trainers[False].evaluate("validation"),
        "predict cut": lambda: trainers[True].task.predict(model, *predict_inputs),
        "predict padded": lambda: trainers[False].task.predict(model, *predict_inputs),
        "predict eager padded": predict_eager_padded,
    }
    results = {name: fn() for name, fn in configs.items()}  # the warm-up, and the outputs to compare
    scores = [{k: v for k, v in results[f"evaluate {kind}"].items() if k != "loss"} for kind in ("cut", "padded")]
    print(f"scores cut {scores[0]}\n       padded {scores[1]}: {'equal' if scores[0] == scores[1] else 'DIFFER'}")
    same_predictions = results["predict cut"] == results["predict padded"]
    print(f"predict: {len(predict_inputs[0])} inputs; cut and padded "
          f"{'give the same predictions' if same_predictions else 'DIFFER'}", flush=True)

    seconds = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name in list(configs)[::(-1 if round_index % 2 else 1)]:
            start = time.perf_counter()
            configs[name]()
            seconds[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in configs), flush=True)

    evaluated = trainers[True].task.num_examples("validation")
    print(f"\nload average at end {load()}")
    print(f"| seconds (median of {args.rounds}) | evaluate ({evaluated} windows) | predict "
          f"({len(predict_inputs[0])} inputs, {len(windows['input_mask'])} windows) |\n| --- | ---: | ---: |")
    for kind in ("cut", "padded"):
        print(f"| {kind} | {statistics.median(seconds[f'evaluate {kind}']):.2f} | "
              f"{statistics.median(seconds[f'predict {kind}']):.2f} |")
    print(f"| eager, padded (predict before) | | {statistics.median(seconds['predict eager padded']):.2f} |")

    def ratio(slow: str, fast: str) -> str:
        per_round = [a / b for a, b in zip(seconds[slow], seconds[fast])]
        return f"{statistics.median(per_round):.2f}x ({', '.join(f'{r:.2f}' for r in per_round)})"
    print(f"evaluate: cut {ratio('evaluate padded', 'evaluate cut')} faster than padded")
    print(f"predict: cut {ratio('predict padded', 'predict cut')} faster than padded, "
          f"{ratio('predict eager padded', 'predict cut')} faster than eager padded")
    if not (scores[0] == scores[1] and same_predictions):
        sys.exit("cut and padded runs disagree (see above)")


if __name__ == "__main__":
    main()
