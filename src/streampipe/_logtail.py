"""Follow log files through rotation and truncation, and parse streampipe's log lines.

One implementation shared by the log extractor stage (:mod:`streampipe.stages.builtins.log_extractor`) and
the CLI (``streampipe logs -f``, :mod:`streampipe.launcher.logs`; ``streampipe events -f``). It serves
both sides, so it lives at the package root beside :mod:`streampipe._rotating`, which writes the
rotated files it reads: ``stages`` never imports ``launcher``, and the CLI's reader is no stage code.

How a :class:`LogTail` follows files (the choices of ``tail -F`` and Fluent Bit's tail input):

- It watches glob patterns (``<run dir>/logs/*.jsonl`` ...) and tracks every file by
  **inode** ``(st_dev, st_ino)``, never by name. When loguru rotates ``gen.0.jsonl`` it closes
  the file, renames it ``gen.0.2025-01-31_12-00-00_123456.jsonl`` and creates a new
  ``gen.0.jsonl``: the tail sees its inode under the new name, keeps reading the open file
  descriptor to its end, and only then reads the new file (a *stream*'s files are read oldest
  first), so no line is lost or reordered across a rotation, even when several rotations
  happen between two polls.
- A file deleted (loguru ``retention``) while open is still read to its end through the
  descriptor; a file created and deleted between two polls is lost (nothing can read it).
- **Truncation** (size below the read offset) restarts the file from offset 0. A file
  truncated and rewritten past the old offset between two polls cannot be told apart from an
  append; copy-truncate rotation is not what loguru does, so that case is left alone.
- Only complete lines (ending in ``\\n``) are returned; a partial last line waits for its end,
  unless its file has been rotated away or deleted (it will never grow: it is returned as is).
- Rotated files that are read to the end and untouched for ``idle_close_s`` are closed (the
  number of open descriptors stays bounded); their inode and offset are remembered, so they are
  neither read twice nor missed if they grow.

Parsing (:func:`parse_line`): loguru ``serialize=True`` lines become :class:`LogEntry`; lines of
``*.stderr`` files (raw stdout/stderr of a process) become entries of level ``STDERR`` whose
time is the file's modification time when read ("mtime-ish": exact while following).

>>> ident_of("normalizer.1.2025-01-31_12-00-00_123456.jsonl")
('normalizer', 1, 'jsonl')
>>> ident_of("supervisor.jsonl")
('supervisor', None, 'jsonl')
>>> stream_of("gen.0.2025-01-31_12-00-00_123456.2.jsonl")
'gen.0.jsonl'
"""

from __future__ import annotations

import datetime as dt
import glob
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streampipe._rotating import ROTATED as _ROTATED  # loguru's rotated names, ours too

READ_CHUNK = 1 << 16          # bytes per read(): 64 KiB is ~500 log lines, few syscalls
STABLE_LISTING_TRIES = 5      # listings in a row while files rotate under us; then take the last
MISSING_SCANS = 3             # scans a file may be unlisted (a rename racing glob) before it counts as gone
IDLE_CLOSE_S = 5.0            # a rotated file untouched this long is closed (loguru never reopens it)

_IDENT = re.compile(r"^(?P<stage>[^.]+)(?:\.(?P<replica>\d+))?\.(?P<ext>[^.]+)$")

#: loguru's level numbers; ``STDERR`` (raw output of a process) ranks as an error.
LEVELS: dict[str, int] = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30,
                          "STDERR": 40, "ERROR": 40, "CRITICAL": 50}


def stream_of(name: str | Path) -> str:
    """The live name of a (possibly rotated) log file: the rotation timestamp removed."""
    return _ROTATED.sub("", Path(name).name, count=1)


def rotation_stamp(name: str | Path) -> str:
    """The rotation timestamp in a rotated file's name ("" for a live file)."""
    m = _ROTATED.search(Path(name).name)
    return m.group(0) if m else ""


def ident_of(name: str | Path) -> tuple[str, int | None, str]:
    """``(stage, replica, extension)`` from a log file's name (live or rotated)."""
    m = _IDENT.match(stream_of(name))
    if m is None:
        return Path(name).stem, None, Path(name).suffix.lstrip(".")
    replica = m.group("replica")
    return m.group("stage"), int(replica) if replica is not None else None, m.group("ext")


# -- following -----------------------------------------------------------------------------

@dataclass
class Line:
    """One complete line read from a file."""

    text: str
    path: Path         # the file's name when it was read (a rotated name, after rotation)
    stream: str        # the live file's name: "normalizer.1.jsonl"
    mtime: float       # the file's modification time when read


_births = itertools.count()


