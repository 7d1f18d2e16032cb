"""One side of a benchmark in a process of its own, answering requests one JSON line each way.

bench/vs_pytorch.py times the PyTorch peer (bench/pytorch_peer.py) and our exported SavedModel
(bench/savedmodel_process.py) this way: each process does nothing but its own work, as a deployment would run
it, and times that work itself (wall, and CPU as its own process time), so the pipe costs nothing measured.
Requests come one at a time between the parent's other timings, so the rounds stay interleaved.
"""
from __future__ import annotations

import json
import subprocess
import sys


class ChildProcess:
    """`argv` started with pipes; it must print `marker` + a JSON object once ready and once per request."""

    def __init__(self, argv: list, marker: str, what: str, env: dict | None = None):
        self._marker, self._what = marker, what
        self._child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._reply()  # "ready": loaded

    def ask(self, request: dict) -> dict:
        self._child.stdin.write(json.dumps(request) + "\n")
        self._child.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        for line in self._child.stdout:
            if line.startswith(self._marker):
                return json.loads(line[len(self._marker):])
            print(line, end="", flush=True)  # a library's own output: passed on, not lost
        raise RuntimeError(f"{self._what}'s process ended (exit code {self._child.wait()}); its error is above")

    def close(self) -> int:
        """Ends the child (end of requests) and returns its exit code; closing twice is harmless."""
        if self._child.poll() is None:
            self._child.stdin.close()
            self._child.wait(timeout=60)
        return self._child.returncode


def answer_requests(marker: str, handle) -> None:
    """The child's side: says it is ready, then prints `marker` + json(handle(request)) for each stdin line."""
    print(marker + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(marker + json.dumps(handle(json.loads(line))), flush=True)
