"""Our exported SavedModel served from a process of its own for bench/vs_pytorch.py, as the PyTorch peer is.

Why: a server runs its model alone, and so does the peer's timing (bench/pytorch_peer.py), while in the bench's
own process our SavedModel shared the process with the Trainer, evaluate, predict and the other export
(bench/RESULTS.md, 2026-12-06). The child loads the SavedModel with TensorFlow and tensorflow_text only (no
engine code: what a serving host has), its thread pools as launch.export advises for this host
(engine/host.serving_intra_op_threads), then times `serving_default` on the sentences it was given, on request.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from child_process import ChildProcess, answer_requests

_MARKER = "@savedmodel "


class SavedModelProcess:
    """`batches(size)` times all sentences in batches of `size`; `singles(count)` the first `count`, one call each
    (their latencies in seconds too); both return {"wall", "cpu"} seconds, and with values=True the
    probabilities (computed in the timed calls, sent after them)."""

    def __init__(self, export_dir: str, sentences: list, intra_op_threads: int | None = None):
        """`intra_op_threads`: None serves as launch.export advises for this host (host.serving_host_environment),
        0 with TensorFlow's default intra-op pool, n with n threads."""
        fd, self._sentences_file = tempfile.mkstemp(prefix="savedmodel_sentences_", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(list(sentences), f)
        from engine import host  # noqa: PLC0415  (here, not at the top: the child runs this file without the engine)
        env = host.serving_host_environment()
        if intra_op_threads is not None:
            env.pop("TF_NUM_INTRAOP_THREADS", None)
            if intra_op_threads > 0:
                env["TF_NUM_INTRAOP_THREADS"] = str(intra_op_threads)
        self.intra_op_threads = env.get("TF_NUM_INTRAOP_THREADS", "TensorFlow's default")
        self._child = ChildProcess([sys.executable, os.path.abspath(__file__), export_dir, self._sentences_file],
                                   _MARKER, f"the SavedModel server of {export_dir}", env=env)

    def batches(self, size: int, *, values: bool = False) -> dict:
        return self._child.ask({"batches": size, "values": values})

    def singles(self, count: int) -> dict:
        return self._child.ask({"singles": count})

    def close(self) -> int:
        returncode = self._child.close()
        if os.path.exists(self._sentences_file):
            os.remove(self._sentences_file)
        return returncode


def _serve(export_dir: str, sentences_file: str) -> None:
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_text  # noqa: PLC0415,F401  (registers the tokenizer's ops the SavedModel calls)
    with open(sentences_file, encoding="utf-8") as f:
        sentences = json.load(f)
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]

    def probabilities(batch):
        return serve(sentence=tf.constant(batch))["probabilities"].numpy()

    def handle(request: dict) -> dict:
        start, reply, answers = (time.perf_counter(), time.process_time()), {}, []
        if "batches" in request:
            size = request["batches"]
            answers = [probabilities(sentences[i:i + size]) for i in range(0, len(sentences), size)]
        else:
            reply["latencies"] = []
            for sentence in sentences[:request["singles"]]:
                t = time.perf_counter()
                answers.append(probabilities([sentence]))
                reply["latencies"].append(time.perf_counter() - t)
        reply.update(wall=time.perf_counter() - start[0], cpu=time.process_time() - start[1])
        if request.get("values"):
            reply["probabilities"] = np.concatenate(answers).tolist()
        return reply
    answer_requests(_MARKER, handle)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
