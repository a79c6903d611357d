"""Size-rotated append-only files: dead letters, events, status history, a process's own stderr.

Rotated files are named as loguru names the stage logs (``events.2025-01-31_12-00-00_123456.jsonl``,
``normalizer.0.<stamp>.stderr``), so :mod:`streampipe._logtail` (``streampipe logs``,
``streampipe events -f``, the log extractor) follows them through rotation as it follows the logs,
and :func:`files_of` lists a stream's files oldest first for readers of whole files.

- :class:`RotatingFile`: lines appended with one ``write(2)`` each on an ``O_APPEND`` descriptor,
  so lines of several processes (the replicas of a stage share its dead-letter file) never
  interleave. At ``max_bytes`` the file is renamed under an ``flock`` on a lock file beside it:
  of several writers exactly one rotates, and each other one sees that the name no longer leads
  to its inode and reopens before its next line. Beyond ``keep`` rotated files the oldest are
  deleted, and ``on_drop`` learns how many lines went with them.
- :func:`rotate_stdio`: stdout and stderr of a process redirected to a file (a stage's
  ``.stderr``, the detached supervisor's ``supervisor.out``) are inherited descriptors that no
  other process can swap, so the process rotates them itself: rename the file, open a new one,
  ``dup2`` it onto fds 1 and 2. Nothing is lost: every write lands wholly in the old inode or in
  the new one. :func:`watch_stdio` does that from a daemon thread, 5 times a second (so a file
  outgrows its limit by at most what the process writes in 0.2 s).

And for the JSON-lines files stages append to (metrics and the like): :func:`last_row` reads the
last row from the file's end only, :func:`end_torn_line` ends a line a SIGKILL left torn.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import glob
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

STDIO_CHECK_S = 0.2   # how often watch_stdio looks at the size of stderr: two stat calls, 5 times a second

# loguru's rotated name: "<root>.<%Y-%m-%d_%H-%M-%S_%f>[.<n>]<ext>" (loguru/_file_sink.py)
ROTATED = re.compile(r"\.\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d{6}(?:\.\d+)?(?=\.[^.]+$)")


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of ``path``, oldest first (their stamps sort by time)."""
    root, ext = os.path.splitext(path.name)
    found = [p for p in path.parent.glob(f"{glob.escape(root)}.*{ext}")
             if ROTATED.search(p.name) and ROTATED.sub("", p.name, count=1) == path.name]
    return sorted(found, key=lambda p: _stamp_key(p.name))


def files_of(path: Path) -> list[Path]:
    """Every file of the stream ``path`` that exists: the rotated ones oldest first, then ``path``."""
    return rotated_files(path) + ([path] if path.exists() else [])


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path`` and its rotated files, oldest first; torn or bad lines skipped."""
    rows = []
    for name in files_of(path):
        try:
            with open(name, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict):
                        rows.append(row)
        except FileNotFoundError:   # deleted by retention meanwhile
            pass
    return rows


JSON_TAIL_BYTES = 64 * 1024   # the end of a metrics file read for its last rows


def tail_rows(path: Path, max_bytes: int = JSON_TAIL_BYTES) -> list[dict[str, Any]]:
    """The complete JSON-object rows in the last ``max_bytes`` of ``path``, oldest first ([] if
    there is no file): the first line of a cut read is left out, torn or bad lines skipped."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - max_bytes))
            lines = f.read().splitlines()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return []
    if size > max_bytes:
        lines = lines[1:]              # cut mid-line
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue                   # blank, or the line being written now
        if isinstance(row, dict):
            rows.append(row)
    return rows


def last_row(path: Path, match: Callable[[dict[str, Any]], bool] = lambda row: True) -> dict[str, Any] | None:
    """The last JSON object row of ``path`` that ``match`` accepts, read from the file's end only
    (None if there is none, or no file). Reads only: a writer going on after a restart first
    calls :func:`end_torn_line`."""
    return next((row for row in reversed(tail_rows(path)) if match(row)), None)


