"""window: tumbling, sliding and session windows per key over event time, each result emitted once.

    per_user:
      type: window
      inputs: [clicks]
      replicas: 2
      partition: key            # every record of one user reaches one replica
      key: user
      options: {key: user, time: t, kind: tumbling, size: 60, lateness: 5,
                aggregate: {clicks: count, spent: "sum:amount", basket: "mean:amount", top: "max:amount"}}

Kinds: ``tumbling`` (``size``: windows ``[k*size, (k+1)*size)``), ``sliding`` (``size`` and
``slide``: a window starts every ``slide``, so a record is in ``size / slide`` of them), ``session``
(``gap``: a key's records at most ``gap`` apart make one session; a record that bridges two
sessions merges them). Without ``key`` every record is of one key.

**Event time and the watermark.** ``time`` names a numeric field (seconds, or any ordered unit).
The watermark is the greatest event time the stage has seen less ``lateness`` (the disorder the
stream may have); it is knowledge of the data, not of a clock: a quiet stream closes nothing. A
window closes, and its result is emitted, once the watermark reaches its end (a session's end is
its last record's time plus ``gap``): no record within the lateness can still fall into it. So
whatever the batches, the interleaving of senders, restarts or SIGKILLs, the results are what
the same records windowed after the fact give (``tests/test_window.py`` checks it against a
brute-force reference). A record later than that (its window closed already; for a session, a
time behind the watermark) is *late*: it goes to the named output ``late`` when something reads
``window.late``, and to the dead-letter file with the reason otherwise; never dropped silently.

**Results.** One record per window: ``id`` (a 63-bit hash of the key and the window's start: the
same result made again after a crash is the same record to a deduplicating sink), ``key`` (or
the key field's own name), ``window_start``, ``window_end`` and one field per ``aggregate``:
``count``, ``sum:F``, ``mean:F``, ``min:F``, ``max:F`` over the numeric field ``F`` (a record whose
``F`` is not a number is dead-lettered, so every aggregate counts the same records), and with
``function: module:fn`` what ``fn(records)`` returns (a dict) for the window's records (kept in
the state until it closes: memory grows with them).

**End of stream.** When a finite stream ends (every sender's end of stream is in), ``finish``
closes every window still open and emits its result, before the end of stream goes on.

**State.** The open windows and the watermark are the stage's snapshot, so the runtime keeps them
exact through SIGKILLs (each record applied once, see *Guarantees*), and results travel under the
stage's own origin with their own ids (``own_ids``). With replicas, ``partition: key`` is required
(``validate`` says so): each key's records reach one replica, each replica keeps its own
watermark. A change of the replica count (``scale``, ``apply``, or ``replicas:`` edited between
runs) moves key groups between replicas, and their open windows move with them
(:meth:`Window.rescale`, see *Keyed state* in the README).

>>> w = Window(time="t", key="user", size=10, aggregate={"n": "count", "spent": "sum:amount"})
>>> w.process([{"user": "a", "t": 1, "amount": 2.0}, {"user": "b", "t": 3, "amount": 1.0},
...            {"user": "a", "t": 8, "amount": 3.0}])
[]
>>> [(r["user"], r["window_start"], r["n"], r["spent"]) for r in w.process([{"user": "a", "t": 12, "amount": 1.0}])]
[('a', 0, 2, 5.0), ('b', 0, 1, 1.0)]
>>> s = Window(time="t", kind="session", gap=5, lateness=10, aggregate={"n": "count"})
>>> [(r["window_start"], r["window_end"], r["n"])        # 12 joins neither: 4 + 5 < 12 < 20 - 5
...  for r in s.process([{"t": 0}, {"t": 4}, {"t": 20}, {"t": 12}])]       # the watermark is 20 - 10
[(0, 9, 2)]
>>> [(r["window_start"], r["window_end"], r["n"]) for r in s.process([{"t": 30}])]     # now 20
[(12, 17, 1)]
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.builtins.sides import Late, finite
from streampipe.stages.columns import Columns
from streampipe.stages.keys import BadKey, deal, key_bytes, window_id
from streampipe.stages.registry import load_target

OPS = ("count", "sum", "mean", "min", "max")


def parse_aggregates(spec: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """``{"spent": "sum:amount", "n": "count"}`` -> ``[("spent", "sum", "amount"), ("n", "count", None)]``."""
    out = []
    for name, text in spec.items():
        op, _, field = str(text).partition(":")
        if op not in OPS:
            raise ValueError(f"aggregate {name!r}: {text!r} is not one of {', '.join(OPS)} (as 'sum:field')")
        if (op == "count") != (not field):
            raise ValueError(f"aggregate {name!r}: {'count takes no field' if op == 'count' else f'{op} needs a field, as {op}:amount'}")
        out.append((name, op, field or None))
    return out


class Acc:
    """One window's aggregates: a count, and per field its n, sum, min and max; the records if kept."""

    __slots__ = ("key", "start", "end", "count", "fields", "records")

    def __init__(self, key: Any, start: float, end: float, fields: list[str], keep: bool) -> None:
        self.key, self.start, self.end, self.count = key, start, end, 0
        self.fields: dict[str, list[float]] = {f: [0.0, math.inf, -math.inf] for f in fields}   # sum, min, max
        self.records: list[Record] | None = [] if keep else None

    def add(self, values: dict[str, float], record: Record) -> None:
        self.count += 1
        for f, v in values.items():
            acc = self.fields[f]
            acc[0] += v
            acc[1] = min(acc[1], v)
            acc[2] = max(acc[2], v)
        if self.records is not None:
            self.records.append(record)

    def add_many(self, count: int, sums: dict[str, tuple[float, float, float]]) -> None:
        self.count += count
        for f, (total, lo, hi) in sums.items():
            acc = self.fields[f]
            acc[0] += total
            acc[1] = min(acc[1], lo)
            acc[2] = max(acc[2], hi)

    def merge(self, other: Acc) -> None:
        self.add_many(other.count, {f: (total, lo, hi) for f, (total, lo, hi) in other.fields.items()})
        if self.records is not None and other.records is not None:
            self.records.extend(other.records)
        self.start, self.end = min(self.start, other.start), max(self.end, other.end)

    def state(self) -> list[Any]:
        return [self.key, self.start, self.end, self.count, self.fields, self.records]

    @classmethod
    def load(cls, state: list[Any]) -> Acc:
        key, start, end, count, fields, records = state
        acc = cls(key, start, end, [], False)
        acc.count, acc.fields, acc.records = count, {f: list(v) for f, v in fields.items()}, records
        return acc


