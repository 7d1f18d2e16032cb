"""Subprocess for the resume test: trains the toy task to --train_steps in --model_dir, saves losses+weights."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (environment and two logical CPUs)
import numpy as np  # noqa: E402
from engine_helpers import ToyTask, run_training  # noqa: E402

model_dir, train_steps, strategy, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
trainer = run_training(lambda: ToyTask(shuffle=True), global_batch_size=16, strategy=strategy, train_steps=train_steps,
                       model_dir=model_dir, steps_per_loop=1, checkpoint_every_steps=1)
np.savez(out, losses=np.array([h["loss"] for h in trainer.train_history]),
         *[np.array(w) for w in trainer.model.get_weights()])
