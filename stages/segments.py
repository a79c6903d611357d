"""Sets of record ids as arithmetic progressions, and how to deal them out to a new replica count.

A partitioned source (the built-in generator) owns, in each replica, a set of ids it has still
to emit. The set is a list of *segments* ``[start, step, stop]``: the ids ``start, start + step,
...`` below ``stop`` (``stop`` is ``None`` for an endless tail). A fresh replica ``r`` of ``n``
owns ``[[r, n, None]]``. A replica emits its ids in increasing order (merging its segments), so
"everything up to the last id emitted" is its whole position: :func:`after` turns that into the
segments left.

When the replica count changes, :func:`deal` hands the union of every replica's leftover ids to
the new replicas: finite segments are dealt out (a long one interleaved over all of them), and
the endless tails are cut at a common point above which they are re-split round-robin. The union
is kept exactly and no id is given twice.

>>> after([[0, 1, None]], 4)
[[5, 1, None]]
>>> deal([[[5, 1, None]]], 2)
[[[5, 2, None]], [[6, 2, None]]]
>>> deal([[[7, 2, None]], [[6, 2, None]]], 1)
[[[6, 1, None]]]
>>> list(itertools.islice(ids([[1, 4, 10], [0, 2, None]]), 6))
[0, 1, 2, 4, 5, 6]
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

Segment = list[Any]   # [start: int, step: int, stop: int | None]


def check(segment: Any) -> Segment:
    """A segment from a saved state, validated: ``[start, step >= 1, stop or None]``."""
    start, step, stop = segment
    if isinstance(start, bool) or not isinstance(start, int) or not isinstance(step, int) or step < 1:
        raise ValueError(f"bad id segment {segment!r}: want [start, step >= 1, stop or None]")
    if stop is not None and not isinstance(stop, int):
        raise ValueError(f"bad id segment {segment!r}: stop must be an int or None")
    return [start, step, stop]


def empty(segment: Segment) -> bool:
    return segment[2] is not None and segment[0] >= segment[2]


def size(segment: Segment) -> int | None:
    """How many ids a segment holds (None: endless)."""
    start, step, stop = segment
    return None if stop is None else max(0, -(-(stop - start) // step))


def after(segments: Iterable[Segment], last: int | None) -> list[Segment]:
    """The segments left once every id up to ``last`` has been emitted (``None``: nothing yet)."""
    left = []
    for start, step, stop in segments:
        if last is not None and start <= last:
            start += ((last - start) // step + 1) * step
        seg = [start, step, stop]
        if not empty(seg):
            left.append(seg)
    return left


def ids(segments: Iterable[Segment]) -> Iterator[int]:
    """Every id of ``segments`` in increasing order (segments of one replica never overlap)."""
    streams = [itertools.count(s, d) if e is None else iter(range(s, e, d)) for s, d, e in segments]
    return heapq.merge(*streams)


def first(segments: Iterable[Segment]) -> int | None:
    """The smallest id left, or None when there is none."""
    return min((s[0] for s in segments if not empty(s)), default=None)


def deal(layout: list[list[Segment]], replicas: int) -> list[list[Segment]]:
    """Split the ids left in every old replica (``layout[r]``) among ``replicas`` new ones.

    Finite segments of at least ``replicas`` ids are interleaved over all new replicas, shorter
    ones go whole to the replica with the fewest finite ids so far. The endless tails are cut at
    a point ``cut`` (a multiple of the lcm ``period`` of their steps, at or above every tail's
    start): below it they become finite segments, above it their ids are the residues
    ``residues`` modulo ``period`` and are dealt round-robin, the k-th id to replica
    ``k % replicas``, which is again a few arithmetic progressions per replica.
    """
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    segments = [check(s) for old in layout for s in old]
    segments = [s for s in segments if not empty(s)]
    tails = [s for s in segments if s[2] is None]
    finite = [s for s in segments if s[2] is not None]
    out: list[list[Segment]] = [[] for _ in range(replicas)]
    if tails:
        period = math.lcm(*(d for _, d, _ in tails))
        cut = -(-max(s for s, _, _ in tails) // period) * period
        finite += [[s, d, cut] for s, d, _ in tails if s < cut]
        residues = sorted({(s % d) + j * d for s, d, _ in tails for j in range(period // d)})
        if len(residues) == period:      # every residue: the tails above the cut are all ids
            period, residues = 1, [0]
        n_res = len(residues)
        rounds = replicas // math.gcd(n_res, replicas)   # k and k + rounds * n_res go to one replica
        for i, res in enumerate(residues):
            for q in range(rounds):
                out[(q * n_res + i) % replicas].append([cut + q * period + res, period * rounds, None])
    load = [0] * replicas
    for seg in sorted(finite, key=lambda s: -(size(s) or 0)):
        start, step, stop = seg
        n = size(seg) or 0
        if n >= replicas:
            for j in range(replicas):
                out[j].append([start + j * step, step * replicas, stop])
                load[j] += n // replicas
        elif n:
            j = load.index(min(load))
            out[j].append(seg)
            load[j] += n
    return [tidy(segs) for segs in out]


def tidy(segments: Iterable[Segment]) -> list[Segment]:
    """Sorted, without empty segments, runs of consecutive ids joined (``[6, 2, 8] + [7, 1, None]``
    is ``[6, 1, None]``), so that repeated re-dealing does not pile up fragments."""
    runs: list[Segment] = []
    for start, step, stop in sorted((s for s in segments if not empty(s)), key=lambda s: (s[0], s[1])):
        if stop is not None and start + step >= stop:
            step = 1                          # a single id: any step will do
            stop = start + 1
        if runs and runs[-1][1] == 1 == step and runs[-1][2] is not None and runs[-1][2] >= start:
            prev = runs[-1]
            prev[2] = None if stop is None else max(prev[2], stop)
            continue
        runs.append([start, step, stop])
    return runs
