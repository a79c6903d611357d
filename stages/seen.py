"""The record ids a sink has written, per origin, with holes closed only by knowledge.

An **origin** is one source replica in one id-space generation (``"generator.1/0"``): the
source runtime stamps it on every batch it cuts, and transforms copy it from the input batch
onto everything they cut from it. At-least-once sources also stamp a **watermark** ``w``:
every id of that origin below ``w`` has been acknowledged end to end (written by a sink,
routed elsewhere, filtered or dead-lettered), so it will never be needed again. No clock is
involved: a partition may lag for hours and its holes stay open until its own watermark passes
them.

:class:`SeenIds` is one origin's set: a mark plus disjoint, non-adjacent half-open ranges
``[start, end)`` above it. Below ``mark`` every id counts as seen; ``floor`` (<= ``mark``) is the
highest watermark applied, below which ids are *final* rather than known to be written. Memory
grows with the holes in flight, and adding the next id in sequence (or any id above all others)
is O(1). Closing holes below a watermark is one bisect and one slice deletion: linear in the
holes closed.

>>> s = SeenIds()
>>> [s.add(i) for i in (0, 1, 3, 4, 1)]
[True, True, True, True, False]
>>> s.ranges(), 2 in s, 3 in s, -1 in s
([[0, 2], [3, 5]], False, True, False)
>>> s.close_below(8), s.mark, s.ranges(), 2 in s, 7 in s, 8 in s   # the origin says: all below 8 is final
(3, 8, [], True, True, False)
"""

from __future__ import annotations

import bisect
from typing import Any

NOTHING = -(2**63)            # the mark before any id: no id is below it


class SeenIds:
    """The ids of one origin a sink has written (see the module docstring)."""

    __slots__ = ("mark", "floor", "starts", "ends")

    def __init__(self, mark: int = NOTHING, ranges: list[list[int]] | None = None, floor: int = NOTHING) -> None:
        self.mark, self.floor = mark, min(floor, mark)
        self.starts = [int(a) for a, _ in ranges or []]
        self.ends = [int(b) for _, b in ranges or []]

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

    def written(self, i: int) -> bool:
        """Whether ``i`` is known to be written (not merely below a watermark)."""
        return i >= self.floor and i in self

    def add(self, i: int) -> bool:
        """Record ``i``; False when it was already there."""
        if i in self:
            return False
        starts, ends = self.starts, self.ends
        if i == self.mark:
            self.mark += 1
            if starts and starts[0] == self.mark:
                self.mark = ends[0]
                del starts[0], ends[0]
            return True
        if starts and ends[-1] == i:              # the common case: the next id after a hole
            ends[-1] = i + 1
            return True
        k = bisect.bisect_right(starts, i) - 1    # the range starting at or before i, if any
        if k >= 0 and ends[k] == i:
            ends[k] = i + 1
            if k + 1 < len(starts) and starts[k + 1] == i + 1:
                ends[k] = ends[k + 1]
                del starts[k + 1], ends[k + 1]
        elif k + 1 < len(starts) and starts[k + 1] == i + 1:
            starts[k + 1] = i
        else:
            starts.insert(k + 1, i)
            ends.insert(k + 1, i + 1)
        return True

    def add_many(self, ids: list[int]) -> None:
        """``add`` for each id; ids above every range inline (the sink's hot path)."""
        starts, ends = self.starts, self.ends
        for i in ids:
            top = ends[-1] if ends else self.mark
            if i == top:                 # extends the last range, or the mark when no range is open
                if ends:
                    ends[-1] = i + 1
                else:
                    self.mark = i + 1
            elif i > top:                # above everything: a new last range (a strided partition)
                starts.append(i)
                ends.append(i + 1)
            else:
                self.add(i)

    @property
    def top(self) -> int:
        """Every id at or above this is unseen."""
        return max(self.ends[-1], self.mark) if self.ends else self.mark

    @property
    def holes(self) -> int:
        return len(self.starts)

    def close_below(self, w: int) -> int:
        """Every id below ``w`` is final (the origin's watermark): count it seen; return the holes closed.

        One bisect and one slice deletion, so closing a million holes costs one pass.
        """
        if w <= self.mark:
            self.floor = max(self.floor, min(w, self.mark))
            return 0
        starts, ends = self.starts, self.ends
        k = bisect.bisect_right(starts, w)        # ranges starting at or below w join the mark
        mark = max(w, ends[k - 1]) if k else w
        closed = k + (1 if not k or ends[k - 1] < w else 0)   # the gaps before, between and after them
        del starts[:k], ends[:k]
        self.mark, self.floor = mark, w
        return closed

    def ranges(self) -> list[list[int]]:
        return [[a, b] for a, b in zip(self.starts, self.ends)]

    def state(self) -> dict[str, Any]:
        return {"mark": self.mark, "floor": self.floor, "ranges": self.ranges()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SeenIds:
        return cls(int(state.get("mark", NOTHING)), state.get("ranges") or [], int(state.get("floor", NOTHING)))


def family(origin: str) -> tuple[str, int]:
    """``("stage", generation)`` of an origin ``"stage.replica/generation"``."""
    head, _, gen = origin.rpartition("/")
    try:
        return head.rpartition(".")[0], int(gen)
    except ValueError:
        return origin, 0


class SeenByOrigin:
    """One :class:`SeenIds` per origin, and what a newer id-space generation must also consult.

    Ids are unique within a source stage. When a source is repartitioned (its ``generation``
    bumped), a new origin may re-emit ids that an earlier generation's replica emitted after its
    last committed position, i.e. at or above that replica's watermark: those ids are looked up
    in the *written* part of every earlier generation's sets too (:meth:`SeenIds.written`; below
    a set's floor an id may be another partition's, which the watermark says nothing about).
    """

    def __init__(self) -> None:
        self.sets: dict[str | None, SeenIds] = {}
        self.older: dict[str | None, list[SeenIds]] = {}

    def of(self, origin: str | None) -> SeenIds:
        s = self.sets.get(origin)
        if s is None:
            s = self.sets[origin] = SeenIds()
            self._link()
        return s

    def _link(self) -> None:
        """Recompute, for every origin, the sets of earlier generations of its stage (rare: new origins)."""
        fams = {o: family(o) for o in self.sets if o is not None}
        self.older = {o: [self.sets[p] for p, (stage2, g2) in fams.items() if stage2 == stage and g2 < gen]
                      for o, (stage, gen) in fams.items()}

    def older_written(self, origin: str | None, i: int) -> bool:
        """Whether ``i`` was written under an earlier generation of ``origin``'s source."""
        return any(s.written(i) for s in self.older.get(origin, ()))

    @property
    def holes(self) -> int:
        return sum(s.holes for s in self.sets.values())

    def state(self) -> dict[str, Any]:
        return {o if o is not None else "": s.state() for o, s in self.sets.items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SeenByOrigin:
        sbo = cls()
        sbo.sets = {(o or None): SeenIds.from_state(s) for o, s in state.items()}
        sbo._link()
        return sbo
