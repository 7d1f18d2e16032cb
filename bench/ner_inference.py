"""NER evaluation and prediction: windows cut to their longest (the default off TPU) against full padding.

  .venv/bin/python bench/ner_inference.py --data_dir=../shared/data [--rounds=3] [--head=crf] [--jit_compile]

MiniLM + a CRF (or softmax) head at seq 64, as configs/conll_crf.flags trains it (untrained weights: the cost
does not depend on them), float32. Per round, in an order reversed every other round:
  evaluate cut / padded:  Trainer.evaluate over all of CoNLL-2003 valid (3,250 sentences), one Trainer each,
                          TaggingTask(cut_eval_batches=True / False), the same weights.
  predict cut / padded:   task.predict (what launch.predict runs) on the first --predict_sentences valid
                          sentences, raw text; both traced once per model.
  predict eager padded:   the model called eagerly on windows in file order padded to max_seq_length: how
                          task.predict ran before c60f7f1.
Everything is warmed up once (tracing, the first oneDNN primitives) before the rounds; medians over rounds and
same-round ratios are printed. The scores and entities of the cut and padded runs are checked to be equal.
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
from tasks.ner import conll  # noqa: E402
from tasks.ner import task as ner_task  # noqa: E402
from tasks.ner.task import TaggingConfig, TaggingTask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--head", default="crf", choices=("crf", "softmax"))
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--predict_sentences", type=int, default=1000)
    parser.add_argument("--eval_sentences", type=int, default=0, help="the first N valid sentences (0: all)")
    parser.add_argument("--jit_compile", action="store_true", help="XLA-compile the eval step (once per width)")
    parser.add_argument("--quick", action="store_true", help="a tiny random encoder (2 x 64): a smoke run")
    args = parser.parse_args()
    print(f"command: python bench/ner_inference.py {' '.join(sys.argv[1:])}")
    print(f"CPU: {cpu_model()}; load average at start {load()}", flush=True)

    trainers = {}
    for cut in (True, False):
        encoder = bert.BertConfig.tiny() if args.quick else "minilm"
        config = TaggingConfig(encoder=encoder, vocab_file=os.path.join(bert.minilm_dir(), "vocab.txt"),
                               head=args.head, data_dir=args.data_dir, max_seq_length=args.max_seq_length,
                               max_eval_sentences=args.eval_sentences)
        trainers[cut] = Trainer(TaggingTask(config, cut_eval_batches=cut),
                                TrainerConfig(model_dir=tempfile.mkdtemp(prefix="ner_inference_"), train_steps=1,
                                              global_batch_size=32, eval_batch_size=32, eval_split="validation"),
                                OptimizerConfig(), RuntimeConfig(precision="float32", jit_compile=args.jit_compile))
    trainers[False].model.set_weights(trainers[True].model.get_weights())
    model = trainers[True].model
    sentences = conll.read_conll(os.path.join(args.data_dir, "conll2003", "valid.txt"))
    texts = [" ".join(s.words) for s in sentences[:args.predict_sentences]]
    padded_task = trainers[False].task

    def eager_padded():
        """task.predict's windows and forward pass as before c60f7f1 (without the entity decoding after it)."""
        words = [tuple(m.group() for m in ner_task._WORD.finditer(text)) for text in texts]  # pylint: disable=protected-access
        windows = padded_task.encode([conll.Sentence(w, ("O",) * len(w)) for w in words]).arrays
        windows = {k: v for k, v in windows.items() if k != "tags"}
        for start in range(0, len(windows["input_mask"]), 32):
            model({k: v[start:start + 32] for k, v in windows.items()}, training=False)["tags"].numpy()

    configs = {
        "evaluate cut": lambda: trainers[True].evaluate("validation"),
        "evaluate padded": lambda: trainers[False].evaluate("validation"),
        "predict cut": lambda: trainers[True].task.predict(model, texts),
        "predict padded": lambda: padded_task.predict(model, texts),
        "predict eager padded": eager_padded,
    }
    results = {name: fn() for name, fn in configs.items()}  # warm-up, and the outputs to compare
    scores = [{k: v for k, v in results[f"evaluate {kind}"].items() if k != "loss"} for kind in ("cut", "padded")]
    print(f"scores cut {scores[0]}\n       padded {scores[1]}: {'equal' if scores[0] == scores[1] else 'DIFFER'}")
    same_entities = results["predict cut"] == results["predict padded"]
    print(f"predict: {sum(map(len, results['predict cut']))} entities; cut and padded "
          f"{'give the same entities' if same_entities else 'DIFFER'}", flush=True)

    seconds = {name: [] for name in configs}
    for round_index in range(args.rounds):
        names = list(configs)[::(-1 if round_index % 2 else 1)]
        for name in names:
            start = time.perf_counter()
            configs[name]()
            seconds[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in configs), flush=True)

    print(f"\nload average at end {load()}")
    evaluated = len(trainers[True].task.split_data("validation").sentences)
    print(f"| seconds (median of {args.rounds}) | {evaluated} valid sentences evaluated | "
          f"{len(texts)} sentences predicted |\n| --- | ---: | ---: |")
    for kind in ("cut", "padded"):
        print(f"| {kind} | {statistics.median(seconds[f'evaluate {kind}']):.2f} | "
              f"{statistics.median(seconds[f'predict {kind}']):.2f} |")
    print(f"| eager, padded (predict before c60f7f1) | | {statistics.median(seconds['predict eager padded']):.2f} |")

    def ratio(slow: str, fast: str) -> str:
        per_round = [a / b for a, b in zip(seconds[slow], seconds[fast])]
        return f"{statistics.median(per_round):.2f}x ({', '.join(f'{r:.2f}' for r in per_round)})"
    print(f"evaluate: cut {ratio('evaluate padded', 'evaluate cut')} faster than padded")
    print(f"predict: cut {ratio('predict padded', 'predict cut')} faster than padded, "
          f"{ratio('predict eager padded', 'predict cut')} faster than eager padded")
    if not (scores[0] == scores[1] and same_entities):
        sys.exit("cut and padded runs disagree (see above)")


if __name__ == "__main__":
    main()
