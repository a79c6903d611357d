"""Files a stage writes that must survive a SIGKILL at any instant.

- :func:`atomic_write`: temp file in the same folder, fsync, rename, fsync the folder. A reader
  sees the old file or the new one, never half of one.
- :func:`save_state` / :func:`load_state`: a stage's snapshot as msgpack, written atomically; a
  file that does not decode is ignored with a warning (it cannot be half-written, but it can be
  from another version or hand-edited).
- :class:`DeadLetters`: ``<run dir>/deadletter/<stage>.jsonl``, one JSON object a line with the
  record, the error and the time, flushed at once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any

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
        from loguru import logger

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
    """Append-only dead-letter file of one stage; opened on first use."""

    def __init__(self, path: Path, ident: str) -> None:
        self.path, self.ident = path, ident
        self._file: IO[str] | None = None

    def write(self, record: Any, error: str, tb: str = "") -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        entry = {"time": time.time(), "stage": self.ident, "error": error, "record": record}
        if tb:
            entry["traceback"] = tb
        self._file.write(json.dumps(entry, default=json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
