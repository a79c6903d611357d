"""The keyed-window job as a bytewax dataflow, the way bytewax's windowing documentation shows it.

    python -m bytewax.run "window_flow:get_flow(1000000, '/tmp/out')"

(``windows.py`` runs it so, this folder on ``PYTHONPATH``; needs ``pip install -e '.[bench]'``.)
The job is :mod:`window_work`'s: its records in lists of 1,000 from a ``DynamicSource``, the
event time from ``t`` (``EventClock``, no wait for system time), ``count_window`` per ``user`` over a
``TumblingWindower`` of ``WINDOW_S`` seconds, one JSON line per window result to
``<folder>/records.0.jsonl`` (``bytewax_flow``'s sink). At the end of its input bytewax closes every window still open.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import window_work
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.operators import windowing as win
from bytewax_flow import JsonLinesSink

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _Partition(StatelessSourcePartition[dict[str, Any]]):
    def __init__(self, count: int, folder: str) -> None:
        self.folder = folder
        self.batches: Iterator[list[dict[str, Any]]] = window_work.batches(count)

    def next_batch(self) -> list[dict[str, Any]]:
        window_work.stamp(self.folder)
        return next(self.batches)


class Clicks(DynamicSource[dict[str, Any]]):
    def __init__(self, count: int, folder: str) -> None:
        self.count, self.folder = count, folder

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(self.count, self.folder)


def get_flow(count: int, folder: str) -> Dataflow:
    flow = Dataflow("streampipe-window-bench")
    clicks = op.input("clicks", flow, Clicks(count, folder))
    # bytewax's event clock also advances with system time since the newest record: with no wait, a
    # millisecond's stall between two batches makes the next (in-order) records late, and they are
    # dropped from the count; 5 s covers any stall of a run (records come in event-time order here)
    clock = win.EventClock(lambda r: EPOCH + timedelta(seconds=r["t"]), wait_for_system_duration=timedelta(seconds=5))
    windower = win.TumblingWindower(length=timedelta(seconds=window_work.WINDOW_S), align_to=EPOCH)
    counted = win.count_window("per_user", clicks, clock, windower, lambda r: r["user"])
    rows = op.map("row", counted.down, lambda kv: {"user": kv[0], "window_start": kv[1][0] * window_work.WINDOW_S,
                                                     "count": kv[1][1]})
    op.output("out", rows, JsonLinesSink(folder))     # the throughput job's sink: records.<worker>.jsonl
    return flow
