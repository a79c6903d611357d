"""The producer: a source replica's side of the loop. Batches pulled from ``generate()`` (records)
or ``generate_columns()`` (columns) by one path, routed to the edges and held there, then cut into
batches at ``max_batch``, at ``linger_ms`` or at the stream's end, each cut under a mark of the
source cursor (the position that commits once its batches are acknowledged end to end)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from streampipe.stages.api import Record, Source, columnar_source
from streampipe.stages.columns import Columns
from streampipe.stages.runtime.counters import Counters
from streampipe.stages.runtime.cursor import SourceCursor
from streampipe.stages.runtime.outputs import Edge
from streampipe.stages.runtime.router import Router
from streampipe.stages.spec import StageSpec


class Producer:
    """Pulls a source's batches and cuts them; ``edges`` is the runtime's list (read, not written)."""

    def __init__(self, spec: StageSpec, stage: Source, acked: bool, cursor: SourceCursor, counters: Counters,
                 router: Router, edges: list[Edge]) -> None:
        self.stage, self.acked, self.cursor, self.counters, self.router, self.edges = stage, acked, cursor, counters, router, edges
        self.max_batch, self.linger = spec.max_batch, spec.linger_ms / 1000.0
        # a columnar source yields Columns batches from generate_columns() instead of records
        self.columnar = columnar_source(stage)

    def start(self) -> Iterator[Any]:
        return self.stage.generate_columns() if self.columnar else self.stage.generate()  # type: ignore[attr-defined, no-any-return]

    def pull(self, gen: Iterator[Any], now: float) -> tuple[bool, Iterator[Any] | None]:
        """Take up to one batch (``max_batch`` records or rows) from the source; (produced
        anything, the generator, or None once the stream ended)."""
        t0 = time.perf_counter()
        parts, rows, alive = self._pull_columns(gen) if self.columnar else self._pull_records(gen)
        rejected = self.stage.take_rejected()
        for record, error, tb in rejected:   # lines a replay could not parse
            self.counters.reject(record, error, tb)
        if rows:
            self.counters.observe_latency((time.perf_counter() - t0) * 1000.0)
            self.counters.took(rows)
            for part in parts:
                groups = self.router.group(part)
                for edge in self.edges:
                    out = groups.get(edge.output)
                    if out is not None and len(out):
                        edge.hold(out, now)
            if alive is None or any(e.pending_n >= self.max_batch for e in self.edges):
                self.cut()
        elif alive is None or rejected:
            self.cut()   # a mark with no batch: the position past them commits
        return bool(rows), alive

    def _pull_records(self, gen: Iterator[Record | None]) -> tuple[list[list[Record]], int, Iterator[Any] | None]:
        taken: list[Record] = []
        alive: Iterator[Any] | None = gen
        try:
            for _ in range(self.max_batch):
                r = next(gen)
                if r is None:
                    break
                taken.append(r)
        except StopIteration:
            alive = None
        if taken and self.acked:
            taken = self.cursor.check_ids(taken)
        return [taken], len(taken), alive

    def _pull_columns(self, gen: Iterator[Columns | None]) -> tuple[list[Columns], int, Iterator[Any] | None]:
        taken: list[Columns] = []
        rows = 0
        alive: Iterator[Any] | None = gen
        try:
            while rows < self.max_batch:
                batch = next(gen)
                if batch is None:
                    break
                if not isinstance(batch, Columns):
                    raise TypeError(f"generate_columns() yielded a {type(batch).__name__}, not Columns")
                if self.acked:
                    batch = self.cursor.check_id_column(batch)
                if len(batch):
                    taken.append(batch)
                    rows += len(batch)
        except StopIteration:
            alive = None
        return taken, rows, alive

    def cut(self) -> None:
        """Cut every edge's held records into batches, under a new mark of the cursor."""
        mark = self.cursor.mark(self.stage.snapshot()) if self.acked else None
        stamp = self.cursor.stamp
        for edge in self.edges:
            edge.flush_pending(mark, stamp)
        if mark is not None:
            self.cursor.advance()   # never past a mark whose batches are still unacknowledged

    def flush_lingering(self, now: float) -> None:
        """A partial batch leaves after ``linger_ms``."""
        if any(e.pending_n and now - e.pending_since >= self.linger for e in self.edges):
            self.cut()
