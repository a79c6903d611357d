"""A batch as columns: what a stage that declares ``columnar = True`` receives and returns.

A :class:`Columns` is an ordered map of field name -> column, every column ``len(batch)`` long:

- a numpy array (``int64``, ``float64``, ``float32``, ``int32`` or ``bool``; 1-D for a scalar
  field, 2-D for a fixed-length vector such as a feature vector ``x``), or
- a plain list of Python values (strings, ragged lists, maps, mixed types ...), where
  :data:`MISSING` marks a record that lacks the field.

Records and columns convert both ways without loss (:meth:`Columns.from_records` infers a numpy
column only where every value has the same exact type, so ``to_records`` gives back equal records),
which is what lets the runtime put a per-record stage between two columnar ones: it converts at
that boundary only. On the wire a numpy column is its raw little-endian bytes in a frame of its
own, a list column one msgpack frame (:mod:`streampipe.stages.wire`); no pickle.

Arrays received from a socket are read-only views of the message: a stage builds new arrays
(``np.where``, arithmetic, ``take``) rather than writing into them.

>>> c = Columns.from_records([{"id": 0, "x": [1.0, 2.0], "tag": "a"}, {"id": 1, "x": [3.0, 4.0]}])
>>> c.dtypes()
{'id': 'int64', 'x': 'float64[2]', 'tag': 'list'}
>>> c.to_records()
[{'id': 0, 'x': [1.0, 2.0], 'tag': 'a'}, {'id': 1, 'x': [3.0, 4.0]}]
>>> len(c.take([1])), c.rows(0, 1)["id"].tolist()
(1, [0])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np

Column = Union[np.ndarray, list]   # noqa: UP007 - a runtime alias, Python 3.10 has no `type` statement


class _Missing:
    """The value of a list column for a record that lacks the field."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

# numpy kinds a column may have on the wire (little-endian); others are converted or refused
WIRE_DTYPES = ("<i8", "<f8", "<f4", "<i4", "|b1")
_NUMERIC = {int: np.int64, float: np.float64, bool: np.bool_}


