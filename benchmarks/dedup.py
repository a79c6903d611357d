"""The sink's seen-id set: time to close a million runs, and the per-record cost of admitting ids.

    python benchmarks/dedup.py [--holes 1000000] [--repeat 5]

Closing runs below a watermark is one searchsorted and one slice (linear in the runs closed);
the horizon-based closing of an earlier version deleted from the front of two lists one hole at a
time (quadratic: a restart that closed every hole at once froze the sink's loop). Admitting ids is
timed for one source replica (contiguous ids), one of two replicas (every other id), and one of two
sink replicas behind two replicas (every other id, every other batch). Prints a table and, last,
one JSON object with every figure (medians of ``--repeat``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from rich.console import Console

from streampipe.stages.seen import SeenIds


def close_million(holes: int) -> float:
    """Seconds for one ``close_below`` that closes ``holes`` runs (every third id missing: runs of two)."""
    seen = SeenIds()
    seen.add_many(np.arange(3 * holes)[np.arange(3 * holes) % 3 != 0])
    assert seen.holes == holes
    t0 = time.perf_counter()
    closed = seen.close_below(3 * holes)
    dt = time.perf_counter() - t0
    assert closed == holes and seen.holes == 0
    return dt


def admit(n: int, stride: int, every: int = 1, batch: int = 1000) -> float:
    """Nanoseconds per id for ``add_many`` of ``n`` ids in batches of ``batch``, one partition of
    ``stride``, every ``every``-th batch of it (a sink replica's share)."""
    seen = SeenIds()
    ids = np.arange(0, n * stride, stride, dtype=np.int64)
    starts = range(0, n, batch * every)
    t0 = time.perf_counter()
    for k in starts:
        seen.add_many(ids[k:k + batch])
        seen.close_below(int(ids[max(0, k - 32 * batch)]))   # a watermark ~32 batches behind, as in flight
    return (time.perf_counter() - t0) / (len(starts) * batch) * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--holes", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    console = Console()
    close_s = statistics.median(close_million(a.holes) for _ in range(a.repeat))
    contiguous = statistics.median(admit(1_000_000, 1) for _ in range(a.repeat))
    strided = statistics.median(admit(1_000_000, 2) for _ in range(a.repeat))
    shared = statistics.median(admit(1_000_000, 2, every=2) for _ in range(a.repeat))
    console.print(f"close {a.holes:,} runs in one call: {close_s * 1000:.1f} ms")
    console.print(f"admit ids, contiguous (one source replica): {contiguous:.0f} ns/id")
    console.print(f"admit ids, every other id (one of two replicas): {strided:.0f} ns/id")
    console.print(f"admit ids, every other id, every other batch (one of two sink replicas): {shared:.0f} ns/id")
    print(json.dumps({"holes": a.holes, "close_ms": round(close_s * 1000, 2), "admit_contiguous_ns": round(contiguous),
                      "admit_strided_ns": round(strided), "admit_shared_ns": round(shared), "repeat": a.repeat}))


if __name__ == "__main__":
    main()
