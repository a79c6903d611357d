"""``streampipe logs``: every stage's log and the supervisor's, merged in time order.

Shaped like ``docker compose logs``: each line is prefixed by ``stage.replica`` in a colour of
its own, ``-f`` keeps following (through rotations, with the same :class:`streampipe._logtail.LogTail`
the log extractor uses), ``--level`` is a minimum level, ``--since`` takes ``30s``/``5m``/
``2h``/``1d`` (or ``1h30m``) or an ISO time, ``--json`` prints one object a line
(``{"time", "stage", "replica", "level", "message", "exception"?}``).

Sources: ``<run dir>/logs/<stage>.<r>.jsonl`` (loguru, serialised), their rotated siblings,
``supervisor.jsonl``, and ``<stage>.<r>.stderr`` (a process's raw output). A ``.stderr`` line
has no time of its own: it shows with level ``STDERR`` (ranked as ERROR) and the file's
modification time when read, which is exact while following and the time of the last write
for older lines. Each file is already in time order, so the backlog is a k-way merge
(``heapq.merge``): memory stays flat however large the logs are.

``show_summary`` prints the log extractor's facts (``<run dir>/logfacts-summary.json``).
"""

from __future__ import annotations

import collections
import datetime as dt
import heapq
import json
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from streampipe._logtail import LEVELS, LogEntry, LogTail, ident_of, parse_line

FOLLOW_POLL_S = 0.2            # `logs -f` checks the files 5 times a second, as `tail -F` does
SUMMARY_FILE = "logfacts-summary.json"

# docker compose's rotation of service colours
PALETTE = ("cyan", "yellow", "green", "magenta", "blue", "bright_cyan", "bright_yellow", "bright_green",
           "bright_magenta", "bright_blue")
