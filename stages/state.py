"""Files a stage writes that must survive a SIGKILL at any instant.

- :func:`atomic_write`: temp file in the same folder, fsync, rename, fsync the folder. A reader
  sees the old file or the new one, never half of one.
- :func:`save_state` / :func:`load_state`: a stage's snapshot as msgpack, written atomically; a
  file that does not decode is ignored with a warning (it cannot be half-written, but it can be
  from another version or hand-edited).
- :class:`DeadLetters`: ``<run dir>/deadletter/<stage>.jsonl``, one JSON object a line with the
  record, the error and the time, written at once. The replicas of a stage share the file; it
  rotates at ``logging.file_max_mb`` and keeps ``logging.retention`` rotated files (see
  :mod:`streampipe._rotating`); the lines in a rotated file deleted by retention are counted as
  ``dead_letters_dropped`` in ``status``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from loguru import logger

from streampipe._rotating import RotatingFile
from streampipe.stages import wire


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, wire.packb(state))


def load_state(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = wire.unpackb(data)
    except ValueError:
        logger.warning(f"ignoring unreadable state file {path}")
        return None
    return state if isinstance(state, dict) else None


def json_default(obj: Any) -> Any:
    """JSON for what msgpack carries but json does not (bytes, numpy scalars)."""
    if isinstance(obj, bytes):
        return obj.hex()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


class DeadLetters:
    """The dead-letter file of one stage (shared by its replicas); opened on first use."""

    def __init__(self, path: Path, ident: str, max_bytes: int = 10 * 2**20, keep: int = 5) -> None:
        self.path, self.ident = path, ident
        self.dropped = 0      # dead letters deleted with a rotated file beyond retention
        self._file = RotatingFile(path, max_bytes, keep, on_drop=self._dropped)

    def write(self, record: Any, error: str, tb: str = "") -> None:
        entry = {"time": time.time(), "stage": self.ident, "error": error, "record": record}
        if tb:
            entry["traceback"] = tb
        self._file.write(json.dumps(entry, default=json_default) + "\n")

    def _dropped(self, lines: int) -> None:
        self.dropped += lines
        logger.warning(f"{lines} dead letters deleted with the oldest rotated file of {self.path.name} "
                       f"(logging.retention); {self.dropped} so far")

    def close(self) -> None:
        self._file.close()
