"""The record ids a sink has written, per origin, with holes closed only by knowledge.

An **origin** is one source replica in one id-space generation (``"generator.1/0"``): the
source runtime stamps it on every batch it cuts, and transforms copy it from the input batch
onto everything they cut from it. At-least-once sources also stamp a **watermark** ``w``:
every id of that origin below ``w`` has been acknowledged end to end (written by a sink,
routed elsewhere, filtered or dead-lettered), so it will never be needed again. No clock is
involved: a partition may lag for hours and its holes stay open until its own watermark passes
them.

:class:`SeenIds` is one origin's set: a mark, below which every id counts as seen, and above it
disjoint **runs**, each an arithmetic progression ``(start, step, last)``: the ids ``start,
start + step, ..., last``. ``floor`` (<= ``mark``) is the highest watermark applied, below which
ids are *final* rather than known to be written.

Why progressions and not plain ranges: a partitioned source's replica owns every n-th id
(``r, r + n, r + 2n, ...``, :mod:`streampipe.stages.segments`), so a sink sees a strided
sequence from each origin, and sink replicas each see every other batch of it. As ranges, each id
of a strided origin was a hole of its own until the watermark passed it: tens of thousands of
holes in flight, a bisect and a list insert per id, and a state file that grew with them. As
progressions a batch of one origin is usually one run, and joins the run before it. Memory grows
with the *gaps* in flight, whatever the stride.

Every operation takes a whole batch as a numpy ``int64`` array: membership is one
``searchsorted``; adding a batch above everything seen (the usual case) extends or appends the
last run; a batch that lands among the runs (out of order: another replica's batch went ahead of
it) splits only the runs whose span holds one of its ids, then rebuilds the few runs around it.
Ids outside the ``int64`` range cannot be kept here: the sink counts them as not deduplicated.

>>> s = SeenIds()
>>> s.add_many([0, 1, 3, 4]); s.add_many([4, 1])      # the second batch: both already seen
>>> s.runs(), 2 in s, 3 in s, -1 in s
([[0, 1, 1], [3, 1, 4]], False, True, False)
>>> s.add_many([10, 12, 14]); s.add_many([16, 18]); s.runs()[-1]   # a strided origin: one run
[10, 2, 18]
>>> s.close_below(8), s.mark, s.runs(), 2 in s, 7 in s, 8 in s   # the origin says: all below 8 is final
(2, 8, [[10, 2, 18]], True, True, False)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

import numpy as np

NOTHING = -(2**63)            # the mark before any id: no id is below it
LOW, HIGH = -(2**63), 2**63 - 1   # the ids a SeenIds can hold (int64)

Run = tuple[int, int, int]    # (start, step, last): start, start + step, ..., last; a single id has step 1


def holdable(i: object) -> bool:
    """Whether ``i`` is an id a :class:`SeenIds` can hold: an int (not a bool) within int64."""
    return type(i) is int and LOW <= i <= HIGH


def runs_of(q: np.ndarray) -> list[Run]:
    """Sorted, unique ids as arithmetic progressions, taken greedily from the left.

    >>> runs_of(np.array([0, 1, 2, 4, 6, 8, 9]))
    [(0, 1, 2), (4, 2, 8), (9, 1, 9)]
    """
    n = len(q)
    if n == 1:
        v = int(q[0])
        return [(v, 1, v)]
    d = np.diff(q)
    if bool((d == d[0]).all()):
        return [(int(q[0]), int(d[0]), int(q[-1]))]
    changes = (np.flatnonzero(d[1:] != d[:-1]) + 1).tolist()   # elements where the step changes after them
    ql, dl = q.tolist(), d.tolist()
    out: list[Run] = []
    i = 0
    while i < n:
        if i == n - 1:
            out.append((ql[i], 1, ql[i]))
            break
        k = bisect.bisect_right(changes, i)
        j = changes[k] if k < len(changes) else n - 1      # the run from element i ends at element j
        out.append((ql[i], dl[i], ql[j]))
        i = j + 1
    return out


def _join(a: Run, b: Run) -> Run | None:
    """``a`` and ``b`` (``a`` wholly below ``b``, nothing between them) as one run, if they make one."""
    s1, d1, l1 = a
    s2, d2, l2 = b
    gap = s2 - l1
    if s1 == l1:
        return (s1, gap if s2 == l2 else d2, l2) if s2 == l2 or gap == d2 else None
    if s2 == l2 or d2 == d1:
        return (s1, d1, l2) if gap == d1 else None
    return None


def _members(run: Run, lo: int, hi: int) -> np.ndarray:
    """The ids of ``run`` within ``[lo, hi]``."""
    s, d, last = run
    first = s if lo <= s else s + -(-(lo - s) // d) * d
    return np.arange(first, min(hi, last) + 1, d, dtype=np.int64)


class SeenIds:
    """The ids of one origin a sink has written (see the module docstring)."""

    __slots__ = ("mark", "floor", "starts", "steps", "lasts")

    def __init__(self, mark: int = NOTHING, runs: Iterable[Iterable[int]] | None = None, floor: int = NOTHING) -> None:
        self.mark, self.floor = int(mark), min(int(floor), int(mark))
        rs = [tuple(int(v) for v in r) for r in runs or []]
        self.starts = np.array([r[0] for r in rs], np.int64)
        self.steps = np.array([r[1] for r in rs], np.int64)
        self.lasts = np.array([r[2] for r in rs], np.int64)

    # -- reading -----------------------------------------------------------------------------
    def __contains__(self, i: int) -> bool:
        if i < self.mark:
            return True
        if not holdable(i) or not len(self.starts):
            return False
        return bool(self.contains(np.array([i], np.int64))[0])

    def contains(self, q: np.ndarray) -> np.ndarray:
        """A mask of the ids of ``q`` (int64) in the set."""
        seen = q < self.mark
        S = self.starts
        if len(S):
            k = np.searchsorted(S, q, "right") - 1
            kk = np.maximum(k, 0)
            seen |= (k >= 0) & (q <= self.lasts[kk]) & ((q - S[kk]) % self.steps[kk] == 0)
        return seen

    def written(self, i: int) -> bool:
        """Whether ``i`` is known to be written (not merely below a watermark)."""
        return i >= self.floor and i in self

    def written_mask(self, q: np.ndarray) -> np.ndarray:
        """:meth:`written` for each id of ``q`` (int64)."""
        return (q >= self.floor) & self.contains(q)

    @property
    def top(self) -> int:
        """Every id at or above this is unseen."""
        return max(int(self.lasts[-1]) + 1, self.mark) if len(self.lasts) else self.mark

    @property
    def holes(self) -> int:
        """The runs above the mark: how fragmented the set is (each run ends at a gap)."""
        return len(self.starts)

    def runs(self) -> list[list[int]]:
        return [[s, d, last] for s, d, last in zip(self.starts.tolist(), self.steps.tolist(), self.lasts.tolist())]

    # -- adding ------------------------------------------------------------------------------
    def add(self, i: int) -> bool:
        """Record ``i``; False when it was already there."""
        if i in self:
            return False
        self._insert(np.array([i], np.int64))
        return True

    def add_many(self, ids: Iterable[int] | np.ndarray) -> None:
        """Record every id of ``ids`` (any order, repeats and ids already seen allowed; all holdable)."""
        q = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if not len(q):
            return
        if len(q) > 1 and not bool((q[1:] > q[:-1]).all()):
            q = np.unique(q)
        if int(q[0]) < self.top:
            q = q[~self.contains(q)]
            if not len(q):
                return
        self._insert(q)

    def _insert(self, q: np.ndarray) -> None:
        """Add sorted, unique ids none of which is in the set."""
        S, D, L = self.starts, self.steps, self.lasts
        n = len(S)
        if not n or int(q[0]) > int(L[-1]):       # above every run: the usual case
            new = runs_of(q)
            at = n
            if n and (joined := _join((int(S[-1]), int(D[-1]), int(L[-1])), new[0])):
                if len(new) == 1:                  # extends the last run in place
                    D[-1], L[-1] = joined[1], joined[2]
                    self._absorb()
                    return
                new[0] = joined
                at = n - 1
            self._splice(at, n, new)
            return
        q = self._split(q)
        S = self.starts
        n = len(S)
        g = np.searchsorted(S, q, "right")        # q[j] lies between run g[j] - 1 and run g[j]
        # the runs around the new ids, and one more on each side: a run the new ids turn from a
        # single id into a progression may now join its outer neighbour (no two neighbours that
        # make one run are left apart, so one more on each side is enough)
        a, b = max(int(g[0]) - 2, 0), min(int(g[-1]) + 1, n - 1)
        cuts = (np.flatnonzero(np.diff(g)) + 1).tolist()
        groups = {int(g[lo]): q[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(q)])}
        region: list[Run] = []
        old = list(zip(self.starts[a:b + 1].tolist(), self.steps[a:b + 1].tolist(), self.lasts[a:b + 1].tolist()))
        for e in range(a, b + 2):
            if e in groups:
                for run in runs_of(groups[e]):
                    self._push(region, run)
            if e <= b:
                self._push(region, old[e - a])
        self._splice(a, b + 1, region)

    @staticmethod
    def _push(region: list[Run], run: Run) -> None:
        """Append ``run``, joined to the last one when they make one run. When they do not but
        the last run's step reaches ``run``'s first id, that id moves over: ``(0, 1, 4)`` then
        ``(5, 2, 7)`` become ``(0, 1, 5)`` and ``(7, 1, 7)``, which the next run can join."""
        if not region:
            region.append(run)
            return
        if (joined := _join(region[-1], run)):
            region[-1] = joined
            return
        s1, d1, l1 = region[-1]
        s2, d2, l2 = run
        if s1 != l1 and s2 - l1 == d1:
            region[-1] = (s1, d1, s2)
            run = (s2 + d2, d2 if s2 + d2 < l2 else 1, l2)
        region.append(run)

    def _split(self, q: np.ndarray) -> np.ndarray:
        """Cut every run whose span holds an id of ``q`` (a new id between two of its members)
        around those ids; return ``q`` with the run members cut out of the middle added."""
        S = self.starts
        k = np.searchsorted(S, q, "right") - 1
        kk = np.maximum(k, 0)
        inside = (k >= 0) & (q <= self.lasts[kk])
        if not bool(inside.any()):
            return q
        freed = [q]
        pieces: list[tuple[int, list[Run]]] = []
        for r in np.unique(k[inside]).tolist():
            run = (int(S[r]), int(self.steps[r]), int(self.lasts[r]))
            within = q[inside & (k == r)]
            lo, hi = int(within[0]), int(within[-1])
            s, d, last = run
            left_last = s + (lo - s - 1) // d * d           # the last member below lo
            right_first = s + ((hi - s) // d + 1) * d       # the first member above hi
            keep = [(s, d, left_last)] if left_last >= s else []
            if right_first <= last:
                keep.append((right_first, d, last))
            freed.append(_members(run, lo, hi))
            pieces.append((r, keep))
        for r, keep in reversed(pieces):                    # right to left: indices stay valid
            self._splice(r, r + 1, [(s, d if s != last else 1, last) for s, d, last in keep])
        return np.unique(np.concatenate(freed))

    def _splice(self, a: int, b: int, runs: list[Run]) -> None:
        """Replace runs ``a:b`` by ``runs``, then let the mark absorb what reaches it."""
        new = np.array(runs, np.int64).reshape(-1, 3)
        self.starts = np.concatenate([self.starts[:a], new[:, 0], self.starts[b:]])
        self.steps = np.concatenate([self.steps[:a], new[:, 1], self.steps[b:]])
        self.lasts = np.concatenate([self.lasts[:a], new[:, 2], self.lasts[b:]])
        self._absorb()

    def _absorb(self) -> None:
        """Runs of consecutive ids that start at the mark become part of it."""
        k = 0
        S, D, L = self.starts, self.steps, self.lasts
        while k < len(S) and int(S[k]) == self.mark and (int(D[k]) == 1 or S[k] == L[k]):
            self.mark = int(L[k]) + 1
            k += 1
        if k:
            self.starts, self.steps, self.lasts = S[k:], D[k:], L[k:]

    # -- closing -----------------------------------------------------------------------------
    def close_below(self, w: int) -> int:
        """Every id below ``w`` is final (the origin's watermark): count it seen; return the runs
        it removed or cut. One ``searchsorted`` and a slice, so closing a million runs is one pass."""
        if w <= self.mark:
            self.floor = max(self.floor, min(w, self.mark))
            return 0
        S, D, L = self.starts, self.steps, self.lasts
        k = int(np.searchsorted(S, w, "right"))   # runs starting at or below w: all below it but the last
        mark, drop = w, k
        if k:
            s, d, last = int(S[k - 1]), int(D[k - 1]), int(L[k - 1])
            if d == 1 or s == last:
                mark = max(w, last + 1)
            else:                                  # strided across w: its members above w stay
                first = s + -(-(w - s) // d) * d
                if first == w and w <= last:
                    mark, first = w + 1, first + d
                if first <= last:
                    drop = k - 1
                    S, D = S.copy(), D.copy()
                    S[k - 1] = first
                    if first == last:
                        D[k - 1] = 1               # a single id has step 1
        self.starts, self.steps, self.lasts = S[drop:], D[drop:], L[drop:]
        self.mark, self.floor = mark, w
        self._absorb()
        return k

    def merge(self, other: SeenIds) -> None:
        """Hold every id ``other`` holds as well: the replicas of a keyed stage merged by a
        rescale (each applied other keys' records of one origin; the new owner of a key must
        know them all). A mark is the origin's own word (its watermark), so the higher one holds.

        >>> a, b = SeenIds(mark=10, runs=[[12, 2, 16]]), SeenIds(mark=4, runs=[[11, 2, 15], [30, 1, 31]])
        >>> a.merge(b); a.mark, a.runs()
        (10, [[11, 1, 16], [30, 1, 31]])
        """
        floor = max(self.floor, other.floor)
        if other.mark > self.mark:
            self.close_below(other.mark)
        for start, step, last in other.runs():
            if last >= self.mark:
                self.add_many(np.arange(start, last + 1, step, dtype=np.int64))
        self.floor = min(floor, self.mark)

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"mark": self.mark, "floor": self.floor, "runs": self.runs()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SeenIds:
        """From :meth:`state`, or from the ``ranges`` (``[start, end)`` pairs) of earlier versions."""
        runs = state.get("runs")
        if runs is None:
            runs = [[a, 1, b - 1] for a, b in state.get("ranges") or []]
        return cls(int(state.get("mark", NOTHING)), runs, int(state.get("floor", NOTHING)))


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
        """Whether ``i`` (holdable) was written under an earlier generation of ``origin``'s source."""
        return bool(self.older_written_mask(origin, np.array([i], np.int64))[0])

    def older_written_mask(self, origin: str | None, q: np.ndarray) -> np.ndarray:
        """:meth:`older_written` for each id of ``q`` (int64)."""
        mask = np.zeros(len(q), bool)
        for s in self.older.get(origin, ()):
            mask |= s.written_mask(q)
        return mask

    @property
    def holes(self) -> int:
        return sum(s.holes for s in self.sets.values())

    def state(self) -> dict[str, Any]:
        return {o if o is not None else "": s.state() for o, s in self.sets.items()}

    @classmethod
    def union(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The :meth:`state` holding every id any of ``states`` holds, per origin."""
        out = cls()
        for state in states:
            for origin, s in cls.from_state(state).sets.items():
                out.of(origin).merge(s)
        return out.state()

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SeenByOrigin:
        sbo = cls()
        sbo.sets = {(o or None): SeenIds.from_state(s) for o, s in state.items()}
        sbo._link()
        return sbo
