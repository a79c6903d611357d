"""normalizer: validates records and scales their features with running (online) statistics.

Each record must carry the fields of ``schema`` with the right types (``int``, ``float`` /
``number``, ``str``, ``bool``, ``vector`` = a list of finite numbers of a fixed length). A record
that does not is rejected to the dead-letter file with the reason; the rest go on with their
``vector`` field standardised: ``(x - mean) / std`` with the mean and variance of everything seen
so far (Chan et al.'s parallel update per batch, so it is one numpy pass per batch, not per
record). ``holdout`` routes that fraction of records (chosen by id, so the same record always
goes the same way, even when redelivered) to the named output ``holdout`` instead of ``default``.

Columns (``columnar: true``, the default): a batch arrives as :class:`Columns`. When every schema
field is a column of its type (``int`` an integer array, ``vector`` a 2-D numeric array of the
right width, ``str`` a list column of strings ...), the batch is validated by those types alone,
non-finite rows are dead-lettered one by one, and the vector column is standardised in one numpy
pass. A batch with any other column (a malformed record makes its column a list column) takes
the per-record path: each bad record is dead-lettered with the same reason as above, the rest go
on. Given records directly, ``process`` works on records.

>>> n = Normalizer()
>>> out = list(n.process([{"id": 0, "x": [1.0, 10.0], "y": 0}, {"id": 1, "x": [3.0, 30.0], "y": 1}]))
>>> [r["x"] for r in out]
[[-1.0, -1.0], [1.0, 1.0]]
>>> list(n.process([{"id": 2, "x": "oops", "y": 0}])), n.take_rejected()[0][1]
([], "field 'x': expected vector, got str")
>>> out = n.process(Columns.from_records([{"id": 3, "x": [2.0, 20.0], "y": 0}, {"id": 4, "x": "oops", "y": 1}]))
>>> out["x"].tolist(), [reason for _, reason, _ in n.take_rejected()]
([[0.0, 0.0]], ["field 'x': expected vector, got str"])
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.columns import Columns

DEFAULT_SCHEMA = {"id": "int", "x": "vector", "y": "int"}
_GOLDEN = 2654435761          # Knuth's multiplicative hash: spreads consecutive ids evenly

# exact types, as msgpack decodes them: ``type(v) in ...`` is ~3x cheaper per field than
# isinstance() plus a bool guard, and it keeps True out of numbers
_TYPES: dict[str, frozenset[type]] = {
    "int": frozenset({int}),
    "float": frozenset({int, float}),
    "number": frozenset({int, float}),
    "str": frozenset({str}),
    "bool": frozenset({bool}),
    "vector": frozenset({list}),
}
_MISSING = object()
# numpy kinds (dtype.kind) of a column that passes for a schema type without a look at its values
_ARRAY_KINDS: dict[str, str] = {"int": "iu", "float": "iuf", "number": "iuf", "bool": "b", "vector": "iuf"}


def _matrix(vectors: list[Any]) -> np.ndarray | None:
    """The vectors as an ``n x d`` float array, or None when they are ragged or not all numbers.
    ``np.fromiter`` over the chained values is ~3 x faster than ``np.asarray`` of the nested lists."""
    d = len(vectors[0])
    if any(len(v) != d for v in vectors):
        return None
    try:
        return np.fromiter(itertools.chain.from_iterable(vectors), np.float64, len(vectors) * d).reshape(len(vectors), d)
    except (ValueError, TypeError):
        return None


class Normalizer(Stage):
    outputs = ("default", "holdout")
    columnar = True

    def __init__(self, schema: dict[str, str] | None = None, scale: str | None = "x",
                 holdout: float = 0.0, columnar: bool = True) -> None:
        super().__init__()
        self.columnar = bool(columnar)
        self.schema = dict(schema or DEFAULT_SCHEMA)
        for field, kind in self.schema.items():
            if kind not in _TYPES:
                raise ValueError(f"schema field {field!r}: unknown type {kind!r} (known: {', '.join(_TYPES)})")
        if scale is not None and self.schema.get(scale) != "vector":
            raise ValueError(f"scale field {scale!r} must be a 'vector' field of the schema")
        if not 0.0 <= holdout <= 1.0:
            raise ValueError("holdout must be a fraction between 0 and 1")
        self._checks = [(field, _TYPES[kind], kind) for field, kind in self.schema.items()]
        self.scale, self.holdout = scale, float(holdout)
        self._threshold = int(self.holdout * 2**32)
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.rejected = 0

    def check(self, record: Any) -> str | None:
        """Why a record is invalid, or None."""
        if type(record) is not dict:
            return f"record is {type(record).__name__}, not a map"
        for field, allowed, kind in self._checks:
            value = record.get(field, _MISSING)
            if value is _MISSING:
                return f"missing field {field!r}"
            if type(value) not in allowed:
                return f"field {field!r}: expected {kind}, got {type(value).__name__}"
            if kind == "vector":
                if not value:
                    return f"field {field!r}: empty vector"
                if self.mean is not None and len(value) != len(self.mean):
                    return f"field {field!r}: expected {len(self.mean)} values, got {len(value)}"
        return None

    def process(self, batch: Batch | Columns) -> list[Record] | Columns:  # type: ignore[override]
        if isinstance(batch, Columns):
            return self.process_columns(batch)
        return self.process_records(batch)

    def columns_valid(self, batch: Columns) -> bool:
        """Whether every schema field is a column of its type (then no row can be invalid but by value)."""
        for field, allowed, kind in self._checks:
            col = batch.data.get(field)
            if col is None:
                return False
            if isinstance(col, np.ndarray):
                if col.dtype.kind not in _ARRAY_KINDS.get(kind, "") or col.ndim != (2 if kind == "vector" else 1):
                    return False
                if kind == "vector" and (col.shape[1] == 0 or (self.mean is not None and col.shape[1] != len(self.mean))):
                    return False
            elif kind == "vector" or not all(type(v) in allowed for v in col):
                return False
        return True

    def process_columns(self, batch: Columns) -> Columns:
        """Validate by column type, standardise the vector column in one pass (module docstring)."""
        if not len(batch):
            return batch
        if not self.columns_valid(batch):
            return Columns.from_records(self.process_records(batch.to_records()))
        if self.scale is None:
            return batch
        field = self.scale
        x = np.asarray(batch[field], dtype=np.float64)
        finite = np.asarray(np.isfinite(x).all(axis=1))
        if not finite.all():
            for r in batch.take(~finite).to_records():
                self.rejected += 1
                self.reject(r, f"field {field!r}: not finite")
            batch, x = batch.take(finite), x[finite]
            if not len(batch):
                return batch
        self._update(x)
        assert self.mean is not None and self.m2 is not None
        std = np.sqrt(self.m2 / max(self.n, 1))
        std[std == 0] = 1.0
        return batch.with_column(field, ((x - self.mean) / std).round(6))

    def route_columns(self, batch: Columns) -> np.ndarray | list[str]:
        """:meth:`route` for every row of a columnar batch at once."""
        ids = batch.data.get("id")
        if not self._threshold:
            return np.full(len(batch), "default")
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            return [self.route(r) for r in batch.to_records()]
        hashed = (ids.astype(np.uint64) * np.uint64(_GOLDEN)) % np.uint64(2**32)
        return np.where(hashed < self._threshold, "holdout", "default")

    def all_valid(self, batch: Batch) -> list[Any] | None:
        """Whether every record of ``batch`` passes :meth:`check`, one field at a time (a type set per
        field rather than a loop over the fields per record); the scale field's values if so, else None."""
        if not batch or set(map(type, batch)) != {dict}:
            return None
        scaled: list[Any] = []
        for field, allowed, kind in self._checks:
            values = [r.get(field, _MISSING) for r in batch]
            if not set(map(type, values)) <= allowed:       # _MISSING's type is never allowed
                return None
            if kind == "vector":
                lengths = set(map(len, values))
                if 0 in lengths or (self.mean is not None and lengths != {len(self.mean)}):
                    return None
            if field == self.scale:
                scaled = values
        return scaled

    def process_records(self, batch: Batch) -> list[Record]:
        xs = self.all_valid(batch)
        if xs is not None:
            good = batch if type(batch) is list else list(batch)
        else:
            good = []
            for record in batch:
                reason = self.check(record)
                if reason is None:
                    good.append(record)
                else:
                    self.rejected += 1
                    self.reject(record, reason)
        if not good or self.scale is None:
            return list(good)
        field = self.scale
        if xs is None:
            xs = [r[field] for r in good]
        x = _matrix(xs)
        if x is None or x.ndim != 2:
            good = self._usable_vectors(good, field)
            if not good:
                return good
            x = np.asarray([r[field] for r in good], dtype=float)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            for r, ok in zip(good, finite):
                if not ok:
                    self.rejected += 1
                    self.reject(r, f"field {field!r}: not finite")
            good = [r for r, ok in zip(good, finite) if ok]
            x = x[finite]
            if not good:
                return good
        self._update(x)
        assert self.mean is not None and self.m2 is not None
        std = np.sqrt(self.m2 / max(self.n, 1))
        std[std == 0] = 1.0
        scaled = ((x - self.mean) / std).round(6).tolist()
        return [{**r, field: v} for r, v in zip(good, scaled)]

    def _usable_vectors(self, good: list[Record], field: str) -> list[Record]:
        """Slow path for a batch with a ragged or non-numeric vector: dead-letter the culprits.

        A non-finite vector is one of them: it must not fix the vector length of a fresh stage
        (nor poison its statistics), or every good record after it would be rejected.
        """
        dim = len(self.mean) if self.mean is not None else None
        kept = []
        for record in good:
            try:
                v = np.asarray(record[field], dtype=np.float64)
                if v.ndim != 1:
                    raise ValueError("expected a flat vector")
                if dim is not None and len(v) != dim:
                    raise ValueError(f"expected {dim} values, got {len(v)}")
                if not np.isfinite(v).all():
                    raise ValueError("not finite")
            except (ValueError, TypeError) as exc:
                self.rejected += 1
                self.reject(record, f"field {field!r}: {exc}")
                continue
            dim = len(v)
            kept.append(record)
        return kept

    def _update(self, x: np.ndarray) -> None:
        """Merge a batch into the running mean / M2 (Chan, Golub and LeVeque)."""
        nb = x.shape[0]
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def route(self, record: Record) -> str:
        if self._threshold and (int(record.get("id", 0)) * _GOLDEN) % 2**32 < self._threshold:
            return "holdout"
        return "default"

    def snapshot(self) -> dict[str, Any]:
        if self.mean is None or self.m2 is None:
            return {"n": 0}
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def restore(self, state: dict[str, Any]) -> None:
        self.n = int(state.get("n", 0))
        if self.n:
            self.mean, self.m2 = np.asarray(state["mean"], float), np.asarray(state["m2"], float)

    def stats(self) -> dict[str, Any]:
        spread = float(np.sqrt(self.m2 / max(self.n - 1, 1)).mean()) if self.m2 is not None else math.nan
        return {"seen": self.n, "rejected": self.rejected, "mean_std": round(spread, 4) if self.n else None}