class _Reader:
    """One open file (one inode), read from ``offset``."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)           # the file opened, which a rename may have swapped since stat()
        self.key = (st.st_dev, st.st_ino)
        self.offset = offset if 0 <= offset <= st.st_size else 0
        self.partial = b""
        self.gone = False          # deleted, or not listed under any watched name for a while
        self.missing = 0           # scans in a row that did not list it
        self.birth = next(_births)
        self.mtime = st.st_mtime
        self.truncations = 0

    @property
    def stream(self) -> str:
        return stream_of(self.path)

    @property
    def live(self) -> bool:
        return not self.gone and not rotation_stamp(self.path)

    def lines(self) -> Iterator[Line]:
        """Complete lines from the offset to the current end of the file (lazily)."""
        st = os.fstat(self.fd)
        self.mtime = st.st_mtime
        if st.st_size < self.offset:           # truncated: start over
            self.offset, self.partial = 0, b""
            self.truncations += 1
        stream, path = self.stream, self.path
        while True:
            chunk = os.pread(self.fd, READ_CHUNK, self.offset)
            if not chunk:
                break
            self.offset += len(chunk)
            data = self.partial + chunk
            *complete, self.partial = data.split(b"\n")
            for raw in complete:
                yield Line(raw.decode("utf-8", "replace"), path, stream, self.mtime)
        if self.partial and (self.gone or not self.live):
            raw, self.partial = self.partial, b""  # a rotated or deleted file never grows again
            yield Line(raw.decode("utf-8", "replace"), path, stream, self.mtime)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LogTail:
    """Follow every file matching ``patterns`` (glob strings or paths) through rotation.

    ``poll()`` returns the lines added since the last call, each stream's files oldest first.
    ``sources()`` gives one lazy line iterator per file instead (to merge them by time).
    ``positions()`` / ``LogTail(..., positions=...)`` save and resume the read offsets (by inode).
    ``from_end=True`` skips what the files hold at the first scan (``tail -n0 -F``).
    ``exclude(path) -> bool`` names files never to follow.
    """

    def __init__(self, patterns: Iterable[str | Path], *, from_end: bool = False,
                 positions: dict[str, int] | None = None, exclude: Callable[[Path], bool] | None = None,
                 idle_close_s: float = IDLE_CLOSE_S) -> None:
        self.patterns = [str(p) for p in patterns]
        self.from_end = from_end
        self.resume = dict(positions or {})
        self.exclude = exclude
        self.idle_close_s = idle_close_s
        self.readers: dict[tuple[int, int], _Reader] = {}
        self.closed: dict[tuple[int, int], int] = {}     # rotated files read to the end: offset
        self.closed_missing: dict[tuple[int, int], int] = {}
        self.scans = 0

    # -- discovery --------------------------------------------------------------------------
    def scan(self) -> None:
        """List the watched files; open new inodes, follow renames, mark vanished files gone."""
        seen: set[tuple[int, int]] = set()
        listing, stable = self._listing()
        for name, st in listing:
            path = Path(name)
            key = (st.st_dev, st.st_ino)
            seen.add(key)
            reader = self.readers.get(key)
            if reader is not None:
                reader.path, reader.missing = path, 0    # renamed (rotated) or unchanged
                continue
            if not stable and not rotation_stamp(path):
                continue       # files rotate as we look: its predecessor may be unlisted; next scan
            offset = 0
            if key in self.closed:
                offset = self.closed[key]
                if st.st_size == offset:
                    continue                             # read already, unchanged
                if st.st_size < offset:
                    offset = 0                           # a new file on a reused inode
                del self.closed[key]
                self.closed_missing.pop(key, None)
            elif f"{key[0]}:{key[1]}" in self.resume:
                offset = self.resume.pop(f"{key[0]}:{key[1]}")
            elif self.from_end and self.scans == 0:
                offset = st.st_size
            try:
                reader = _Reader(path, offset)
            except FileNotFoundError:
                continue
            if reader.key != key:                        # rotated between stat() and open()
                reader.close()
                continue                                 # the next scan sees both files as they are
            self.readers[key] = reader
        for key, reader in self.readers.items():
            if key in seen:
                continue
            # A rename can fall between glob() and stat(): a file missing from one listing may
            # still be there. Only a deleted file (no links) or one unlisted for a while is gone.
            reader.missing += 1
            try:
                deleted = os.fstat(reader.fd).st_nlink == 0
            except OSError:
                deleted = True
            if deleted or reader.missing >= MISSING_SCANS:
                reader.gone = True
        for key in [k for k in self.closed if k not in seen]:
            self.closed_missing[key] = self.closed_missing.get(key, 0) + 1
            if self.closed_missing[key] >= MISSING_SCANS:
                del self.closed[key], self.closed_missing[key]
        for key in seen:
            self.closed_missing.pop(key, None)
        self.scans += 1

    def _list_names(self) -> list[str]:
        names = {p for pattern in self.patterns for p in glob.glob(pattern)}
        if self.exclude is not None:
            names = {p for p in names if not self.exclude(Path(p))}
        return sorted(names, key=lambda p: (stream_of(p), not rotation_stamp(p), rotation_stamp(p)))

    def _listing(self) -> tuple[list[tuple[str, os.stat_result]], bool]:
        """Names and stats taken while no file was renamed, created or deleted.

        A rotation between ``glob()`` and ``stat()`` would show the live name with the new
        file's inode while the old file (renamed) is in no listing yet: read then, the new file
        would come before the end of the old one. So list, stat, list again until both lists agree
        (``stable``); in a storm of rotations, new live files wait for a calmer scan.
        """
        names = self._list_names()
        for _ in range(STABLE_LISTING_TRIES):
            stats = []
            for name in names:
                try:
                    stats.append((name, os.stat(name)))
                except FileNotFoundError:
                    pass
            again = self._list_names()
            if again == names:
                return stats, True
            names = again
        return stats, False

    def ordered(self) -> list[_Reader]:
        """Readers grouped by stream, each stream's files oldest first (rotated before live)."""
        return sorted(self.readers.values(), key=lambda r: (r.stream, r.live, rotation_stamp(r.path), r.birth))

    # -- reading ----------------------------------------------------------------------------
    def sources(self) -> list[Iterator[Line]]:
        """Scan, then one lazy iterator of new lines per file (for a k-way merge by time)."""
        self.scan()
        return [self._drain(r) for r in self.ordered()]

    def read(self) -> Iterator[Line]:
        """Scan, then every new line, stream by stream, oldest file first."""
        for source in self.sources():
            yield from source

    def poll(self) -> list[Line]:
        return list(self.read())

    def _drain(self, reader: _Reader) -> Iterator[Line]:
        try:
            yield from reader.lines()
        except OSError:
            reader.gone = True
        self._retire(reader)

    def _retire(self, reader: _Reader) -> None:
        if reader.gone:
            try:
                linked = os.fstat(reader.fd).st_nlink > 0
            except OSError:
                linked = False
            reader.close()
            self.readers.pop(reader.key, None)
            if linked:                                   # moved out of sight: never read it twice
                self.closed[reader.key] = reader.offset
        elif not reader.live and time.time() - reader.mtime >= self.idle_close_s:
            reader.close()                               # rotated, read to the end, quiet
            self.readers.pop(reader.key, None)
            self.closed[reader.key] = reader.offset

    def positions(self) -> dict[str, int]:
        """Read offsets by inode ("dev:ino"), to resume with ``LogTail(..., positions_=...)``."""
        out = {f"{k[0]}:{k[1]}": off for k, off in self.closed.items()}
        out.update({f"{k[0]}:{k[1]}": r.offset - len(r.partial) for k, r in self.readers.items()})
        return out

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()

    def __enter__(self) -> LogTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow_file(path: str | Path) -> LogTail:
    """A tail of one log file and its loguru-rotated siblings (``x.jsonl``, ``x.*.jsonl``)."""
    p = Path(path)
    return LogTail([glob.escape(str(p)), glob.escape(str(p.with_suffix(""))) + ".*" + p.suffix],
                   exclude=lambda q: stream_of(q) != p.name)


