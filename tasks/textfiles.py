"""Reading text files as people really have them, and the error that locates a problem in one.

Files saved by Windows tools often start with a UTF-8 byte-order mark and end lines with CRLF. Read as
plain "utf-8", the mark sticks to the first header name or word ("\\ufeffsentence", "\\ufeff-DOCSTART-")
and "\\r" to the last field; both then fail far from their cause, or not at all. Every reader in tasks/
reads through `read_lines` or `read_text`, which drop a leading mark and the "\\r" of CRLF line ends, and
name the file and line of bytes that are not UTF-8.
"""
from __future__ import annotations

import codecs
import os
from typing import IO, Iterator, Optional


class InputError(ValueError):
    """A problem in an input file, located: `str(error)` is "<file>:<line>: <what>" (or "<file>: <what>").

    A ValueError, so callers that catch bad values keep working; launch/errors.py prints it as one line.
    """

    def __init__(self, path: str, line: Optional[int], what: str):
        self.path, self.line, self.what = path, line, what
        super().__init__(f"{path}:{line}: {what}" if line is not None else f"{path}: {what}")


def _open_binary(path: str, missing: str) -> IO[bytes]:
    hint = f" ({missing})" if missing else ""
    if "://" in path:
        # gs:// (a TPU VM's data), ram://, ...: TensorFlow's file systems. Local files keep Python's faster reader.
        import tensorflow as tf  # noqa: PLC0415
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"{path}: cannot open (no such file){hint}")
        return tf.io.gfile.GFile(path, "rb")
    try:
        return open(path, "rb")
    except OSError as error:
        raise FileNotFoundError(f"{path}: cannot open ({error.strerror}){hint}") from error


def _not_utf8(path: str, line: int, raw: bytes, error: UnicodeDecodeError) -> InputError:
    return InputError(path, line, f"not UTF-8 text (byte 0x{raw[error.start]:02x}); save the file as UTF-8")


def read_lines(path: str, *, missing: str = "") -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its "\\n" or "\\r\\n") for each line of a UTF-8 file, BOM dropped.

    Lines are split at "\\n" only (as the TSV and CoNLL formats mean), so other Unicode line separators
    inside a text stay in it. A file that cannot be opened is a FileNotFoundError naming it and `missing`
    (a hint such as the flag that sets the path)."""
    with _open_binary(path, missing) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, number, raw, error) from None
            yield number, text.rstrip("\r\n")


def read_text(path: str, *, missing: str = "") -> str:
    """The whole UTF-8 file as one string, BOM dropped (line ends kept: JSON does not care)."""
    with _open_binary(path, missing) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, raw.count(b"\n", 0, error.start) + 1, raw, error) from None


def default_data_dir() -> str:
    """$DATA_DIR, else ../shared/data beside the repository (where the project's data lives)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tasks/ is at the top of the repository
    return os.environ.get("DATA_DIR") or os.path.join(os.path.dirname(repo), "shared", "data")
