"""log_extractor: turns the run's logs into facts, a window at a time.

A source stage (no inputs). It follows, through :class:`streampipe._logtail.LogTail` (rotation- and
truncation-safe, by inode), every ``<run dir>/logs/*.jsonl`` (loguru, one per stage replica,
plus ``supervisor.jsonl``), every ``<run dir>/logs/*.stderr`` (a process's raw output: tracebacks
printed before logging was set up, crashes at import) and ``<run dir>/events.jsonl`` (supervisor
events), and keeps:

- per stage and window: lines by level, errors (ERROR, CRITICAL, and tracebacks seen only on
  stderr), warnings, error rate (errors / lines) and errors per second;
- each distinct exception type per stage: count, first and last time, one sample traceback. A
  crash is logged by loguru *and* printed to stderr by the runtime: the two copies are matched
  on (replica, type, message) and counted once;
- supervisor events (start, exit, restart, backoff, kill, hung, failed, ...) and drift (a
  WARNING or worse whose message contains "drift", as the evaluator logs it);
- latency and throughput figures that stages log, from loguru ``extra`` fields (``logger.bind(
  latency_ms=...)``) or ``key=value`` text in messages (``latency_ms=1.3``, ``p99=4ms``,
  ``throughput=900``, ``1200 rec/s``).

Outputs, in the run directory: ``logfacts.jsonl`` (one JSON object per window of ``window_s``
seconds of log time, written once the window is ``lateness_s`` old; lines that arrive for a
window already written give a second record flagged ``"late": true``) and
``logfacts-summary.json`` (totals so far, rewritten atomically at most every ``summary_every_s``;
``streampipe status`` and ``streampipe logs --summary`` read it). With ``emit: true`` (the
default) each window record is also yielded downstream. The read position is saved beside the
summary (``state/<stage>.<replica>.logcursor.json``), so a restarted extractor resumes without
counting a line twice.

The extractor does not read its own ``.jsonl`` log (``include_self: false``), and it logs only
at start and stop, so nothing it writes can feed back into what it reads.

Options: ``window_s`` (10), ``poll_s`` (0.5, seconds between scans), ``lateness_s`` (2),
``summary_every_s`` (1), ``emit`` (true), ``include_self`` (false), ``samples`` (20 recent
events / drift facts kept in the summary).

>>> from streampipe._logtail import LogEntry
>>> facts = Facts(window_s=10)
>>> facts.add(LogEntry(100.0, "trainer", 0, "INFO", "fitted batch latency_ms=12.5"))
>>> facts.add(LogEntry(101.0, "trainer", 0, "ERROR", "fit failed",
...                    {"type": "ValueError", "value": "bad", "traceback": "Traceback ..."}))
>>> facts.add(LogEntry(103.0, "evaluator", 0, "WARNING", "drift detected: accuracy 0.61"))
>>> [w["stages"]["trainer"]["errors"] for w in facts.flush(now=200.0)]
[1]
>>> s = facts.summary()
>>> s["stages"]["trainer"]["error_rate"], s["exceptions"][0]["type"], s["drift"]["count"]
(0.5, 'ValueError', 1)
>>> s["stages"]["trainer"]["metrics"]["latency_ms"]["last"]
12.5
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streampipe._logtail import LogEntry, LogTail, ident_of, iso_time, parse_line
from streampipe.stages.api import Record, Source
from streampipe.stages.state import atomic_write, json_default

WINDOW_S = 10.0           # seconds of log time per facts record
POLL_S = 0.5              # between two scans of the log folder: a glob and a stat per file
LATENESS_S = 2.0          # a window is written when this old: 4 polls to catch every file's lines
SUMMARY_EVERY_S = 1.0     # the summary is rewritten (atomically) at most this often
MATCH_MEMORY = 1000       # unmatched log/stderr exception copies remembered for de-duplication
SAMPLE_CHARS = 8000       # a sample traceback is cut to this length

ERROR_NO = 40
WARNING_NO = 30

# "latency_ms=1.3", "p99: 4ms", "batch_latency 0.2 s"
_LATENCY = re.compile(r"\b(?P<key>[a-z_]*latency[a-z0-9_]*|p50|p90|p95|p99|p999)\s*[=:]?\s*"
                      r"(?P<val>\d+(?:\.\d+)?)\s*(?P<unit>ms|us|µs|s)?\b", re.IGNORECASE)
# "throughput=900", "rate: 12.5", "1200 rec/s", "3.4k records/s"
_THROUGHPUT_KV = re.compile(r"\b(?:throughput|records_per_s|rec_per_s|rps)\s*[=:]\s*(?P<val>\d+(?:\.\d+)?)", re.IGNORECASE)
_THROUGHPUT_UNIT = re.compile(r"(?P<val>\d+(?:\.\d+)?)\s*(?P<k>[kKM])?\s*(?:records|recs|rec|msgs|messages|rows|events)\s*/\s*s\b")
_EXC_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::\s?(?P<value>.*))?$")
_UNIT_MS = {"ms": 1.0, "us": 0.001, "µs": 0.001, "s": 1000.0, None: 1.0}
_SCALE = {"k": 1e3, "K": 1e3, "M": 1e6, None: 1.0}


def _figures(entry: LogEntry) -> dict[str, float]:
    """Latency (ms) and throughput (records/s) figures a log line carries."""
    out: dict[str, float] = {}
    for key, value in entry.extra.items():
        k = key.lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "latency" in k or k in ("p50", "p90", "p95", "p99"):
                if k.endswith("_s"):
                    out[k[:-2] + "_ms"] = float(value) * 1000.0
                else:
                    out[k if k.endswith("_ms") else f"{k}_ms"] = float(value)
            elif "throughput" in k or k in ("records_per_s", "rps"):
                out["throughput"] = float(value)
    message = entry.message
    if "latency" in message.lower() or re.search(r"\bp9|\bp50", message):
        for m in _LATENCY.finditer(message):
            key = m.group("key").lower()
            if key.endswith("_ms") or key.endswith("_s"):
                key, unit = key.rsplit("_", 1)[0], key.rsplit("_", 1)[1]
            else:
                unit = (m.group("unit") or "ms").lower()
            out.setdefault(f"{key}_ms", float(m.group("val")) * _UNIT_MS.get(unit, 1.0))
    m2 = _THROUGHPUT_KV.search(message) or _THROUGHPUT_UNIT.search(message)
    if m2:
        scale = _SCALE.get(m2.groupdict().get("k"), 1.0)
        out.setdefault("throughput", float(m2.group("val")) * scale)
    return out


def _cut(tb: str) -> str:
    """A sample traceback of bounded size: its head (where it starts) and its tail (the error)."""
    if len(tb) <= SAMPLE_CHARS:
        return tb
    head = SAMPLE_CHARS // 8
    return tb[:head] + "\n  [...]\n" + tb[-(SAMPLE_CHARS - head):]


class _Figure:
    __slots__ = ("n", "total", "max", "last")

    def __init__(self) -> None:
        self.n, self.total, self.max, self.last = 0, 0.0, float("-inf"), 0.0

    def add(self, v: float) -> None:
        self.n += 1
        self.total += v
        self.max = max(self.max, v)
        self.last = v

    def to_json(self) -> dict[str, float]:
        return {"n": self.n, "mean": round(self.total / self.n, 4), "max": round(self.max, 4), "last": round(self.last, 4)}


class _StageCounts:
    def __init__(self) -> None:
        self.lines = 0
        self.levels: dict[str, int] = {}
        self.errors = 0
        self.warnings = 0
        self.stderr_lines = 0
        self.replicas: set[int] = set()
        self.metrics: dict[str, _Figure] = {}
        self.last_error: dict[str, Any] | None = None

    def add(self, e: LogEntry, counted_error: bool) -> None:
        if e.replica is not None:
            self.replicas.add(e.replica)
        if e.kind == "traceback":
            pass                        # its lines were counted as STDERR lines already
        elif e.kind == "stderr":
            self.stderr_lines += 1
            self.levels["STDERR"] = self.levels.get("STDERR", 0) + 1
        else:
            self.lines += 1
            self.levels[e.level] = self.levels.get(e.level, 0) + 1
            if WARNING_NO <= e.level_no < ERROR_NO:
                self.warnings += 1
        if counted_error:
            self.errors += 1
            self.last_error = {"time": iso_time(e.time), "replica": e.replica,
                               "message": e.message if e.kind == "log" else f"{(e.exception or {}).get('type')}: {(e.exception or {}).get('value')}"}
        for key, value in _figures(e).items():
            self.metrics.setdefault(key, _Figure()).add(value)

    def to_json(self, window_s: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"lines": self.lines, "errors": self.errors, "warnings": self.warnings,
                               "error_rate": round(self.errors / max(1, self.lines), 4),
                               "levels": dict(sorted(self.levels.items())), "replicas": sorted(self.replicas)}
        if window_s:
            out["errors_per_s"] = round(self.errors / window_s, 4)
        if self.stderr_lines:
            out["stderr_lines"] = self.stderr_lines
        if self.metrics:
            out["metrics"] = {k: f.to_json() for k, f in sorted(self.metrics.items())}
        if self.last_error:
            out["last_error"] = self.last_error
        return out


class _Window:
    def __init__(self, start: float, late: bool = False) -> None:
        self.start, self.late = start, late
        self.stages: dict[str, _StageCounts] = {}
        self.exceptions: dict[tuple[str, str], int] = {}
        self.events: list[dict[str, Any]] = []
        self.drift: list[dict[str, Any]] = []


class Facts:
    """The pure part: log entries and events in, window records and a summary out (no files)."""

    def __init__(self, window_s: float = WINDOW_S, samples: int = 20) -> None:
        self.window_s = float(window_s)
        self.windows: dict[float, _Window] = {}
        self.written: set[float] = set()
        self.totals: dict[str, _StageCounts] = {}
        self.exceptions: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: dict[str, dict[str, int]] = {}     # stage -> event -> count
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=samples)
        self.drift: deque[dict[str, Any]] = deque(maxlen=samples)
        self.drift_count = 0
        self.lines = 0
        self.windows_written = 0
        self.first_time: float | None = None
        self.last_time: float | None = None
        # copies of one exception seen in a loguru log / on stderr, waiting for their twin
        self._unmatched: dict[str, OrderedDict[tuple[str, str, str], int]] = {"log": OrderedDict(), "stderr": OrderedDict()}

    # -- input ------------------------------------------------------------------------------
    def _window(self, t: float) -> _Window:
        start = (t // self.window_s) * self.window_s
        w = self.windows.get(start)
        if w is None:
            w = self.windows[start] = _Window(start, late=start in self.written)
        return w

    def _seen(self, t: float) -> None:
        self.first_time = t if self.first_time is None else min(self.first_time, t)
        self.last_time = t if self.last_time is None else max(self.last_time, t)

    def add(self, e: LogEntry) -> None:
        """Count one log entry (a loguru record, or a stderr traceback as one ERROR entry)."""
        self.lines += 1
        self._seen(e.time)
        w = self._window(e.time)
        new_exception = bool(e.exception) and self._first_copy(e)
        counted_error = e.level_no >= ERROR_NO if e.kind == "log" else new_exception and e.kind == "traceback"
        for counts in (w.stages.setdefault(e.stage, _StageCounts()), self.totals.setdefault(e.stage, _StageCounts())):
            counts.add(e, counted_error)
        if new_exception:
            assert e.exception is not None
            etype = str(e.exception.get("type") or "Exception")
            key = (e.stage, etype)
            w.exceptions[key] = w.exceptions.get(key, 0) + 1
            fact = self.exceptions.get(key)
            if fact is None:
                fact = self.exceptions[key] = {"stage": e.stage, "type": etype, "count": 0, "first": e.time,
                                               "sample": {"replica": e.replica, "message": e.message,
                                                          "value": e.exception.get("value"),
                                                          "traceback": _cut(str(e.exception.get("traceback") or ""))}}
            fact["count"] += 1
            fact["first"], fact["last"] = min(fact["first"], e.time), max(fact.get("last", e.time), e.time)
        if e.kind == "log" and e.level_no >= WARNING_NO and "drift" in e.message.lower():
            fact = {"time": iso_time(e.time), "stage": e.stage, "replica": e.replica, "message": e.message}
            w.drift.append(fact)
            self.drift.append(fact)
            self.drift_count += 1

    def _first_copy(self, e: LogEntry) -> bool:
        """False when this exception is the twin of one already counted (log vs stderr)."""
        assert e.exception is not None
        etype = str(e.exception.get("type") or "").rpartition(".")[2]
        key = (e.ident, etype, str(e.exception.get("value") or "").strip())
        side = "log" if e.kind == "log" else "stderr"
        other = self._unmatched["stderr" if side == "log" else "log"]
        if other.get(key):
            other[key] -= 1
            if not other[key]:
                del other[key]
            return False
        mine = self._unmatched[side]
        mine[key] = mine.get(key, 0) + 1
        mine.move_to_end(key)
        while len(mine) > MATCH_MEMORY:
            mine.popitem(last=False)
        return True

    def add_event(self, event: dict[str, Any]) -> None:
        """Count one supervisor event (a line of events.jsonl)."""
        t = float(event.get("time") or time.time())
        self._seen(t)
        stage = str(event.get("stage") or "supervisor")
        name = str(event.get("event") or "?")
        per = self.events.setdefault(stage, {})
        per[name] = per.get(name, 0) + 1
        fact = {"time": iso_time(t), "event": name, "stage": stage, "replica": event.get("replica"),
                "pid": event.get("pid"), "reason": event.get("reason", "")}
        self._window(t).events.append(fact)
        if name not in ("start", "ready", "supervisor", "forkserver"):
            self.recent_events.append(fact)

    # -- output -----------------------------------------------------------------------------
    def flush(self, now: float, lateness: float = LATENESS_S) -> list[dict[str, Any]]:
        """The window records whose end is at least ``lateness`` before ``now``, oldest first."""
        out = []
        for start in sorted(self.windows):
            if start + self.window_s + lateness > now:
                break
            out.append(self._record(self.windows.pop(start)))
            self.written.add(start)
        self.windows_written += len(out)
        return out

    def _record(self, w: _Window) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "kind": "logfacts", "start": w.start, "end": w.start + self.window_s, "time": iso_time(w.start),
            "window_s": self.window_s,
            "lines": sum(c.lines for c in w.stages.values()),
            "errors": sum(c.errors for c in w.stages.values()),
            "stages": {name: c.to_json(self.window_s) for name, c in sorted(w.stages.items())},
        }
        if w.exceptions:
            rec["exceptions"] = [{"stage": s, "type": t, "count": n} for (s, t), n in sorted(w.exceptions.items())]
        if w.events:
            rec["events"] = w.events
        if w.drift:
            rec["drift"] = w.drift
        if w.late:
            rec["late"] = True
        return rec

    def summary(self) -> dict[str, Any]:
        """Totals so far: what ``streampipe status`` and ``logs --summary`` show."""
        stages: dict[str, Any] = {}
        for name in sorted(set(self.totals) | set(self.events)):
            entry = self.totals[name].to_json() if name in self.totals else _StageCounts().to_json()
            ev = self.events.get(name, {})
            entry["restarts"] = ev.get("restart", 0)
            if ev:
                entry["events"] = dict(sorted(ev.items()))
            entry["exceptions"] = {t: f["count"] for (s, t), f in sorted(self.exceptions.items(), key=lambda kv: -kv[1]["count"]) if s == name}
            stages[name] = entry
        exceptions = []
        for fact in sorted(self.exceptions.values(), key=lambda f: (-f["count"], f["stage"], f["type"])):
            exceptions.append({**fact, "first": iso_time(fact["first"]), "last": iso_time(fact["last"])})
        return {
            "updated": iso_time(time.time()),
            "window_s": self.window_s,
            "first": iso_time(self.first_time) if self.first_time is not None else None,
            "last": iso_time(self.last_time) if self.last_time is not None else None,
            "lines": sum(c.lines for c in self.totals.values()),
            "errors": sum(c.errors for c in self.totals.values()),
            "warnings": sum(c.warnings for c in self.totals.values()),
            "windows": self.windows_written,
            "stages": stages,
            "exceptions": exceptions,
            "events": self._event_totals(),
            "recent_events": list(self.recent_events),
            "drift": {"count": self.drift_count, "recent": list(self.drift)},
        }

    def _event_totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for per in self.events.values():
            for name, n in per.items():
                out[name] = out.get(name, 0) + n
        return dict(sorted(out.items()))

    # -- persistence of the totals (a restarted extractor carries on) ---------------------------
    def state(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s, "lines": self.lines, "windows_written": self.windows_written,
            "first_time": self.first_time, "last_time": self.last_time, "drift_count": self.drift_count,
            "totals": {n: {"lines": c.lines, "levels": c.levels, "errors": c.errors, "warnings": c.warnings,
                           "stderr_lines": c.stderr_lines, "replicas": sorted(c.replicas), "last_error": c.last_error}
                       for n, c in self.totals.items()},
            "exceptions": list(self.exceptions.values()),
            "events": self.events, "recent_events": list(self.recent_events), "drift": list(self.drift),
            "written": sorted(self.written)[-100:],
        }

    def load(self, state: dict[str, Any]) -> None:
        self.lines = int(state.get("lines", 0))
        self.windows_written = int(state.get("windows_written", 0))
        self.first_time, self.last_time = state.get("first_time"), state.get("last_time")
        self.drift_count = int(state.get("drift_count", 0))
        for name, t in (state.get("totals") or {}).items():
            c = self.totals[name] = _StageCounts()
            c.lines, c.levels, c.errors = t["lines"], dict(t["levels"]), t["errors"]
            c.warnings, c.stderr_lines, c.replicas = t["warnings"], t.get("stderr_lines", 0), set(t["replicas"])
            c.last_error = t.get("last_error")
        for fact in state.get("exceptions") or []:
            self.exceptions[(fact["stage"], fact["type"])] = fact
        self.events = {s: dict(v) for s, v in (state.get("events") or {}).items()}
        self.recent_events.extend(state.get("recent_events") or [])
        self.drift.extend(state.get("drift") or [])
        self.written = set(state.get("written") or [])


class _Tracebacks:
    """Picks the Python tracebacks out of one stderr stream, line by line (chained ones whole)."""

    START = "Traceback (most recent call last)"
    CHAIN = ("During handling of the above exception", "The above exception was the direct cause")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.exc: tuple[str, str] | None = None
        self.chained = False
        self.t = 0.0

    def feed(self, e: LogEntry) -> LogEntry | None:
        """Take one stderr line; a finished traceback (as one entry) when this line ends one."""
        text = e.message
        done = None
        if self.lines and self.exc is not None:
            if not text.strip() or text.startswith(self.CHAIN):
                self.lines.append(text)
                self.chained = self.chained or text.startswith(self.CHAIN)
                return None
            if text.startswith(self.START) and self.chained:
                self.lines.append(text)
                self.exc, self.chained = None, False
                return None
            done = self.finish(e)
        if not self.lines:
            if text.startswith(self.START):
                self.lines, self.t = [text], e.time
            return done
        self.lines.append(text)
        if text and not text[0].isspace():
            m = _EXC_LINE.match(text)
            if m:
                self.exc = (m.group("type"), m.group("value") or "")
        return done

    def finish(self, e: LogEntry) -> LogEntry | None:
        """The traceback collected so far, if it has reached its exception line."""
        if self.exc is None:
            return None
        etype, value = self.exc
        tb = "\n".join(self.lines).rstrip()
        self.lines, self.exc, self.chained = [], None, False
        return LogEntry(self.t or e.time, e.stage, e.replica, "ERROR", f"{etype}: {value}" if value else etype,
                        {"type": etype.rpartition(".")[2], "value": value, "traceback": _cut(tb)},
                        kind="traceback")


class LogExtractor(Source):
    """Follows the run's logs and events; writes window facts and a summary (see the module)."""

    def __init__(self, window_s: float = WINDOW_S, poll_s: float = POLL_S, lateness_s: float = LATENESS_S,
                 summary_every_s: float = SUMMARY_EVERY_S, emit: bool = True, include_self: bool = False,
                 samples: int = 20) -> None:
        super().__init__()
        if window_s <= 0 or poll_s <= 0:
            raise ValueError("window_s and poll_s must be > 0")
        self.window_s, self.poll_s, self.lateness_s = float(window_s), float(poll_s), float(lateness_s)
        self.summary_every_s, self.emit, self.include_self = float(summary_every_s), bool(emit), bool(include_self)
        self.facts = Facts(self.window_s, samples=int(samples))
        self.tail: LogTail | None = None
        self.positions: dict[str, int] = {}
        self._tracebacks: dict[str, _Tracebacks] = {}
        self._dirty = False
        self._last_summary = 0.0
        self.out_file: Any = None

    # -- paths ------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.context.run_dir)

    @property
    def facts_path(self) -> Path:
        return self.run_dir / "logfacts.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "logfacts-summary.json"

    @property
    def cursor_path(self) -> Path:
        return self.run_dir / "state" / f"{self.context.name}.{self.context.replica}.logcursor.json"

    def _excluded(self, path: Path) -> bool:
        return not self.include_self and path.suffix == ".jsonl" and path.name.startswith(f"{self.context.name}.")

    # -- lifecycle --------------------------------------------------------------------------
    def setup(self) -> None:
        try:
            saved = json.loads(self.cursor_path.read_text())
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("window_s") == self.window_s:
            # the cursor file, not the runtime's snapshot: its offsets match the totals saved with it
            self.positions = dict(saved.get("positions") or {})
            self.facts.load(saved.get("facts") or {})
        logs = self.run_dir / "logs"
        self.tail = LogTail([logs / "*.jsonl", logs / "*.stderr", self.run_dir / "events.jsonl"],
                            positions=self.positions, exclude=self._excluded)
        self.facts_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_file = open(self.facts_path, "a", encoding="utf-8")
        from loguru import logger

        logger.info(f"log extractor: following {logs} and events.jsonl; facts every {self.window_s:g}s to {self.facts_path.name}")

    def snapshot(self) -> dict[str, Any]:
        return {"positions": self.tail.positions() if self.tail else self.positions}

    def restore(self, state: dict[str, Any]) -> None:
        self.positions = dict(state.get("positions") or {})

    def stats(self) -> dict[str, Any]:
        return {"lines": self.facts.lines, "errors": sum(c.errors for c in self.facts.totals.values()),
                "exception_types": len(self.facts.exceptions), "windows": self.facts.windows_written}

    def teardown(self) -> None:
        records = self.facts.flush(now=float("inf"))
        self._write(records)
        self._save(force=True)
        if self.tail is not None:
            self.tail.close()
        if self.out_file is not None:
            self.out_file.close()
            self.out_file = None

    # -- the loop ---------------------------------------------------------------------------
    def poll_once(self, now: float | None = None) -> list[Record]:
        """Read what the files gained, count it; the window records now complete."""
        assert self.tail is not None, "setup() first"
        for line in self.tail.read():
            if line.stream == "events.jsonl":
                try:
                    event = json.loads(line.text)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self.facts.add_event(event)
                    self._dirty = True
                continue
            entry = parse_line(line)
            if entry is None:
                continue
            self._dirty = True
            self.facts.add(entry)
            if entry.kind == "stderr":
                tb = self._tracebacks.setdefault(line.stream, _Tracebacks())
                done = tb.feed(entry)
                if done is not None:
                    self.facts.add(done)
        for stream, tb in self._tracebacks.items():   # a traceback is printed in one write
            done = tb.finish(LogEntry(time.time(), *ident_of(stream)[:2], "ERROR", ""))
            if done is not None:
                self.facts.add(done)
        records = self.facts.flush(now=time.time() if now is None else now, lateness=self.lateness_s)
        self._write(records)
        self._save()
        return records

    def generate(self) -> Iterator[Record | None]:
        next_poll = 0.0
        while True:
            t = time.monotonic()
            if t < next_poll:
                yield None
                continue
            next_poll = t + self.poll_s
            records = self.poll_once()
            if self.emit:
                yield from records
            yield None

    # -- files ------------------------------------------------------------------------------
    def _write(self, records: list[Record]) -> None:
        if records and self.out_file is not None:
            for rec in records:
                self.out_file.write(json.dumps(rec, default=json_default) + "\n")
            self.out_file.flush()
            self._dirty = True

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._dirty or now - self._last_summary < self.summary_every_s):
            return
        self._dirty, self._last_summary = False, now
        atomic_write(self.summary_path, json.dumps(self.facts.summary(), indent=1, default=json_default).encode())
        if self.tail is not None:
            cursor = {"window_s": self.window_s, "positions": self.tail.positions(), "facts": self.facts.state()}
            atomic_write(self.cursor_path, json.dumps(cursor, default=json_default).encode())

