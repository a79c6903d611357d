"""The sink's seen-id set: time to close a million holes, and the per-record cost of admitting ids.

    python benchmarks/dedup.py [--holes 1000000] [--repeat 5]

Closing holes below a watermark is one bisect and one slice deletion (linear in the holes closed);
the horizon-based closing it replaced deleted from the front of two lists one hole at a time
(quadratic: a restart that closed every hole at once froze the sink's loop). Prints a table and,
last, one JSON object with every figure (medians of ``--repeat``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from rich.console import Console

from streampipe.stages.seen import SeenIds


def close_million(holes: int) -> float:
    """Seconds for one ``close_below`` that closes ``holes`` holes (every odd id missing)."""
    seen = SeenIds()
    seen.add_many(list(range(0, 2 * holes, 2)))
    t0 = time.perf_counter()
    closed = seen.close_below(2 * holes)
    dt = time.perf_counter() - t0
    assert closed >= holes and seen.holes == 0
    return dt


def admit(n: int, stride: int) -> float:
    """Nanoseconds per id for ``add_many`` of ``n`` ids in batches of 100, one partition of ``stride``."""
    seen = SeenIds()
    ids = list(range(0, n * stride, stride))
    t0 = time.perf_counter()
    for k in range(0, n, 100):
        seen.add_many(ids[k:k + 100])
        seen.close_below(ids[max(0, k - 1000)])     # a watermark ~10 batches behind, as in flight
    return (time.perf_counter() - t0) / n * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--holes", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    console = Console()
    close_s = statistics.median(close_million(a.holes) for _ in range(a.repeat))
    contiguous = statistics.median(admit(1_000_000, 1) for _ in range(a.repeat))
    strided = statistics.median(admit(1_000_000, 2) for _ in range(a.repeat))
    console.print(f"close {a.holes:,} holes in one call: {close_s * 1000:.1f} ms")
    console.print(f"admit ids, contiguous (one source replica): {contiguous:.0f} ns/id")
    console.print(f"admit ids, every other id (one of two replicas): {strided:.0f} ns/id")
    print(json.dumps({"holes": a.holes, "close_ms": round(close_s * 1000, 2), "admit_contiguous_ns": round(contiguous),
                      "admit_strided_ns": round(strided), "repeat": a.repeat}))


if __name__ == "__main__":
    main()