# -- parsing -------------------------------------------------------------------------------

@dataclass
class LogEntry:
    """One log record, whatever file it came from."""

    time: float
    stage: str
    replica: int | None
    level: str
    message: str
    exception: dict[str, Any] | None = None     # {"type", "value", "traceback"}
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "log"                           # "log" (loguru) | "stderr" (raw output)

    @property
    def ident(self) -> str:
        return self.stage if self.replica is None else f"{self.stage}.{self.replica}"

    @property
    def level_no(self) -> int:
        return LEVELS.get(self.level, 20)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time": iso_time(self.time), "stage": self.stage, "replica": self.replica,
                               "level": self.level, "message": self.message}
        if self.exception:
            out["exception"] = self.exception
        return out


def iso_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def parse_line(line: Line) -> LogEntry | None:
    """A :class:`LogEntry` from a line of a ``.jsonl`` or ``.stderr`` log; None for a blank line."""
    stage, replica, ext = ident_of(line.stream)
    text = line.text.rstrip("\r")
    if not text.strip():
        return None
    if ext != "jsonl":
        return LogEntry(line.mtime, stage, replica, "STDERR", text, kind="stderr")
    try:
        obj = json.loads(text)
        record = obj["record"]
    except (ValueError, KeyError, TypeError):
        return LogEntry(line.mtime, stage, replica, "INFO", text)   # not loguru's: show it raw
    extra = record.get("extra") or {}
    # identity from the file's name (<stage>.<replica>.jsonl, supervisor.jsonl): a process may
    # bind other "stage"/"replica" extras (the supervisor's replica 0), the file is its own
    level = (record.get("level") or {}).get("name", "INFO")
    t = (record.get("time") or {}).get("timestamp", line.mtime)
    exception = None
    exc = record.get("exception")
    if exc:
        full = obj.get("text", "")
        i = full.find("Traceback (most recent call last)")
        tb = full[i:] if i >= 0 else full.partition("\n")[2]
        exception = {"type": exc.get("type"), "value": exc.get("value"), "traceback": tb.rstrip("\n")}
    message = record.get("message", "")
    extra = {k: v for k, v in extra.items() if k not in ("stage", "replica")}
    return LogEntry(float(t), stage, replica, level, message, exception, extra)
