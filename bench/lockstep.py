"""The engine's training against PyTorch + Hugging Face, update for update, on the same weights and batches.

  python bench/lockstep.py --data_dir=../shared/data                          # 100 updates in float32
  python bench/lockstep.py --data_dir=../shared/data --precision=mixed_bfloat16   # bf16 (the peer: autocast)
  python bench/lockstep.py --data_dir=../shared/data --noepsilon_after_bias_correction   # tf_keras' epsilon

Why: time to accuracy (bench/time_to_accuracy.py) compares runs whose dropout masks, batch order and head draws
differ, so a systematic difference in the training math hides inside a point of seed-to-seed spread. Here that
randomness is taken out: dropout is off on both sides, and the peer trains on our batches from our initial head.
Both print the loss and gradient norm of every update; in float32 they should agree to float rounding.

Engine: `make demo`'s model and recipe (configs/sst2_demo.flags: the bundled all-MiniLM-L6-v2, mean pooling,
seq 64, batch 32, --skip_padding_in_training, AdamW lr 1e-4, weight decay 0.01, clip 1.0, linear warm-up then
linear decay over --updates), through the Trainer with its fused layers and C++ kernels; batches from the
classification Task's own input pipeline (SST-2 train sentences tokenized, shuffled and grouped by length),
drawn once and fed to both sides. --epsilon_after_bias_correction (on by default here) makes the engine's AdamW
PyTorch's; off, tf_keras' (epsilon before the bias correction) shows how far that alone moves the losses.
Peer: bench/pytorch_sst2_demo.py's model and optimizer (HF BertModel, masked mean pooling, Linear head from our
initial weights; torch's fused AdamW, the same decay split and schedule; clip_grad_norm_), bf16 by autocast.
The peer runs in this process once the engine has finished (nothing is timed here, so unlike bench/vs_pytorch.py
it needs no process of its own). Needs the bench extra (torch, transformers); without it the bench says so and
exits 1. --max_loss_difference turns it into a check (exit 1 beyond it; tests/test_bench_smoke.py runs 4 updates).
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402,F401  (Keras 2 environment before TensorFlow loads)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.environ.get("DATA_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data"),
    "Folder with sst2/train.tsv (default $DATA_DIR or ../shared/data).")
flags.DEFINE_integer("updates", 100, "Optimizer updates on each side (the learning rate decays to 0 over them).")
flags.DEFINE_integer("warmup_steps", 10, "Linear warm-up updates.")
flags.DEFINE_integer("batch_size", 32, "Examples per update.")
flags.DEFINE_integer("max_seq_length", 64, "Sequence length (batches are cut to their longest sentence).")
flags.DEFINE_float("learning_rate", 1e-4, "Peak learning rate.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "Engine policy; the peer's autocast.")
flags.DEFINE_bool("epsilon_after_bias_correction", True, "The engine's AdamW as PyTorch's (see the docstring).")
flags.DEFINE_bool("skip_padding_in_training", True, "The engine's blocks on the real tokens only (as the demo).")
flags.DEFINE_integer("seed", 0, "The engine's shuffle and head seed (the peer has no randomness left).")
flags.DEFINE_integer("print_every", 10, "Print every this many updates (and the first 5).")
flags.DEFINE_float("max_loss_difference", None, "Exit 1 if any update's losses differ by more than this.")


def engine_run(folder: str) -> dict:
    """Trains the engine; returns its batches, initial head, and per-update losses and gradient norms."""
    from engine.config import OptimizerConfig, RuntimeConfig, TrainerConfig  # noqa: PLC0415
    from engine.strategy import make_strategy  # noqa: PLC0415
    runtime = RuntimeConfig(precision=FLAGS.precision, skip_padding_in_training=FLAGS.skip_padding_in_training,
                            seed=FLAGS.seed)
    strategy = make_strategy(runtime)  # before any other TensorFlow op
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import tf_keras  # noqa: PLC0415
    from engine.trainer import Trainer  # noqa: PLC0415
    from tasks.classification.task import ClassificationConfig, ClassificationTask  # noqa: PLC0415

    class LockstepTask(ClassificationTask):
        """The demo's classifier with every dropout off, trained on batches drawn once from its own pipeline."""
        head = batches = None

        def build_model(self):
            model = super().build_model()
            for layer in model.submodules:  # before the Trainer rebinds them: rate 0 layers stay identities
                if isinstance(layer, tf_keras.layers.Dropout):
                    layer.rate = 0.0
            self.head = [w.numpy() for w in model.get_layer("logits").weights]
            return model

        def build_inputs(self, split, *, batch_size, input_context=None):
            dataset = super().build_inputs(split, batch_size=batch_size, input_context=input_context)
            if split != "train":
                return dataset
            self.batches = [tf.nest.map_structure(lambda t: t.numpy(), b) for b in dataset.take(FLAGS.updates)]
            # Padded into one array (the iterator must be checkpointable: no generator), cut back per batch.
            widths = np.array([f["input_word_ids"].shape[1] for f, _ in self.batches], np.int32)
            width = int(widths.max())
            stacked = {k: np.stack([np.pad(f[k], [(0, 0), (0, width - f[k].shape[1])]) for f, _ in self.batches])
                       for k in self.batches[0][0]}
            labels = np.stack([y for _, y in self.batches])
            fixed = tf.data.Dataset.from_tensor_slices((stacked, labels, widths))
            return fixed.map(lambda f, y, w: ({k: v[:, :w] for k, v in f.items()}, y)).repeat()

    task = LockstepTask(ClassificationConfig(
        data_files={"train": os.path.join(FLAGS.data_dir, "sst2", "train.tsv")}, encoder="minilm",
        max_seq_length=FLAGS.max_seq_length, pooling="mean", seed=FLAGS.seed))
    optimizer_config = OptimizerConfig(learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                                       epsilon_after_bias_correction=FLAGS.epsilon_after_bias_correction)
    trainer = Trainer(task, TrainerConfig(model_dir=folder, train_steps=FLAGS.updates, steps_per_loop=1,
                                          global_batch_size=FLAGS.batch_size, eval_split=""),
                      optimizer_config, runtime, strategy=strategy)
    trainer.train()
    history = trainer.train_history
    return {"batches": task.batches, "head": task.head, "loss": [h["loss"] for h in history],
            "grad_norm": [h["grad_norm"] for h in history], "weight_decay": optimizer_config.weight_decay,
            "clip_norm": optimizer_config.clip_norm}


