"""The peers' stage work, written once here and never taken from streampipe: the fixed baseline.

``throughput.py --peers`` compares streampipe with bytewax, a ``multiprocessing.Queue`` pipeline
and a raw pyzmq chain doing the same job. If those ran streampipe's own stage code, a slower
streampipe stage would slow its baselines with it, and the ratios would hide it. So the job is
here, in plain Python and numpy, frozen (change it only to fix it, and say so in the README):

- :func:`batches`: the records of streampipe's ``generator`` (``seed`` 7, 8 features, 2 classes,
  5 % label noise, no drift): ``{"id", "t", "x": [8 floats], "y"}``, the same values for the same
  ids (each a function of (seed, id): SplitMix64 bits, normals through a table of the inverse
  normal CDF), ``t`` = ``time.time()`` when the record is made; worker ``i`` of ``n`` makes the
  ids ``i, i + n, ...`` below ``count``, in lists of :data:`BATCH` records;
- :func:`check`: the normalizer's validation (a map; ``id`` and ``y`` ints, ``x`` a non-empty list
  of the stream's width; exact types, so a bool is no int);
- :class:`BatchNormalizer`: the normalizer's work per batch in numpy (running mean and variance
  merged per batch, Chan et al.; population std, 0 -> 1; 6 decimals), records out as new dicts;
- :class:`RecordNormalizer`: the same per record in plain Python (Welford), as a bytewax user
  writes a ``filter_map``;
- :func:`seen`: the per-record user stage of the issue, ``{**r, "seen": 1}``;
- :class:`JsonLines`: the sink, one ``orjson.dumps`` line per record, one ``write`` + ``flush``
  per batch.

>>> first = next(batches(3, 0, 1))
>>> [r["id"] for r in first], len(first[0]["x"]), first[0]["y"] in (0, 1)
([0, 1, 2], 8, True)
>>> n = RecordNormalizer()
>>> n({"id": 0, "x": [1.0, 10.0], "y": 0})["x"], n({"id": 1, "x": [3.0, 30.0], "y": 1})["x"]
([0.0, 0.0], [1.0, 1.0])
>>> n({"id": 2, "x": "oops", "y": 0}) is None
True
>>> [r["x"] for r in BatchNormalizer()([{"id": 0, "x": [1.0, 10.0], "y": 0}, {"id": 1, "x": [3.0, 30.0], "y": 1}])]
[[-1.0, -1.0], [1.0, 1.0]]
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

SEED = 7             # throughput.py's SEED
BATCH = 1000         # records per batch: streampipe's default max_batch when this was written
FEATURES, NOISE = 8, 0.05
TABLE = 1 << 16      # points of the inverse normal CDF table
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1

Record = dict[str, Any]


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _inverse_normal() -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import ndtri

    u = np.arange(TABLE + 1) / TABLE
    u[0], u[-1] = 2.0 ** -33, 1 - 2.0 ** -33
    inv = ndtri(u)
    return inv, np.diff(inv)


class _Stream:
    """``x`` and ``y`` of any set of ids, for one seed."""

    def __init__(self, seed: int = SEED) -> None:
        concept = np.random.default_rng([seed, 1 << 30])
        self.offsets = concept.normal(0, 5, FEATURES)
        self.scales = concept.uniform(0.5, 10, FEATURES)
        self.w = concept.normal(0, 1, (FEATURES, 1))
        self.key = _mix(np.array([seed & _MASK], np.uint64))[0]
        self.inv, self.step = _inverse_normal()

    def draw(self, ids: np.ndarray) -> tuple[list[list[float]], list[int]]:
        k = FEATURES + 2                                   # per id: a value per feature, a flip, a label
        h = (k + 1) // 2
        counters = ids.astype(np.uint64)[:, None] * np.uint64(h) + np.arange(h, dtype=np.uint64)
        bits = _mix(counters * _GOLDEN + self.key).view(np.uint32)[:, :k]
        b = np.ascontiguousarray(bits[:, :FEATURES])
        idx = (b >> np.uint32(16)).astype(np.intp)
        z = self.inv[idx] + self.step[idx] * ((b & np.uint32(0xFFFF)) * (1.0 / TABLE))
        y = ((z @ self.w)[:, 0] > 0).astype(np.int64)
        flip = bits[:, FEATURES] < np.uint32(NOISE * (1 << 32))
        if flip.any():
            y = np.where(flip, bits[:, FEATURES + 1] % np.uint32(2), y).astype(np.int64)
        return np.round(z * self.scales + self.offsets, 6).tolist(), y.tolist()


def batches(count: int, worker: int = 0, workers: int = 1, size: int = BATCH) -> Iterator[list[Record]]:
    """Lists of ``size`` records (the last one shorter): ids ``worker, worker + workers, ...`` below ``count``."""
    stream = _Stream()
    ids = np.arange(worker, count, workers, dtype=np.int64)
    for start in range(0, len(ids), size):
        part = ids[start:start + size]
        xs, ys = stream.draw(part)
        yield [{"id": i, "t": time.time(), "x": x, "y": y} for i, x, y in zip(part.tolist(), xs, ys)]


def check(record: Any, width: int | None) -> bool:
    """Whether the normalizer takes ``record`` (``width``: the vector length seen so far, if any)."""
    if type(record) is not dict or type(record.get("id")) is not int or type(record.get("y")) is not int:
        return False
    x = record.get("x")
    return type(x) is list and len(x) > 0 and (width is None or len(x) == width)


class BatchNormalizer:
    """The normalizer's batch work: validate, drop non-finite rows, merge the batch into the running
    statistics, standardise. Called with a list of records, returns the scaled ones."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def __call__(self, batch: list[Record]) -> list[Record]:
        width = None if self.mean is None else len(self.mean)
        good = [r for r in batch if check(r, width)]
        if not good:
            return []
        try:
            x = np.asarray([r["x"] for r in good], dtype=np.float64)
        except (TypeError, ValueError):
            return []
        if x.ndim != 2:
            return []
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            good, x = [r for r, ok in zip(good, finite.tolist()) if ok], x[finite]
        if not good:
            return []
        nb, mb = x.shape[0], x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
        else:
            n = self.n + nb
            delta = mb - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
            self.n = n
        std = np.sqrt(self.m2 / self.n)
        std[std == 0] = 1.0
        scaled = ((x - self.mean) / std).round(6).tolist()
        return [{**r, "x": s} for r, s in zip(good, scaled)]