def end_torn_line(path: Path) -> None:
    """End a last line torn by a SIGKILL, so that the next row appended starts a line of its own."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, 2)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    except FileNotFoundError:
        pass


def _stamp_key(name: str) -> tuple[str, int]:
    m = ROTATED.search(name)
    stamp = m.group(0) if m else ""
    base, _, n = stamp[1:].partition(".")
    return base, int(n or 0)


def free_rotated_name(path: Path) -> Path:
    """``<root>.<now stamp>[.<n>]<ext>``, a name no file has yet."""
    root, ext = os.path.splitext(path.name)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    candidate, n = path.with_name(f"{root}.{stamp}{ext}"), 1
    while candidate.exists():
        candidate, n = path.with_name(f"{root}.{stamp}.{n}{ext}"), n + 1
    return candidate


def prune(path: Path, keep: int) -> int:
    """Delete the oldest rotated files of ``path`` beyond ``keep``; the number of lines deleted."""
    lines = 0
    old = rotated_files(path)
    for victim in old[:max(0, len(old) - keep)]:
        try:
            with open(victim, "rb") as f:
                lines += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            victim.unlink()
        except FileNotFoundError:
            pass
    return lines


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class RotatingFile:
    """An append-only file of lines, rotated at ``max_bytes``, ``keep`` rotated files kept.

    Each line is written under a shared ``flock`` of ``.<name>.lock`` beside the file, and a
    rotation (rename, then deletion of the oldest rotated files) takes it exclusively: no writer
    can check its file and then write into one that was rotated and deleted meanwhile, so the
    lines ``on_drop`` counts are exactly the lines lost to retention.
    """

    def __init__(self, path: Path, max_bytes: int, keep: int, on_drop: Callable[[int], None] | None = None) -> None:
        self.path, self.max_bytes, self.keep, self.on_drop = Path(path), max_bytes, keep, on_drop
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._lock: int | None = None

    def write(self, line: str) -> None:
        """Append ``line`` (which ends in a newline) in one ``write(2)``."""
        data = line.encode()
        if self._lock is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            fcntl.flock(self._lock, fcntl.LOCK_SH)
            try:
                if self._current_size() < self.max_bytes:
                    assert self._fd is not None
                    os.write(self._fd, data)
                    return
            finally:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._rotate()

    def _current_size(self) -> int:
        """The size of the file the name leads to, reopened first if another writer rotated it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._fd is None or st is None or _key(st) != self._inode:
            self._open()
            st = os.fstat(self._fd)  # type: ignore[arg-type]
        return st.st_size

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._inode = _key(os.fstat(self._fd))

    def _rotate(self) -> None:
        assert self._lock is not None
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            if self._current_size() >= self.max_bytes:    # nobody rotated it while we waited
                os.rename(self.path, free_rotated_name(self.path))
                dropped = prune(self.path, self.keep)
                if dropped and self.on_drop is not None:
                    self.on_drop(dropped)
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._lock):
            if fd is not None:
                os.close(fd)
        self._fd = self._inode = self._lock = None


def rotate_stdio(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate this process's stdout/stderr if they write to ``path`` and it reached ``max_bytes``."""
    try:
        err, named = os.fstat(2), os.stat(path)
    except OSError:
        return False
    if _key(err) != _key(named) or err.st_size < max_bytes:
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os.rename(path, free_rotated_name(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if _key(os.fstat(1)) == _key(err):
            os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    prune(path, keep)
    return True


def watch_stdio(path: Path, max_bytes: int, keep: int) -> threading.Thread:
    """A daemon thread that calls :func:`rotate_stdio` every ``STDIO_CHECK_S``."""
    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(STDIO_CHECK_S):
            try:
                rotate_stdio(path, max_bytes, keep)
            except OSError:
                pass   # a full or vanished folder: the stage runs on, its stderr unrotated

    thread = threading.Thread(target=watch, name="stdio-rotate", daemon=True)
    thread.start()
    return thread
