"""sides: the parts of an event-time join of two streams (``label_join``, ``join``, ``enrich``):
each stream's watermark, the records waiting on one side for a partner from the other, and the
records found late.

A stream's watermark is the greatest event time it has shown less ``lateness`` (the disorder it
may have): knowledge of the data, not of a clock. A record behind its own stream's watermark is
late. A record waits on its side, by key, until the *other* stream's watermark says no partner
can still come; then :meth:`Side.expire` gives it up.

>>> side = Side()
>>> side.saw(10.0, lateness=2), side.saw(7.0, lateness=2), side.watermark(2)
(False, True, 8.0)
>>> _ = side.add("a", [5.0, "x"]), side.add("a", [9.0, "y"])
>>> list(side.get("a").values()), [(k, e[1]) for k, e in side.expire(before=6.0)], len(side)
([[5.0, 'x'], [9.0, 'y']], [('a', 'x')], 1)
>>> [s["waiting"] for s in Side.deal([side.state(), {}], 2)]       # key "a" is replica 1's of 2
[[], [['a', 9.0, 'y']]]
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable
from typing import Any, TypeGuard

from streampipe.stages.api import Record, Stage
from streampipe.stages.keys import deal


class EventTime:
    """One stream's progress in event time: the greatest time seen, so its watermark."""

    def __init__(self) -> None:
        self.newest: float | None = None              # the greatest event time seen

    def saw(self, t: float, lateness: float) -> bool:
        """Take ``t`` into the watermark; True when ``t`` is later than the lateness allows."""
        late = self.newest is not None and t < self.newest - lateness
        if self.newest is None or t > self.newest:
            self.newest = t
        return late

    def watermark(self, lateness: float) -> float | None:
        return None if self.newest is None else self.newest - lateness


class Side(EventTime):
    """One stream's records waiting for a partner: key -> {arrival: entry}, a heap by event time.

    An entry is a list whose first item is the record's event time (the rest is the caller's).
    ``index`` maps a key to what the entries are filed under (``key_bytes``: ``1`` and ``1.0``
    are one key); the key as it came is what :meth:`state` keeps.
    """

    def __init__(self, index: Callable[[Any], Hashable] | None = None) -> None:
        super().__init__()
        self.index: Callable[[Any], Hashable] = index or _same
        self.waiting: dict[Hashable, dict[int, list[Any]]] = {}
        self.keys: dict[Hashable, Any] = {}             # index -> the key as it came
        self.heap: list[tuple[float, int, Hashable]] = []   # (t, arrival, index); an entry gone is skipped
        self.arrivals = 0                               # an entry's number: breaks ties, keys are never compared
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, key: Any, entry: list[Any]) -> int:
        ix = self.index(key)
        self.arrivals += 1
        self.waiting.setdefault(ix, {})[self.arrivals] = entry
        self.keys[ix] = key
        heapq.heappush(self.heap, (entry[0], self.arrivals, ix))
        self.size += 1
        return self.arrivals

    def get(self, key: Any) -> dict[int, list[Any]]:
        """``key``'s waiting entries by arrival (read only: :meth:`remove` takes one away)."""
        return self.waiting.get(self.index(key), {})

    def remove(self, key: Any, arrival: int) -> None:
        self._drop(self.index(key), arrival)

    def _drop(self, ix: Hashable, arrival: int) -> None:
        group = self.waiting[ix]
        del group[arrival]
        self.size -= 1
        if not group:
            del self.waiting[ix], self.keys[ix]

    def earliest(self) -> float | None:
        """The earliest event time waiting (None: nothing waits)."""
        while self.heap and self.heap[0][1] not in self.waiting.get(self.heap[0][2], {}):
            heapq.heappop(self.heap)
        return self.heap[0][0] if self.heap else None

    def expire(self, before: float) -> list[tuple[Any, list[Any]]]:
        """Give up every waiting entry whose event time is below ``before``: ``(key, entry)``, earliest first."""
        gone = []
        while self.heap and self.heap[0][0] < before:
            _, arrival, ix = heapq.heappop(self.heap)
            group = self.waiting.get(ix)
            if group is not None and arrival in group:
                gone.append((self.keys[ix], group[arrival]))
                self._drop(ix, arrival)
        return gone

    def state(self) -> dict[str, Any]:
        order = sorted((arrival, ix) for ix, group in self.waiting.items() for arrival in group)
        return {"waiting": [[self.keys[ix], *self.waiting[ix][arrival]] for arrival, ix in order], "newest": self.newest}

    def load(self, state: dict[str, Any]) -> None:
        self.waiting, self.keys, self.heap, self.arrivals, self.size = {}, {}, [], 0, 0
        self.newest = state.get("newest")
        for key, *entry in state.get("waiting", []):
            self.add(key, entry)

    @staticmethod
    def deal(states: list[dict[str, Any]], replicas: int) -> list[dict[str, Any]]:
        """Every old replica's side (``{}``: it never saved) -> one per new replica: replica ``i``
        gets the entries of the keys :func:`~streampipe.stages.keys.replica_of_key` gives it, and
        every new replica the greatest time any old one had seen."""
        newest = max((s["newest"] for s in states if s.get("newest") is not None), default=None)
        rows = deal([row for s in states for row in s.get("waiting", [])], replicas, key_of=lambda row: row[0])
        return [{"waiting": mine, "newest": newest} for mine in rows]


class Late:
    """The records of a batch found late: to the named output ``late`` when something reads it
    (:meth:`take` returns them, :meth:`route` names their output), else dead-lettered with the reason."""

    def __init__(self) -> None:
        self.count = 0
        self.records: list[Record] = []
        self.ids: set[int] = set()         # the late records of the last batch, by identity (route)

    def add(self, stage: Stage, record: Record, why: str) -> None:
        self.count += 1
        if "late" in stage.context.outputs:
            self.records.append(record)
        else:
            stage.reject(record, f"late: {why}")

    def take(self) -> list[Record]:
        late, self.records = self.records, []
        self.ids = {id(r) for r in late}
        return late

    def route(self, record: Record) -> str:
        return "late" if id(record) in self.ids else "default"


def finite(t: Any) -> TypeGuard[float]:
    """True for an event time: a finite number, not a bool."""
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)


def _same(key: Any) -> Any:
    return key