class RecordNormalizer:
    """The normalizer one record at a time, in plain Python: statistics that include the record
    itself (Welford), the same validation and scaling; None for a record it drops."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: list[float] = []
        self.m2: list[float] = []

    def __call__(self, record: Record) -> Record | None:
        if not check(record, len(self.mean) if self.n else None):
            return None
        x = record["x"]
        if not all(type(v) in (int, float) and math.isfinite(v) for v in x):
            return None
        if not self.n:
            self.mean, self.m2 = [0.0] * len(x), [0.0] * len(x)
        self.n += 1
        n, mean, m2 = self.n, self.mean, self.m2
        scaled = []
        for i, v in enumerate(x):
            delta = v - mean[i]
            mean[i] += delta / n
            m2[i] += delta * (v - mean[i])
            std = math.sqrt(m2[i] / n) or 1.0
            scaled.append(round((v - mean[i]) / std, 6))
        return {**record, "x": scaled}


def seen(record: Record) -> Record:
    """The per-record user stage: a new record with one more field."""
    return {**record, "seen": 1}


class JsonLines:
    """Appends one ``orjson`` line per record to ``path``, one ``write`` + ``flush`` per batch."""

    def __init__(self, path: str | Path) -> None:
        self.file = open(path, "ab")

    def write(self, records: list[Record]) -> None:
        lines = [orjson.dumps(r) for r in records]
        lines.append(b"")
        self.file.write(b"\n".join(lines))
        self.file.flush()

    def close(self) -> None:
        self.file.close()
