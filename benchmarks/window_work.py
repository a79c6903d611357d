"""The keyed-window benchmark's fixed job, written once here (never streampipe's stage code).

``count`` click records ``{"id": i, "user": "u<k>", "t": i / 1000}`` (100 users, ``k = i * 7919 mod
100``; event time in seconds, 1,000 records a second), counted per user in tumbling windows of
``WINDOW_S`` seconds. :func:`batches` makes them as lists of dicts (what bytewax's source and
streampipe's records path get); :func:`columns` the same values as numpy columns (streampipe's
columnar path). The streampipe sources below are user stages made from them; bytewax's dataflow
(``window_flow.py``) uses :func:`batches` too.

>>> [r["user"] for r in next(batches(3))], next(batches(3))[2]["t"]
(['u0', 'u19', 'u38'], 0.002)
>>> c = next(columns(3)); c["user"].tolist(), c["t"].tolist() == [r["t"] for r in next(batches(3))]
(['u0', 'u19', 'u38'], True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

USERS = 100
WINDOW_S = 10.0
BATCH = 1000


def batches(count: int, batch: int = BATCH) -> Iterator[list[dict[str, Any]]]:
    for lo in range(0, count, batch):
        yield [{"id": i, "user": f"u{i * 7919 % USERS}", "t": i / 1000} for i in range(lo, min(lo + batch, count))]


NAMES = np.array([f"u{k}" for k in range(USERS)])


def columns(count: int, batch: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
    for lo in range(0, count, batch):
        ids = np.arange(lo, min(lo + batch, count), dtype=np.int64)
        yield {"id": ids, "user": NAMES[ids * 7919 % USERS], "t": ids / 1000}


def stamp(folder: str | Path) -> None:
    """The moment the first record is made: the start of every variant's span."""
    path = Path(folder) / "start"
    if not path.exists():
        path.write_text(repr(time.time()))


# -- streampipe's sources, as a user writes them (this module sits beside the benchmark's services.yaml)

try:
    from streampipe import Source
    from streampipe.stages.columns import Columns
except ImportError:          # bytewax's interpreter needs only the job
    Source = object  # type: ignore[assignment,misc]


class Clicks(Source):  # type: ignore[misc,valid-type]
    """The job's records, as dicts (the records path)."""

    def __init__(self, count: int, folder: str) -> None:
        super().__init__()
        self.count, self.folder = count, folder

    def generate(self) -> Iterator[dict[str, Any]]:
        stamp(self.folder)
        for batch in batches(self.count):
            yield from batch


class ClickColumns(Source):  # type: ignore[misc,valid-type]
    """The job's records, as columns (the columnar path)."""

    columnar = True

    def __init__(self, count: int, folder: str) -> None:
        super().__init__()
        self.count, self.folder = count, folder

    def generate(self) -> Iterator[dict[str, Any]]:
        for batch in self.generate_columns():
            yield from batch.to_records()

    def generate_columns(self) -> Iterator[Any]:
        stamp(self.folder)
        for data in columns(self.count):
            yield Columns(data)
