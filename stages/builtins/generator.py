"""generator: a synthetic labelled stream, or the replay of a CSV / JSON-lines file.

Synthetic records look like ``{"id": 42, "t": 1764130000.1, "x": [8 floats], "y": 1}``: ``x`` is
drawn around per-feature offsets and scales (so scaling matters), ``y`` is a linear concept of
``x`` plus label noise (so a linear model can learn it), and at ``drift_at`` the concept rotates
(so a learner must adapt). The stream is deterministic in ``seed``: record ``i`` is the same in
every run and however many replicas share the stream, which is what makes a restarted or
repartitioned generator replay exactly what was lost. Each record's values are a function of
``(seed, id)`` alone (a counter-based hash, SplitMix64, rather than a sequential RNG), so a
replica that owns every n-th id computes only those: with a sequential RNG every replica drew
every record and kept 1/n of them. Normals come from the hash through a table of the inverse
normal CDF (linear between 65,537 points; only the outer 1/65,536 of each tail is approximate).

Options:
    rate            records per second, 0 = as fast as downstream takes them
    count           stop after this many records (finite stream), None = endless
    seed            the stream's seed
    features        length of ``x``
    classes         number of labels (2 = binary)
    noise           fraction of labels flipped at random
    drift_at        record id at which the concept changes (None = never)
    malformed_every every N-th record is malformed on purpose (0 = never), for dead-letter demos
    file            replay this CSV (header row) or .jsonl file instead (relative to the config)
    loop            replay the file again from the start when it ends (endless)
    columnar        send the synthetic stream as columns (:mod:`streampipe.stages.columns`):
                    batches of ``max_batch`` records made in one numpy pass, the same records as
                    ``generate()`` gives except that ``t`` is taken once per batch (default true;
                    a replayed file is always sent as records)

Partitioning: replica ``r`` of ``n`` owns the ids ``r, r + n, r + 2n, ...`` and emits them in
increasing order. Its position is the set of ids it has left, as arithmetic progressions
(:mod:`streampipe.stages.segments`); :meth:`Generator.repartition` deals the leftovers of every replica to a
new replica count, so a change of ``replicas`` between runs neither skips nor repeats an id.

A replayed file runs in one replica (``validate`` refuses ``replicas > 1`` with ``file``). A
line it cannot parse (bad JSON, not an object, undecodable bytes, a CSV row of the wrong width)
goes to the dead-letter file with the file name, its line number and the reason, and the replay
goes on.

>>> g = Generator(count=3, seed=1)
>>> [r["id"] for r in g.generate()]
[0, 1, 2]
>>> g2 = Generator(count=3, seed=1); g2.restore({"next": 2}); [r["id"] for r in g2.generate()]
[2]
>>> Generator.repartition([{"segments": [[5, 1, None]]}], 2)
[{'segments': [[5, 2, None]]}, {'segments': [[6, 2, None]]}]
>>> cols = next(Generator(count=3, seed=1).generate_columns())
>>> cols["id"].tolist(), cols["x"].shape, cols.to_records()[2]["x"] == list(Generator(count=3, seed=1).generate())[2]["x"]
([0, 1, 2], (3, 8), True)
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from streampipe.stages import segments
from streampipe.stages.api import Record, Source
from streampipe.stages.columns import Column, Columns

_END: dict = {}  # sentinel: the wrapped stream is over
CHUNK = 1024   # records drawn at once on the records path: one numpy pass per record would cost ~50x more
_MASK = (1 << 64) - 1
_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64s: every output bit depends on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _bits32(key: np.uint64, ids: np.ndarray, k: int) -> np.ndarray:
    """``k`` random uint32s for each id, from a counter-based stream: the 64 bits of
    ``mix(key + (i * h + j) * golden)`` give values ``2j`` and ``2j + 1`` of id ``i`` (``h`` = half
    of ``k``, rounded up), so any set of ids is drawn without drawing the others."""
    h = (k + 1) // 2
    counters = ids.astype(np.uint64)[:, None] * np.uint64(h) + np.arange(h, dtype=np.uint64)
    return _mix(counters * _GOLDEN + key).view(np.uint32)[:, :k]


def _inverse_normal_table() -> np.ndarray:
    from scipy.special import ndtri  # scikit-learn's dependency

    u = np.arange(_TABLE + 1) / _TABLE
    u[0], u[-1] = 2.0 ** -33, 1 - 2.0 ** -33
    return ndtri(u)


_TABLE = 1 << 16
_INV = _inverse_normal_table()
_INV_STEP = np.diff(_INV)


def _normal(bits: np.ndarray) -> np.ndarray:
    """Standard normals from uint32s: the inverse normal CDF, interpolated linearly in a table of
    65,537 points (exact to ~1e-9 in the body; the outer 1/65,536 of each tail is a straight line)."""
    idx = (bits >> np.uint32(16)).astype(np.intp)
    return _INV[idx] + _INV_STEP[idx] * ((bits & np.uint32(0xFFFF)) * (1.0 / _TABLE))


class Generator(Source):
    columnar = True
    def __init__(self, rate: float = 0, count: int | None = None, seed: int = 7, features: int = 8,
                 classes: int = 2, noise: float = 0.05, drift_at: int | None = None,
                 malformed_every: int = 0, file: str | None = None, loop: bool = False, columnar: bool = True) -> None:
        super().__init__()
        self.columnar = bool(columnar) and not file
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate, self.count, self.seed = float(rate), count, int(seed)
        self.features, self.classes, self.noise = int(features), int(classes), float(noise)
        self.drift_at, self.malformed_every = drift_at, int(malformed_every)
        self.file, self.loop = file, loop
        self.segments: list[segments.Segment] | None = None   # ids left (None: a fresh replica's share)
        self.last: int | None = None   # the last id emitted from ``segments``
        self.next = 0            # replay: next record id to give a line without one
        self.offset = 0          # replay: bytes read of the file
        self.line = 0            # replay: lines read of the file (for dead letters)
        self.last_id: int | None = None   # replay: the file's own last id (they must increase)
        self.emitted = 0
        concept = np.random.default_rng([self.seed, 1 << 30])
        self.offsets = concept.normal(0, 5, self.features)
        self.scales = concept.uniform(0.5, 10, self.features)
        self.w_before = concept.normal(0, 1, (self.features, max(1, self.classes if self.classes > 2 else 1)))
        self.w_after = concept.normal(0, 1, self.w_before.shape)
        self._key = _mix(np.array([self.seed & _MASK], np.uint64))[0]
        # the records path's last draw: first id, step, x and y of CHUNK ids as lists
        self._rows: tuple[int, int, list[list[float]], list[int]] = (0, 1, [], [])

    # -- the synthetic stream -------------------------------------------------------------
    def _draw(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` and ``y`` of the records ``ids``: each a function of (seed, id) alone (:func:`_bits32`),
        so a replica computes only its own ids, whatever their stride, and record ``i`` is the
        same however many replicas share the stream."""
        f = self.features
        bits = _bits32(self._key, ids, f + 2)                  # per id: one per feature, flip, label
        z = _normal(np.ascontiguousarray(bits[:, :f]))
        if self.drift_at is None or int(ids[-1]) < self.drift_at:
            score = z @ self.w_before
        elif int(ids[0]) >= self.drift_at:
            score = z @ self.w_after
        else:
            score = np.where((ids >= self.drift_at)[:, None], z @ self.w_after, z @ self.w_before)
        y = score.argmax(axis=1) if self.classes > 2 else (score[:, 0] > 0).astype(np.int64)
        flip = bits[:, f] < np.uint32(self.noise * (1 << 32))
        if flip.any():
            y = np.where(flip, bits[:, f + 1] % np.uint32(max(2, self.classes)), y).astype(np.int64)
        x = z * self.scales + self.offsets
        return np.round(x, 6), y

    def synthetic(self, i: int) -> Record:
        start, step, xs, ys = self._rows
        k, off = divmod(i - start, step)
        if off or not 0 <= k < len(ys):    # draw this id and the next CHUNK - 1 of its segment, one numpy pass
            step = next((d for s, d, e in self.segments or [] if i >= s and (i - s) % d == 0 and (e is None or i < e)), 1)
            x, y = self._draw(np.arange(i, i + CHUNK * step, step, dtype=np.int64))
            start, xs, ys, k = i, x.tolist(), y.tolist(), 0
            self._rows = (start, step, xs, ys)
        record: Record = {"id": i, "t": time.time(), "x": xs[k], "y": ys[k]}
        if self.malformed_every and (i + 1) % self.malformed_every == 0:
            record["x"] = "not-a-vector"
        return record

    def generate_columns(self) -> Iterator[Columns | None]:
        """The synthetic stream as :class:`Columns` batches of ``context.max_batch`` records (fewer
        when ``rate`` holds them back; None while it says wait): the records of :meth:`generate`,
        ``t`` taken once per batch, cut where the runtime cuts batches of records."""
        if self.file:
            raise TypeError("a replayed file is sent as records: use generate()")
        if self.segments is None:
            self.segments = _own_segments({}, self.context.replica, self.context.replicas)
        start, sent = time.monotonic(), 0
        while True:
            k = max(1, self.context.max_batch)
            if self.rate > 0:
                k = min(k, int((time.monotonic() - start) * self.rate) - sent + 1)
                if k <= 0:
                    yield None
                    continue
            ids = self._next_ids(k)
            if not len(ids):
                return
            sent += len(ids)
            self.emitted += len(ids)
            self.last = int(ids[-1])
            yield self._columns(ids)

    def _next_ids(self, k: int) -> np.ndarray:
        """The next ``k`` ids of this replica's segments after ``last`` (fewer at ``count``)."""
        parts = []
        for start, step, stop in segments.after(self.segments or [], self.last):
            hi = start + k * step if stop is None else min(stop, start + k * step)
            parts.append(np.arange(start, hi, step, dtype=np.int64))
        if not parts:
            return np.empty(0, np.int64)
        ids = parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts))[:k]
        return ids[ids < self.count] if self.count is not None else ids

    def _columns(self, ids: np.ndarray) -> Columns:
        x, y = self._draw(ids)
        xs: Column = x
        if self.malformed_every:
            bad = np.flatnonzero((ids + 1) % self.malformed_every == 0)
            if len(bad):
                listed: list[Any] = x.tolist()
                for i in bad.tolist():
                    listed[i] = "not-a-vector"
                xs = listed
        return Columns({"id": ids, "t": np.full(len(ids), time.time()), "x": xs, "y": y}, len(ids))

    # -- replay of a file -----------------------------------------------------------------
    def replay(self) -> Iterator[Record | None]:
        path = self.context.resolve_input(self.file or "")
        jsonl = path.suffix in (".jsonl", ".ndjson", ".json")
        while True:
            with open(path, "rb") as f:
                header: list[str] | None = None
                if not jsonl:
                    header = next(csv.reader([f.readline().decode(errors="replace")]), [])
                    if self.offset < f.tell():
                        self.offset, self.line = f.tell(), 1
                f.seek(self.offset)
                for raw in iter(f.readline, b""):
                    self.offset += len(raw)
                    self.line += 1
                    try:
                        record = _parse(raw, header)
                    except ValueError as exc:
                        text = raw.decode(errors="replace").rstrip("\r\n")
                        self.reject({"file": str(path), "line": self.line, "text": text[:2000]},
                                    f"{path.name}:{self.line}: {exc}")
                        yield None            # the runtime dead-letters it now and keeps beating
                        continue
                    if record is None:
                        continue
                    own = record.get("id")
                    if type(own) is int and self.last_id is not None and own <= self.last_id:
                        self.reject(record, f"{path.name}:{self.line}: id {own} repeats or goes back (after {self.last_id}): "
                                            "the ids of a replayed file must increase, or a sink takes this row for a duplicate")
                        yield None
                        continue
                    if type(own) is int:
                        self.last_id = own
                    record.setdefault("id", self.next)
                    record.setdefault("t", time.time())
                    self.next += 1
                    if self.count is not None and self.next > self.count:
                        return
                    yield record
            if not self.loop:
                return
            self.offset = self.line = 0
            self.last_id = None               # a pass of a looped file may give its ids again
            yield None                        # an empty file must not spin without a beat

    def generate(self) -> Iterator[Record | None]:
        if self.file:
            yield from self.paced(self.replay())
            return
        if self.segments is None:
            self.segments = _own_segments({}, self.context.replica, self.context.replicas)

        if self.rate > 0:
            def synthetic() -> Iterator[Record]:
                for i in segments.ids(self.segments or []):
                    if self.count is not None and i >= self.count:
                        return
                    self.last = i
                    yield self.synthetic(i)

            yield from self.paced(synthetic())
            return
        yield from self._unpaced()

    def _unpaced(self) -> Iterator[Record]:
        """The synthetic stream at full speed: ``CHUNK`` ids drawn in one numpy pass, each record
        then built and yielded with no generator in between (what :meth:`paced` over
        :meth:`synthetic` gives at ``rate`` 0, record for record)."""
        every = self.malformed_every
        while len(ids := self._next_ids(CHUNK)):
            x, y = self._draw(ids)
            for i, xi, yi in zip(ids.tolist(), x.tolist(), y.tolist()):
                self.last = i
                self.emitted += 1
                if every and (i + 1) % every == 0:
                    xi = "not-a-vector"
                yield {"id": i, "t": time.time(), "x": xi, "y": yi}

    def paced(self, records: Iterator[Record | None]) -> Iterator[Record | None]:
        """Yield at most ``rate`` records a second (None while ahead of schedule).

        A record is made only once its slot has come, so its event time ``t`` is when it was
        released, not when it started waiting.
        """
        start, sent = time.monotonic(), 0
        while True:
            if self.rate > 0:
                while sent >= (time.monotonic() - start) * self.rate:
                    yield None
            record = next(records, _END)
            if record is _END:
                return
            if record is None:
                yield None
                continue
            sent += 1
            self.emitted += 1
            yield record

    def snapshot(self) -> dict[str, Any]:
        if self.file:
            return {"next": self.next, "offset": self.offset, "line": self.line, "last_id": self.last_id}
        left = segments.after(self.segments, self.last) if self.segments is not None else None
        return {} if left is None else {"segments": left}

    def restore(self, state: dict[str, Any]) -> None:
        self.next = int(state.get("next", 0))
        self.offset = int(state.get("offset", 0))
        self.line = int(state.get("line", 0))
        last = state.get("last_id")
        self.last_id = last if type(last) is int else None
        self.segments = _own_segments(state, self.context.replica, self.context.replicas)
        self.last = None

    @classmethod
    def repartition(cls, states: list[dict[str, Any]], replicas: int) -> list[dict[str, Any]]:
        """The states of ``replicas`` new replicas that share exactly the ids ``states`` had left.

        ``states[r]`` is what replica ``r`` of ``len(states)`` saved (``{}``: it never saved, so
        it still owns its whole share). Called by the supervisor when ``replicas`` changed.
        """
        n = len(states)
        layout = [_own_segments(state, r, n) for r, state in enumerate(states)]
        return [{"segments": left} for left in segments.deal(layout, replicas)]

    def stats(self) -> dict[str, Any]:
        if self.file:
            return {"next_id": self.next, "line": self.line, "emitted": self.emitted}
        left = segments.after(self.segments or [], self.last)
        return {"next_id": segments.first(left), "emitted": self.emitted}


def _own_segments(state: dict[str, Any], replica: int, replicas: int) -> list[segments.Segment]:
    """The ids a replica has left, from its saved state: ``segments``, or the position of an
    earlier version (``next``: a replica-local counter, ids ``next * replicas + replica`` on)."""
    if "segments" in state:
        return [segments.check(s) for s in state["segments"]]
    return [[int(state.get("next", 0)) * replicas + replica, replicas, None]]


def _parse(raw: bytes, header: list[str] | None) -> Record | None:
    """One line of a replayed file as a record (None: a blank line); ValueError says why not."""
    try:
        line = raw.decode().strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"undecodable bytes at column {exc.start + 1}: {exc.reason}") from None
    if not line:
        return None
    if header is None:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"bad JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
        return value
    return _csv_record(header, line)


def _csv_record(header: list[str], line: str) -> Record:
    try:
        values = next(csv.reader([line]))
    except csv.Error as exc:
        raise ValueError(f"bad CSV: {exc}") from None
    if len(values) != len(header):
        raise ValueError(f"{len(values)} fields where the header has {len(header)}")
    record: Record = {}
    for key, value in zip(header, values):
        record[key] = _number(value)
    return record


def _number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