LEVEL_STYLE = {"TRACE": "dim", "DEBUG": "dim", "INFO": "", "SUCCESS": "green", "WARNING": "yellow",
               "ERROR": "bold red", "CRITICAL": "bold white on red", "STDERR": "red"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(since: str | None, now: float | None = None) -> float | None:
    """``"5m"`` -> the epoch time 5 minutes ago; ISO times as given (naive = local time).

    >>> parse_since("1h30m", now=10_000.0)
    4600.0
    >>> parse_since("2024-01-01T00:00:00+00:00")
    1704067200.0
    """
    if since is None or since == "":
        return None
    text = since.strip()
    if _DURATION.fullmatch(text) or re.fullmatch(r"(?:\d+(?:\.\d+)?[smhdw])+", text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(text))
        return (dt.datetime.now().timestamp() if now is None else now) - seconds
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {since!r}: use a duration (30s, 5m, 2h, 1d) or an ISO time (2025-01-31T12:00)") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def level_no(level: str | None) -> int:
    """The number of a level name (case-insensitive); 0 for None."""
    if level is None:
        return 0
    name = level.strip().upper()
    if name.isdigit():
        return int(name)
    if name == "WARN":
        name = "WARNING"
    if name not in LEVELS:
        raise ValueError(f"--level {level!r}: use one of {', '.join(n for n in LEVELS if n != 'STDERR')}")
    return LEVELS[name]


class _Printer:
    """Formats entries docker-compose style; remembers a colour per stage."""

    def __init__(self, console: Console, as_json: bool, files: Iterable[Path]) -> None:
        self.console, self.as_json = console, as_json
        self.colours: dict[str, str] = {}
        idents = {ident_of(p)[:2] for p in files}
        self.width = max((len(s if r is None else f"{s}.{r}") for s, r in idents), default=0)  # widened as stages appear
        for name in sorted({s for s, _ in idents}):
            self._colour(name)

    def _colour(self, stage: str) -> str:
        if stage not in self.colours:
            self.colours[stage] = PALETTE[len(self.colours) % len(PALETTE)]
        return self.colours[stage]

    def print(self, e: LogEntry) -> None:
        if self.as_json:
            self.console.out(json.dumps(e.to_json(), default=str), highlight=False)
            return
        ident = e.ident
        self.width = max(self.width, len(ident))
        colour = self._colour(e.stage)
        stamp = dt.datetime.fromtimestamp(e.time).strftime("%H:%M:%S.%f")[:-3]
        lines = e.message.split("\n")
        if e.exception and e.exception.get("traceback"):
            lines += str(e.exception["traceback"]).split("\n")
        for i, body in enumerate(lines):
            text = Text(f"{ident:<{self.width}} | ", style=colour)
            if i == 0:
                text.append(f"{stamp} ", style="dim")
                text.append(f"{e.level:<8} ", style=LEVEL_STYLE.get(e.level, ""))
                text.append(body)
            else:
                text.append(" " * 22 + body, style="red" if e.exception else "")
            self.console.print(text, soft_wrap=True, highlight=False, markup=False)


def _entries(lines: Iterable[Any]) -> Iterator[LogEntry]:
    for line in lines:
        entry = parse_line(line)
        if entry is not None:
            yield entry


def show_logs(run_dir: Path, stage: str | None = None, follow: bool = False, level: str | None = None,
              since: str | None = None, as_json: bool = False, console: Console | None = None,
              stop: threading.Event | None = None, tail_n: int | None = None, grep: str | None = None,
              err: Console | None = None) -> int:
    """Print the run's logs merged in time order; with ``follow``, keep printing until ``stop``.

    ``stage`` is a stage name (all its replicas), ``stage.replica``, or ``supervisor``;
    ``tail_n``: only the last ``tail_n`` entries written so far (then, with ``follow``, the new
    ones); ``grep``: only entries whose message matches this regular expression.
    Returns 0, 1 (no logs, with a one-line message naming the stages that have logs) or 2 (a bad
    ``level``, ``since``, ``tail_n`` or ``grep``).
    """
    err = err or console or Console(stderr=True)     # without ``err``, a caller's console gets the messages too (tests)
    console = console or Console()
    try:
        min_no = level_no(level)
        since_t = parse_since(since)
        pattern = re.compile(grep) if grep is not None else None
        if tail_n is not None and tail_n < 0:
            raise ValueError(f"--tail {tail_n}: a count of entries, 0 or more")
    except (ValueError, re.error) as exc:
        err.print(f"streampipe logs: {exc}", markup=False, highlight=False)
        return 2
    logs = Path(run_dir) / "logs"

    def wanted_file(path: Path) -> bool:
        name, replica, _ = ident_of(path)
        if stage is None:
            return True
        return stage in (name, f"{name}.{replica}")

    def wanted(e: LogEntry) -> bool:
        if stage is not None and stage not in (e.stage, e.ident):
            return False
        return (e.level_no >= min_no and (since_t is None or e.time >= since_t)
                and (pattern is None or pattern.search(e.message) is not None))

    patterns = [logs / "*.jsonl", logs / "*.stderr"]
    files = [p for pattern in patterns for p in Path(logs).glob(pattern.name)] if logs.is_dir() else []
    if not any(wanted_file(p) for p in files) and not follow:
        what = f"for stage {stage!r} " if stage else ""
        known = sorted({ident_of(p)[0] for p in files})
        hint = f"; stages with logs: {', '.join(known)}" if known else ""
        err.print(f"streampipe logs: no logs {what}in {logs}{hint}", markup=False, highlight=False)
        return 1
    printer = _Printer(console, as_json, [p for p in files if wanted_file(p)])
    tail = LogTail(patterns, exclude=lambda p: not wanted_file(p))
    try:
        backlog: Iterable[LogEntry] = (e for e in heapq.merge(*(_entries(src) for src in tail.sources()), key=lambda e: e.time)
                                       if wanted(e))
        if tail_n is not None:
            backlog = collections.deque(backlog, maxlen=tail_n)
        for entry in backlog:
            printer.print(entry)
        if not follow:
            return 0
        stop = stop or threading.Event()
        while not stop.wait(FOLLOW_POLL_S):
            fresh = sorted(_entries(tail.read()), key=lambda e: e.time)
            for entry in fresh:
                if wanted(entry):
                    printer.print(entry)
    except KeyboardInterrupt:
        pass
    finally:
        tail.close()
    return 0


def load_summary(run_dir: Path) -> dict[str, Any] | None:
    """The log extractor's current summary, or None when there is none (yet)."""
    try:
        data = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def show_summary(run_dir: Path, console: Console | None = None, as_json: bool = False) -> int:
    """Print the log facts: per stage lines, errors, warnings, error rate, top exception types."""
    console = console or Console()
    summary = load_summary(run_dir)
    if summary is None:
        console.print(f"streampipe logs: no log facts in {run_dir} (add a stage of type log_extractor to services.yaml)",
                      markup=False, highlight=False)
        return 1
    if as_json:
        console.out(json.dumps(summary, indent=1), highlight=False)
        return 0
    table = Table(title=f"log facts  (last line {summary.get('last') or '-'}, {summary.get('windows', 0)} windows of {summary.get('window_s', 0):g}s)",
                  title_justify="left")
    for col, justify in (("stage", "left"), ("lines", "right"), ("errors", "right"), ("warnings", "right"),
                         ("error rate", "right"), ("restarts", "right"), ("top exceptions", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, s in (summary.get("stages") or {}).items():
        top = sorted((s.get("exceptions") or {}).items(), key=lambda kv: -kv[1])[:3]
        errors = s.get("errors", 0)
        table.add_row(name, f"{s.get('lines', 0):,}", Text(f"{errors:,}", style="red" if errors else ""),
                      Text(f"{s.get('warnings', 0):,}", style="yellow" if s.get("warnings") else ""),
                      f"{100 * s.get('error_rate', 0):.2f}%", str(s.get("restarts", 0)),
                      ", ".join(f"{t} ×{n}" for t, n in top) or "-")
    console.print(table)
    exceptions = summary.get("exceptions") or []
    if exceptions:
        ex = Table(title="exceptions", title_justify="left")
        for col in ("type", "stage", "count", "first", "last", "message"):
            ex.add_column(col, justify="right" if col == "count" else "left")
        for f in exceptions[:10]:
            sample = f.get("sample") or {}
            ex.add_row(f["type"], f["stage"], str(f["count"]), str(f.get("first", ""))[:19], str(f.get("last", ""))[:19],
                       Text(str(sample.get("value") or sample.get("message") or "")[:80]))
        console.print(ex)
    drift = (summary.get("drift") or {}).get("count", 0)
    if drift:
        last = (summary["drift"].get("recent") or [{}])[-1]
        console.print(Text(f"drift: {drift} warning(s); last {last.get('time', '')[:19]} {last.get('stage', '')}: {last.get('message', '')}",
                           style="yellow"))
    return 0
