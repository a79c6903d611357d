"""The set of record ids a sink has written: a high-water mark plus disjoint ranges above it.

Ids arrive roughly in order, with holes: a record dead-lettered upstream, a slice routed to
another stage, a batch still being redelivered. Below ``mark`` every id counts as seen (it starts
below any id); above it, ``ranges`` holds sorted half-open intervals ``[start, end)``. Memory grows with the number of
*holes*, not of ids, and adding the next id in sequence is O(1).

A hole that stays open longer than ``horizon_s`` is closed (the mark jumps over it): a record
that shows up later than that is taken for a duplicate. Redeliveries come within seconds (the
resend timer), and ages restart when the set is loaded after a restart, so the horizon only
bounds memory when holes are permanent, e.g. when a tenth of the ids go to another output.

>>> s = SeenIds()
>>> [s.add(i) for i in (0, 1, 3, 4, 1)]
[True, True, True, True, False]
>>> s.ranges(), 2 in s, 3 in s, -1 in s
([[0, 2], [3, 5]], False, True, False)
>>> s.add(2), s.ranges()
(True, [[0, 5]])
>>> s.close_old_holes(now=float("inf")), s.mark, s.ranges()   # everything below 5 is final now
(1, 5, [])
"""

from __future__ import annotations

import bisect
import time
from typing import Any

NOTHING = -(2**63)            # the mark before any hole was closed: no id is below it
DEFAULT_HORIZON_S = 300.0     # a hole open this long is taken as final
MAX_RANGES = 1_000_000        # ... and never more than this many holes in memory


class SeenIds:
    def __init__(self, mark: int = NOTHING, ranges: list[list[int]] | None = None, horizon_s: float = DEFAULT_HORIZON_S) -> None:
        self.mark = mark
        self.horizon_s = horizon_s
        now = time.monotonic()
        self.starts = [int(a) for a, _ in ranges or []]
        self.ends = [int(b) for _, b in ranges or []]
        self.born = [now] * len(self.starts)      # when the hole below each range opened
        self.closed = 0                           # holes given up on

    def __contains__(self, i: int) -> bool:
        if i < self.mark:
            return True
        starts = self.starts
        if not starts:
            return False
        if starts[-1] <= i:
            return i < self.ends[-1]
        k = bisect.bisect_right(starts, i) - 1
        return k >= 0 and i < self.ends[k]

    def add(self, i: int) -> bool:
        """Record ``i``; False when it was already there."""
        if i in self:
            return False
        starts, ends = self.starts, self.ends
        if i == self.mark:
            self.mark += 1
            if starts and starts[0] == self.mark:
                self.mark = ends[0]
                del starts[0], ends[0], self.born[0]
            return True
        if starts and ends[-1] == i:              # the common case: the next id after a hole
            ends[-1] = i + 1
            return True
        k = bisect.bisect_right(starts, i) - 1    # the range starting at or before i, if any
        if k >= 0 and ends[k] == i:
            ends[k] = i + 1
            if k + 1 < len(starts) and starts[k + 1] == i + 1:
                ends[k] = ends[k + 1]
                del starts[k + 1], ends[k + 1], self.born[k + 1]
        elif k + 1 < len(starts) and starts[k + 1] == i + 1:
            starts[k + 1] = i
        else:
            starts.insert(k + 1, i)
            ends.insert(k + 1, i + 1)
            self.born.insert(k + 1, time.monotonic())
        return True

    def add_many(self, ids: list[int]) -> None:
        """``add`` for each id; the next-in-sequence case inline (the sink's hot path)."""
        ends = self.ends
        for i in ids:
            if ends and ends[-1] == i:   # extends the last range: cannot have been seen
                ends[-1] = i + 1
            else:
                self.add(i)

    @property
    def top(self) -> int:
        """Every id at or above this is unseen."""
        return max(self.ends[-1], self.mark) if self.ends else self.mark

    def close_old_holes(self, now: float | None = None) -> int:
        """Give up on holes older than the horizon (or beyond MAX_RANGES); return how many."""
        now = time.monotonic() if now is None else now
        n = 0
        while self.starts and (now - self.born[0] > self.horizon_s or len(self.starts) > MAX_RANGES):
            self.mark = self.ends[0]
            del self.starts[0], self.ends[0], self.born[0]
            n += 1
        self.closed += n
        return n

    def ranges(self) -> list[list[int]]:
        return [[a, b] for a, b in zip(self.starts, self.ends)]

    def state(self) -> dict[str, Any]:
        return {"mark": self.mark, "ranges": self.ranges()}

    @classmethod
    def from_state(cls, state: dict[str, Any], horizon_s: float = DEFAULT_HORIZON_S) -> SeenIds:
        return cls(int(state.get("mark", NOTHING)), state.get("ranges") or [], horizon_s)
