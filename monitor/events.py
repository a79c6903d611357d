"""Supervisor events: every start, exit, restart, backoff, kill and failure, as JSON lines.

``<run dir>/events.jsonl`` holds one object a line: ``{"time", "event", "stage", "replica",
"pid", "reason", ...}``; ``streampipe events [-f]`` prints it and the log extractor reads it. It rotates at
``logging.file_max_mb`` (``retention`` rotated files kept); :func:`read_events` and
``streampipe events`` read the rotated files too.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any

from loguru import logger

from streampipe._rotating import RotatingFile, read_json_lines

DEFAULT_MAX_BYTES = 10 * 2**20


class EventLog:
    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, retention: int = 5, keep: int = 200) -> None:
        self.path = path
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._file = RotatingFile(path, max_bytes, retention)

    def emit(self, event: str, stage: str = "", replica: int | None = None, pid: int | None = None,
             reason: str = "", **extra: Any) -> dict[str, Any]:
        entry = {"time": time.time(), "event": event, "stage": stage, "replica": replica, "pid": pid,
                 "reason": reason, **extra}
        self._file.write(json.dumps(entry, default=repr) + "\n")
        self.recent.append(entry)
        who = f"{stage}.{replica}" if stage and replica is not None else (stage or "supervisor")
        level = "WARNING" if event in ("hung", "limit", "kill", "backoff", "watch") else "ERROR" if event == "failed" else "INFO"
        if event == "exit" and reason and not reason.startswith("stopped"):
            level = "WARNING"
        logger.log(level, f"{event:<9} {who:<18} pid={pid if pid is not None else '-'} {reason}")
        return entry

    def close(self) -> None:
        self._file.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    """All events of a run directory (``path`` and its rotated files), oldest first; unreadable
    lines are skipped."""
    return read_json_lines(path)
