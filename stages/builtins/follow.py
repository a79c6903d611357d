"""follow: the lines another program appends to a JSON-lines or CSV file, ``tail -F`` style.

The source reads complete lines (a line without its newline waits for the rest), and keeps
following when the file is rotated:

- **rename + new file** (logrotate's default, a writer reopening its log): once ``path`` names
  another file (device and inode differ), the old file is read to its end, then the new one from
  its start;
- **truncation** (``copytruncate``, ``> file``): a file shorter than what was read is read again
  from its start, as a new file.

Position (``snapshot()``): ``{"dev", "ino", "offset", "line", "file"}`` — the file followed (device,
inode), the bytes and lines of it consumed, and how many files came before it. A restart resumes
at that offset of that file; if ``path`` was rotated meanwhile, the old file is looked for by its
inode in the same folder (``app.log.1`` ...), read to its end, and then ``path`` is read from its
start. A file rotated away and deleted while the source was down cannot be read: a warning says
so and ``path`` is read from its start. Two rotations while the source is down lose the middle
file (it is neither the saved one nor ``path``).

Ids come from the position: ``file * 2**32 + line`` (the line's index in its file, counting the
header of a CSV and the lines dead-lettered), so a restart re-reading lines gives them the same
ids and the sink drops the copies; ids increase along the stream. A record's own ``id`` moves to
``record_id``. A line that is not JSON, not an object, not UTF-8, or a CSV row of the wrong width
goes to the dead-letter file with the file, line and reason; the stream goes on.

Options:
    path        the file to follow (relative to the config's folder)
    format      ``jsonl`` or ``csv`` (default: ``csv`` for a ``.csv`` name, else ``jsonl``);
                a CSV's first line in each file is its header
    start       ``beginning`` (default) or ``end``: where a first run starts (a restart resumes)
    check_s     how often an idle source looks for rotation and truncation (default 0.05)

>>> Follow(path="app.log").snapshot()
{'dev': None, 'ino': None, 'offset': 0, 'line': 0, 'file': 0}
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from streampipe.stages.api import Record, Source
from streampipe.stages.builtins.generator import _csv_record

READ_BYTES = 1 << 16     # one read(); lines are cut from it
LINE_BITS = 32           # id = file << LINE_BITS | line: 4 billion lines a file, 2 billion files within int64
MAX_LINE_BYTES = 1 << 20  # a longer "line" (a binary file, a missing newline) is dead-lettered in pieces


class Follow(Source):
    def __init__(self, path: str, format: str | None = None, start: str = "beginning", check_s: float = 0.05) -> None:
        super().__init__()
        if format not in (None, "jsonl", "csv"):
            raise ValueError(f"format {format!r}: use jsonl or csv")
        if start not in ("beginning", "end"):
            raise ValueError(f"start {start!r}: use beginning or end")
        if float(check_s) <= 0:
            raise ValueError("check_s must be > 0")
        self.path_option, self.start, self.check_s = path, start, float(check_s)
        self.csv = format == "csv" or (format is None and str(path).endswith(".csv"))
        self.dev: int | None = None
        self.ino: int | None = None
        self.offset = 0             # bytes of the current file consumed (through the last line taken)
        self.line = 0               # lines of the current file consumed
        self.file = 0               # files followed before the current one
        self.header: list[str] | None = None
        self.fd: int | None = None
        self.buf = b""              # bytes read past ``offset``
        self.restored = False
        self.opened = False         # the first file of this life was opened
        self.emitted = self.rotations = self.truncations = 0

    # -- position ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"dev": self.dev, "ino": self.ino, "offset": self.offset, "line": self.line, "file": self.file}

    def restore(self, state: dict[str, Any]) -> None:
        self.dev, self.ino = state.get("dev"), state.get("ino")
        self.offset, self.line, self.file = int(state.get("offset", 0)), int(state.get("line", 0)), int(state.get("file", 0))
        self.restored = self.ino is not None

    def stats(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "offset": self.offset, "emitted": self.emitted,
                "rotations": self.rotations, "truncations": self.truncations}

    @property
    def path(self) -> Path:
        return self.context.resolve_input(self.path_option)

    # -- opening ----------------------------------------------------------------------------
    def _open_first(self) -> bool:
        """Open the saved file at its offset (found by inode if it was rotated), or ``path``."""
        if self.restored:
            self.restored = False
            found = self._saved_file()
            if found is not None:
                fd = os.open(found, os.O_RDONLY)
                if os.fstat(fd).st_size >= self.offset:
                    self._use(fd, self.offset, self.line)
                    if self.csv and self.offset:
                        self.header = self._header_of(fd)
                    return True
                logger.warning(f"{found} is shorter than the saved offset {self.offset} (truncated while stopped): "
                               "reading it again from its start")
                self.truncations += 1
                self.file += 1
                self._use(fd, 0, 0)
                return True
            else:
                logger.warning(f"the file followed before (inode {self.ino}) is gone: its unread lines are lost; "
                               f"reading {self.path} from its start")
            self.file += 1
            return self._open_path(at_end=False)
        return self._open_path(at_end=self.start == "end")

    def _saved_file(self) -> Path | None:
        """The file of the saved position: ``path`` if it still is that inode, else a file beside it that is."""
        candidates = [self.path]
        try:
            candidates += sorted(p for p in self.path.parent.iterdir() if p.name.startswith(self.path.name) and p != self.path)
        except OSError:
            pass
        for p in candidates:
            try:
                st = p.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                return p
        return None

    def _open_path(self, at_end: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        end = os.fstat(fd).st_size if at_end else 0
        if at_end and end:               # start at the end of the last complete line's file
            self.header = self._header_of(fd) if self.csv else None
        self._use(fd, end, 0)
        if at_end:
            self.line = 1 if self.csv and end else 0   # ids of a run that starts at the end count from here
        return True

    def _use(self, fd: int, offset: int, line: int) -> None:
        st = os.fstat(fd)
        self.fd, self.dev, self.ino, self.offset, self.line, self.buf = fd, st.st_dev, st.st_ino, offset, line, b""
        os.lseek(fd, offset, os.SEEK_SET)

    @staticmethod
    def _header_of(fd: int) -> list[str]:
        first = os.pread(fd, MAX_LINE_BYTES, 0).split(b"\n", 1)[0]
        return next(csv.reader([first.decode(errors="replace").rstrip("\r")]), [])

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- reading ----------------------------------------------------------------------------
    def _next_line(self) -> bytes | None:
        """The next complete line (with its newline), or None at the end of what is written."""
        assert self.fd is not None
        while True:
            cut = self.buf.find(b"\n")
            if cut >= 0:
                raw, self.buf = self.buf[:cut + 1], self.buf[cut + 1:]
                return raw
            if len(self.buf) >= MAX_LINE_BYTES:
                raw, self.buf = self.buf[:MAX_LINE_BYTES], self.buf[MAX_LINE_BYTES:]
                return raw
            chunk = os.read(self.fd, READ_BYTES)
            if not chunk:
                return None
            self.buf += chunk

    def _moved_on(self) -> str | None:
        """At the end of the file: ``"rotated"`` (``path`` is another file now, and this one is
        read to its end) or ``"truncated"`` (this file is shorter than what was read), else None."""
        assert self.fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None                      # renamed, the new file not made yet: keep the old one
        mine = os.fstat(self.fd)
        read_to = self.offset + len(self.buf)
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            return "rotated" if mine.st_size <= read_to else None   # grown meanwhile: read it to its end first
        return "truncated" if mine.st_size < read_to else None

    def _switch(self, why: str) -> None:
        self.file += 1
        self.header = None
        if why == "rotated":
            self.rotations += 1
            self._close()
            if not self._open_path(at_end=False):
                self.dev = self.ino = None   # gone again: opened when it appears
                self.offset = self.line = 0
        else:
            self.truncations += 1
            assert self.fd is not None
            self._use(self.fd, 0, 0)
        logger.info(f"{self.path} {why}: following file {self.file} from its start")

    def generate(self) -> Iterator[Record | None]:
        next_check = 0.0
        while True:
            if self.fd is None:
                if not (self._open_path(at_end=False) if self.opened else self._open_first()):
                    yield None               # not there yet (or between a rename and the new file)
                    continue
                self.opened = True
            raw = self._next_line()
            if raw is None:
                now = time.monotonic()
                if now < next_check:
                    yield None
                    continue
                next_check = now + self.check_s
                why = self._moved_on()
                if why is None:
                    yield None
                    continue
                tail, self.buf = self.buf, b""      # the old file's last line, written without its newline
                record = self._emit(tail) if tail else None
                self._switch(why)
            else:
                record = self._emit(raw)
            yield record                             # None: a header, a blank or a dead-lettered line

    def _emit(self, raw: bytes) -> Record | None:
        """The record of one line (None: a header, a blank or a bad line, dead-lettered)."""
        self.offset += len(raw)
        file, line = self.file, self.line
        self.line += 1
        try:
            text = raw.decode().strip()
        except UnicodeDecodeError as exc:
            self._bad(raw, line + 1, f"undecodable bytes at column {exc.start + 1}: {exc.reason}")
            return None
        if not text:
            return None
        if self.csv and self.header is None:
            self.header = next(csv.reader([text]), [])
            return None
        try:
            if self.csv:
                record = _csv_record(self.header or [], text)
            else:
                value = json.loads(text)
                if not isinstance(value, dict):
                    raise ValueError(f"a JSON {type(value).__name__}, not an object")
                record = value
        except json.JSONDecodeError as exc:
            self._bad(raw, line + 1, f"bad JSON: {exc}")
            return None
        except ValueError as exc:
            self._bad(raw, line + 1, str(exc))
            return None
        if "id" in record:
            record["record_id"] = record.pop("id")
        record["id"] = (file << LINE_BITS) | line
        self.emitted += 1
        return record

    def _bad(self, raw: bytes, line: int, why: str) -> None:
        text = raw.decode(errors="replace").rstrip("\r\n")
        self.reject({"file": str(self.path), "file_no": self.file, "line": line, "text": text[:2000]}, f"{self.path.name}:{line}: {why}")

    def teardown(self) -> None:
        self._close()


__all__ = ["Follow"]