class Columns:
    """A batch of ``n`` records as named columns (see the module docstring)."""

    __slots__ = ("data", "n")

    def __init__(self, data: dict[str, Column] | None = None, n: int | None = None) -> None:
        self.data: dict[str, Column] = dict(data or {})
        lengths = {len(c) for c in self.data.values()}
        if n is None:
            if len(lengths) > 1:
                raise ValueError(f"columns of different lengths: {sorted(lengths)}")
            n = lengths.pop() if lengths else 0
        elif lengths - {n}:
            raise ValueError(f"a column's length is not {n}: {sorted(lengths)}")
        self.n = n

    # -- a map of columns ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def __getitem__(self, name: str) -> Column:
        return self.data[name]

    def __contains__(self, name: object) -> bool:
        return name in self.data

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __repr__(self) -> str:
        return f"Columns(n={self.n}, {self.dtypes()})"

    def names(self) -> list[str]:
        return list(self.data)

    def items(self) -> Iterable[tuple[str, Column]]:
        return self.data.items()

    def dtypes(self) -> dict[str, str]:
        """Each column's kind: ``int64``, ``float64[8]`` (a 2-D column), or ``list``."""
        out = {}
        for name, col in self.data.items():
            if isinstance(col, np.ndarray):
                out[name] = str(col.dtype) + "".join(f"[{d}]" for d in col.shape[1:])
            else:
                out[name] = "list"
        return out

    def with_column(self, name: str, column: Column) -> Columns:
        """A new batch with ``name`` set to ``column`` (the others shared, not copied)."""
        return Columns({**self.data, name: column}, self.n)

    # -- rows --------------------------------------------------------------------------------
    def rows(self, start: int, stop: int) -> Columns:
        """Rows ``start:stop`` (views of numpy columns)."""
        start, stop = max(0, start), min(self.n, stop)
        return Columns({k: c[start:stop] for k, c in self.data.items()}, max(0, stop - start))

    def take(self, index: Sequence[int] | np.ndarray) -> Columns:
        """The rows at ``index`` (integer positions or a boolean mask), in that order."""
        idx = np.asarray(index)
        if idx.dtype == np.bool_:
            idx = np.flatnonzero(idx)
        data: dict[str, Column] = {}
        for k, c in self.data.items():
            data[k] = c[idx] if isinstance(c, np.ndarray) else [c[i] for i in idx.tolist()]
        return Columns(data, len(idx))

    def to_records(self) -> list[dict[str, Any]]:
        """The batch as records (plain Python values), in row order."""
        if not self.data:
            return [{} for _ in range(self.n)]
        names = list(self.data)
        cols = [c.tolist() if isinstance(c, np.ndarray) else c for c in self.data.values()]
        if any(isinstance(c, list) and any(v is MISSING for v in c) for c in self.data.values()):
            return [{k: v for k, v in zip(names, row) if v is not MISSING} for row in zip(*cols)]
        if all(type(k) is str for k in names):
            return list(map(_row_maker(tuple(names)), *cols))
        return [dict(zip(names, row)) for row in zip(*cols)]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> Columns:
        """Columns holding exactly ``records`` (maps): numpy where every value of a field has the same
        exact type (int, float, bool, or equal-length lists of one of them), a list column otherwise."""
        names: dict[str, None] = {}
        for r in records:
            if type(r) is not dict:
                raise TypeError(f"a record is a {type(r).__name__}, not a map")
            for k in r:
                if k not in names:
                    names[k] = None
        data: dict[str, Column] = {}
        for name in names:
            values = [r.get(name, MISSING) for r in records]
            data[name] = _column(values)
        return cls(data, len(records))

    @classmethod
    def concat(cls, parts: Sequence[Columns]) -> Columns:
        """The rows of ``parts`` one after another; columns that differ in kind become list columns."""
        parts = [p for p in parts if p.n]
        if not parts:
            return cls()
        if len(parts) == 1:
            return parts[0]
        names: dict[str, None] = {}
        for p in parts:
            names.update(dict.fromkeys(p.data))
        data: dict[str, Column] = {}
        for name in names:
            cols = [p.data.get(name) for p in parts]
            if all(isinstance(c, np.ndarray) for c in cols) and len({(c.dtype, c.shape[1:]) for c in cols}) == 1:  # type: ignore[union-attr]
                data[name] = np.concatenate(cols)  # type: ignore[arg-type]
                continue
            merged: list[Any] = []
            for p, c in zip(parts, cols):
                merged.extend([MISSING] * p.n if c is None else (c.tolist() if isinstance(c, np.ndarray) else c))
            data[name] = _column(merged)
        return cls(data, sum(p.n for p in parts))


_ROW_MAKERS: dict[tuple[str, ...], Callable[..., dict[str, Any]]] = {}
ROW_MAKERS_KEPT = 64      # field-name tuples whose row function is kept (a stream has a few)


def _row_maker(names: tuple[str, ...]) -> Callable[..., dict[str, Any]]:
    """A function of one value per name that returns the record ``{name: value, ...}``: a dict
    display compiled for these names, ~3 x faster than ``dict(zip(names, row))`` per row. Built
    from the names' ``repr`` (a quoted literal for any str), as :mod:`dataclasses` builds its
    ``__init__``.

    >>> _row_maker(("id", "it's"))(1, 2)
    {'id': 1, "it's": 2}
    """
    maker = _ROW_MAKERS.get(names)
    if maker is None:
        if len(_ROW_MAKERS) >= ROW_MAKERS_KEPT:
            _ROW_MAKERS.clear()
        args = ", ".join(f"v{i}" for i in range(len(names)))
        body = ", ".join(f"{name!r}: v{i}" for i, name in enumerate(names))
        maker = _ROW_MAKERS[names] = eval(f"lambda {args}: {{{body}}}", {})
    return maker


def _column(values: list[Any]) -> Column:
    """A numpy column if ``values`` round-trip through one exactly, else the list itself."""
    if not values:
        return values
    kind = type(values[0])
    if kind in _NUMERIC and all(type(v) is kind for v in values):
        try:
            return np.array(values, dtype=_NUMERIC[kind])
        except OverflowError:            # an int beyond 64 bits stays a Python int
            return values
    if kind is list:
        width = len(values[0])
        if width and all(type(v) is list and len(v) == width for v in values):
            inner = type(values[0][0])
            if inner in (int, float) and all(type(e) is inner for v in values for e in v):
                try:
                    return np.array(values, dtype=_NUMERIC[inner])
                except OverflowError:
                    return values
    return values
