"""One line, not a traceback, for errors in what the user gave: `errors.run(main)` in place of `app.run(main)`.

A bad input file, flag value or checkpoint is the user's to fix, and the message says what and where;
a 15-frame traceback in front of it only hides it. So these print `<program>: error: <message>` on
stderr and exit with status 1:

  * ValueError: bad values, in flags and config dataclasses, and tasks.textfiles.InputError, whose
    message is `<file>:<line>: <what>`;
  * OSError (FileNotFoundError, PermissionError, ...): missing or unreadable files;
  * engine.checkpoints.CheckpointError: a corrupt or incompatible checkpoint in --model_dir.

absl's UsageError keeps its own behaviour (the message and the short usage, status 1), and every other
exception is a bug and keeps its traceback. `--verbose_errors` (or VERBOSE_ERRORS=1 in the environment,
for programs that do not use this module's flag) shows the traceback of user errors too.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

from absl import app, flags


def _user_error_types() -> tuple[type, ...]:
    types = [ValueError, OSError]
    # Only if the engine is loaded: an error of its class cannot exist otherwise, and importing it needs TensorFlow.
    checkpoints = sys.modules.get("engine.checkpoints")
    if checkpoints is not None:
        types.append(checkpoints.CheckpointError)
    trainer = sys.modules.get("engine.trainer")
    if trainer is not None:  # a lost worker: the message names it and the checkpoint to restart from
        types.append(trainer.LostWorkerError)
    return tuple(types)


def program_name() -> str:
    """"launch.predict" for `python -m launch.predict`, else the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def one_line(error: BaseException) -> str:
    """The message on one line: an OSError without its "[Errno 2]", a message of several lines joined by "; "."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error)
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or type(error).__name__


def run(main: Callable[[list[str]], object], flag_values: flags.FlagValues = flags.FLAGS) -> NoReturn:
    """absl's app.run(main), with user errors (see the module docstring) as one line and exit status 1."""
    if "verbose_errors" not in flag_values:
        flags.DEFINE_bool("verbose_errors", False, "Show the Python traceback of input, flag and checkpoint errors "
                          "too (they are one line by default).", flag_values=flag_values)

    def guarded(argv):
        try:
            return main(argv)
        except _user_error_types() as error:
            if flag_values.verbose_errors or os.environ.get("VERBOSE_ERRORS", "") not in ("", "0"):
                raise
            print(f"{program_name()}: error: {one_line(error)}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(guarded)