def peer_run(batches, head, *, weight_decay: float, clip_norm: float) -> dict:
    """PyTorch + HF on the same batches from the same head, with the engine's weight decay and clip norm;
    per-update losses and gradient norms."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import logging as hf_logging  # noqa: PLC0415
    import pytorch_sst2_demo as peer  # noqa: PLC0415
    torch.set_num_threads(os.cpu_count())
    hf_logging.set_verbosity_error()  # "pooler weights not used": the mean-pooled model has no pooler
    autocast = torch.bfloat16 if FLAGS.precision == "mixed_bfloat16" else None
    model = peer.mean_pooled_classifier(peer.minilm_dir(), autocast, dropout=False, head=head)
    optimizer, schedule = peer.make_optimizer(model, learning_rate=FLAGS.learning_rate, weight_decay=weight_decay,
                                              warmup_steps=FLAGS.warmup_steps, train_steps=FLAGS.updates)
    model.train()
    losses, norms = [], []
    for features, labels in batches:
        ids, mask, types = (torch.from_numpy(features[k].astype(np.int64))
                            for k in ("input_word_ids", "input_mask", "input_type_ids"))
        loss, norm = peer.train_step(model, optimizer, schedule, ids, mask, torch.from_numpy(labels.astype(np.int64)),
                                     clip_norm=clip_norm, token_type_ids=types)
        losses.append(float(loss))
        norms.append(float(norm))
    return {"loss": losses, "grad_norm": norms}


def main(argv):
    del argv
    import pytorch_peer  # noqa: PLC0415  (imports neither torch nor TensorFlow)
    ok, why = pytorch_peer.available()
    if not ok:
        print(f"lockstep: the PyTorch peer is unavailable ({why}); install the bench extra: "
              "pip install -e '.[bench]'", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="lockstep_") as folder:
        ours = engine_run(folder)
    peer = peer_run(ours["batches"], ours["head"], weight_decay=ours["weight_decay"], clip_norm=ours["clip_norm"])
    print(f"\nlockstep | {FLAGS.updates} updates, batch {FLAGS.batch_size}, seq {FLAGS.max_seq_length}, "
          f"{FLAGS.precision}, dropout off | engine AdamW epsilon "
          f"{'after' if FLAGS.epsilon_after_bias_correction else 'before'} the bias correction")
    print("| update | loss engine | loss peer | difference | grad norm engine | grad norm peer |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = (0.0, 0)
    for update, (a, b, na, nb) in enumerate(zip(ours["loss"], peer["loss"], ours["grad_norm"], peer["grad_norm"]), 1):
        worst = max(worst, (abs(a - b), update))
        if update <= 5 or update % FLAGS.print_every == 0:
            print(f"| {update} | {a:.6f} | {b:.6f} | {a - b:+.2e} | {na:.5f} | {nb:.5f} |")
    print(f"largest loss difference: {worst[0]:.3g} at update {worst[1]}", flush=True)
    if FLAGS.max_loss_difference is not None and worst[0] > FLAGS.max_loss_difference:
        print(f"lockstep: the losses differ by {worst[0]:.3g} > --max_loss_difference={FLAGS.max_loss_difference}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