class Window(Stage):
    outputs = ("late",)
    own_ids = True
    columnar = True
    accepts_records = True

    def __init__(self, time: str, kind: Literal["tumbling", "sliding", "session"] = "tumbling",
                 size: float | None = None, slide: float | None = None, gap: float | None = None,
                 key: str | None = None, lateness: float = 0.0, aggregate: dict[str, str] | None = None,
                 function: str | None = None, columnar: bool = True) -> None:
        super().__init__()
        if kind == "session":
            if gap is None or not gap > 0 or size is not None or slide is not None:
                raise ValueError("a session window takes gap (> 0), not size or slide")
        else:
            if size is None or not size > 0 or gap is not None:
                raise ValueError(f"a {kind} window takes size (> 0), not gap")
            if kind == "sliding" and (slide is None or not 0 < slide <= size):
                raise ValueError("a sliding window takes slide, 0 < slide <= size")
            if kind == "tumbling" and slide is not None:
                raise ValueError("a tumbling window takes no slide (a sliding one does)")
        if not lateness >= 0:
            raise ValueError("lateness must be >= 0")
        self.time, self.kind, self.key_field, self.lateness = time, kind, key, float(lateness)
        self.size = float(size) if size is not None else 0.0
        self.slide = float(slide) if kind == "sliding" and slide is not None else self.size
        self.gap = float(gap) if gap is not None else 0.0
        self.aggregates = parse_aggregates(aggregate if aggregate is not None else {"count": "count"})
        self.fields = sorted({f for _, _, f in self.aggregates if f})
        self.function_name = function
        self.function: Callable[[list[Record]], dict[str, Any]] | None = None
        self.columnar = bool(columnar) and kind == "tumbling" and function is None
        self.windows: dict[tuple[bytes, float], Acc] = {}        # tumbling / sliding: (key, start) -> window
        self.sessions: dict[bytes, list[Acc]] = {}                # session: key -> its open sessions by start
        self.heap: list[tuple[float, int, bytes, float]] = []     # (end, seq, key, start): what closes first
        self.seq = 0
        self.newest: float | None = None
        self.emitted = 0
        self.lates = Late()                  # the late records: counted, to the `late` output or dead-lettered

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        if self.function_name:
            self.function = load_target(self.function_name, self.context.config_dir)

    def snapshot(self) -> dict[str, Any]:
        accs = list(self.windows.values()) + [a for group in self.sessions.values() for a in group]
        return {"newest": self.newest, "emitted": self.emitted, "late": self.lates.count,
                "windows": [a.state() for a in accs]}

    def restore(self, state: dict[str, Any]) -> None:
        self.newest, self.emitted = state.get("newest"), int(state.get("emitted", 0))
        self.lates.count = int(state.get("late", 0))
        self.windows, self.sessions, self.heap = {}, {}, []
        for saved in state.get("windows", []):
            acc = Acc.load(saved)
            kb = key_bytes(acc.key)
            if self.kind == "session":
                self.sessions.setdefault(kb, []).append(acc)
            else:
                self.windows[(kb, acc.start)] = acc
            self._schedule(kb, acc)
        for group in self.sessions.values():
            group.sort(key=lambda a: a.start)

    @classmethod
    def rescale(cls, states: list[dict[str, Any]], replicas: int) -> list[dict[str, Any]]:
        """The open windows of every old replica dealt to ``replicas`` new ones by key group (the
        runtime calls this when the replica count changes, every replica stopped). Each new
        replica's watermark is the newest of the old ones': no window one of them closed can open
        again, so none is emitted twice.

        >>> a, b = Window(time="t", key="k", size=10), Window(time="t", key="k", size=10)
        >>> _ = a.process([{"k": "x", "t": 1}, {"k": "a", "t": 2}]); _ = b.process([{"k": "y", "t": 30}])
        >>> new = Window.rescale([a.snapshot(), b.snapshot(), {}], 2)     # keys x, y: replica 0; a: 1
        >>> [sorted(w[0] for w in s["windows"]) for s in new], [s["newest"] for s in new]
        ([['x', 'y'], ['a']], [30, 30])
        """
        newest = max((s["newest"] for s in states if s.get("newest") is not None), default=None)
        windows = deal([w for s in states for w in s.get("windows") or []], replicas, key_of=lambda w: w[0])
        out = [{"newest": newest, "emitted": 0, "late": 0, "windows": ws} for ws in windows]
        out[0]["emitted"] = sum(int(s.get("emitted", 0)) for s in states)    # the totals stay counted once
        out[0]["late"] = sum(int(s.get("late", 0)) for s in states)
        return out

    @property
    def watermark(self) -> float | None:
        return None if self.newest is None else self.newest - self.lateness

    # -- taking records ----------------------------------------------------------------------
    def process(self, batch: Batch | Columns) -> list[Record]:  # type: ignore[override]
        if isinstance(batch, Columns):
            self.take_columns(batch)
        else:
            for record in batch:
                self.take(record)
        return self.lates.take() + self.close()

    def route(self, record: Record) -> str:
        return self.lates.route(record)

    def take(self, record: Record) -> None:
        t = record.get(self.time)
        if not finite(t):
            self.reject(record, f"no event time: field {self.time!r} must be a finite number")
            return
        key = record.get(self.key_field) if self.key_field else None
        if self.key_field and self.key_field not in record:
            self.reject(record, f"no key: field {self.key_field!r} is missing")
            return
        try:
            kb = key_bytes(key)
        except BadKey as exc:
            self.reject(record, f"field {self.key_field!r}: {exc}")
            return
        values: dict[str, float] = {}
        for f in self.fields:
            v = record.get(f)
            if not finite(v):
                self.reject(record, f"field {f!r} must be a finite number (it is aggregated)")
                return
            values[f] = float(v)
        if self.newest is None or t > self.newest:
            self.newest = t
        if self.kind == "session":
            self._take_session(kb, key, t, values, record)
            return
        starts = self.starts(t)
        wm = self.watermark
        if wm is not None and starts[0] + self.size <= wm:      # its first window closed already
            self._set_late(record, f"event time {t:g} behind the watermark {wm:g}: its window "
                                   f"[{starts[0]:g}, {starts[0] + self.size:g}) closed")
            return
        for start in starts:
            acc = self.windows.get((kb, start))
            if acc is None:
                acc = self.windows[(kb, start)] = Acc(key, start, start + self.size, self.fields, self.function is not None)
                self._schedule(kb, acc)
            acc.add(values, record)

    def starts(self, t: float) -> list[float]:
        """The starts of the windows ``t`` falls in, earliest first."""
        last = math.floor(t / self.slide)
        first = math.floor((t - self.size) / self.slide) + 1
        return [_num(k * self.slide) for k in range(first, last + 1)]

    def _take_session(self, kb: bytes, key: Any, t: float, values: dict[str, float], record: Record) -> None:
        wm = self.watermark
        if wm is not None and t < wm:
            self._set_late(record, f"event time {t:g} behind the watermark {wm:g} (session gap {self.gap:g})")
            return
        group = self.sessions.setdefault(kb, [])
        new = Acc(key, t, t, self.fields, self.function is not None)
        new.add(values, record)
        keep = []
        for acc in group:                    # a session within gap of t joins, however many
            if acc.start - self.gap <= t <= acc.end + self.gap:
                new.merge(acc)
            else:
                keep.append(acc)
        keep.append(new)
        keep.sort(key=lambda a: a.start)
        self.sessions[kb] = keep
        self._schedule(kb, new)

    def _schedule(self, kb: bytes, acc: Acc) -> None:
        self.seq += 1
        end = acc.end + self.gap if self.kind == "session" else acc.end
        heapq.heappush(self.heap, (end, self.seq, kb, acc.start))

    def _set_late(self, record: Record, why: str) -> None:
        self.lates.add(self, record, why)

    # -- columns: a tumbling window's aggregates by numpy, per (key, window) group ------------
    def take_columns(self, batch: Columns) -> None:
        n = len(batch)
        if not n:
            return
        t = batch.data.get(self.time)
        keys = batch.data.get(self.key_field) if self.key_field else None
        usable = isinstance(t, np.ndarray) and t.ndim == 1 and t.dtype.kind in "iuf" and bool(np.isfinite(t).all())
        usable = usable and (keys is None or (isinstance(keys, np.ndarray) and keys.ndim == 1 and keys.dtype.kind in "iuU"))
        values = {f: batch.data.get(f) for f in self.fields}
        usable = usable and all(isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iuf"
                                and bool(np.isfinite(v).all()) for v in values.values())
        if not usable:       # anything a row-by-row look must judge: the records path
            for record in batch.to_records():
                self.take(record)
            return
        assert isinstance(t, np.ndarray)
        keys = None if keys is None else np.asarray(keys)
        cols: dict[str, np.ndarray] = {f: np.asarray(v) for f, v in values.items()}
        tf = t.astype(float)
        starts = np.floor(tf / self.size) * self.size
        before = -math.inf if self.newest is None else self.newest
        newest = np.maximum(np.maximum.accumulate(tf), before)       # the newest time as each row arrives
        late = starts + self.size <= newest - self.lateness
        if float(newest[-1]) > before:
            self.newest = _num(float(newest[-1]))
        if late.any():
            for i in np.flatnonzero(late).tolist():
                record = batch.rows(i, i + 1).to_records()[0]
                self._set_late(record, f"event time {record[self.time]} behind the watermark: its window closed")
            keep = ~late
            starts, tf = starts[keep], tf[keep]
            keys = keys[keep] if keys is not None else None
            cols = {f: v[keep] for f, v in cols.items()}
            if not len(starts):
                return
        if keys is None:
            key_index, key_values = np.zeros(len(starts), dtype=np.int64), [None]
        else:
            uniq, key_index = np.unique(keys, return_inverse=True)
            key_values = uniq.tolist()
        ustarts, start_index = np.unique(starts, return_inverse=True)
        group = key_index.astype(np.int64) * len(ustarts) + start_index
        order = np.argsort(group, kind="stable")
        sorted_groups = group[order]
        bounds = np.flatnonzero(np.diff(sorted_groups)) + 1
        firsts = np.concatenate(([0], bounds))
        counts = np.diff(np.concatenate((firsts, [len(order)])))
        reduced = {f: (np.add.reduceat(v[order].astype(float), firsts), np.minimum.reduceat(v[order], firsts),
                       np.maximum.reduceat(v[order], firsts)) for f, v in cols.items()}
        gids = sorted_groups[firsts].tolist()
        width = len(ustarts)
        for j, gid in enumerate(gids):
            key = key_values[gid // width]
            start = _num(ustarts[gid % width].item())
            kb = key_bytes(key)
            acc = self.windows.get((kb, start))
            if acc is None:
                acc = self.windows[(kb, start)] = Acc(key, start, _num(start + self.size), self.fields, False)
                self._schedule(kb, acc)
            acc.add_many(int(counts[j]), {f: (float(s[j]), float(lo[j]), float(hi[j])) for f, (s, lo, hi) in reduced.items()})

    # -- closing -----------------------------------------------------------------------------
    def finish(self) -> list[Record]:
        """The input ended: every window still open closes (as if the watermark were past them all)."""
        self.lates.ids.clear()           # what finish returns are results, none late
        return self.close(math.inf)

    def close(self, upto: float | None = None) -> list[Record]:
        """Every window the watermark (or ``upto``) has reached: its result, once."""
        wm = self.watermark if upto is None else upto
        out: list[Record] = []
        while self.heap and wm is not None and self.heap[0][0] <= wm and (self.kind != "session" or self.heap[0][0] < wm):
            end, _, kb, start = heapq.heappop(self.heap)
            if self.kind == "session":
                group = self.sessions.get(kb, [])
                acc = next((a for a in group if a.start == start and a.end + self.gap == end), None)
                if acc is None:
                    continue          # merged into another session since: its own entry closes it
                group.remove(acc)
                if not group:
                    del self.sessions[kb]
            else:
                acc = self.windows.pop((kb, start), None)
                if acc is None:
                    continue
            out.append(self.result(acc))
        self.emitted += len(out)
        return out

    def result(self, acc: Acc) -> Record:
        end = acc.end + self.gap if self.kind == "session" else acc.end
        row: Record = {"id": window_id(acc.key, acc.start), self.key_field or "key": acc.key,
                       "window_start": acc.start, "window_end": _num(end)}
        for name, op, field in self.aggregates:
            if op == "count":
                row[name] = acc.count
                continue
            assert field is not None
            total, lo, hi = acc.fields[field]
            row[name] = {"sum": total, "mean": total / acc.count if acc.count else None,
                         "min": _num(lo), "max": _num(hi)}[op]
        if self.function is not None and acc.records is not None:
            extra = self.function(acc.records)
            if not isinstance(extra, dict):
                raise TypeError(f"{self.function_name} returned {type(extra).__name__}, not a dict")
            row.update(extra)
        return row

    def stats(self) -> dict[str, Any]:
        return {"open": len(self.windows) + sum(len(g) for g in self.sessions.values()), "emitted": self.emitted,
                "late": self.lates.count, "watermark": self.watermark}


def _num(x: float) -> float | int:
    """An integral float as an int (window bounds of integer times stay integers in the output)."""
    return int(x) if isinstance(x, float) and x.is_integer() and abs(x) < 2 ** 53 else x
