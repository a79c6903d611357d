"""The source cursor: a source replica's positions (marks), what is committed end to end, its
origin and watermark (see the package docstring: a watermark is announced only once the position
it belongs to is saved)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from loguru import logger

from streampipe.stages.api import Record
from streampipe.stages.columns import Columns
from streampipe.stages.runtime.counters import Counters
from streampipe.stages.runtime.tokens import Mark


class SourceCursor:
    """Where a source replica is: the marks cut and not yet acknowledged, the position committed
    end to end, the highest id pulled, the watermark announced, and the generation of its id space.

    The watermark rises only in :meth:`saved`, after the position it belongs to is in the state
    file, so a restart never resumes below a watermark already announced.
    """

    def __init__(self, name: str, replica: int, counters: Counters,
                 on_commit: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.name, self.replica, self.counters, self.on_commit = name, replica, counters, on_commit
        self.marks: deque[Mark] = deque()
        self.committed: dict[str, Any] | None = None
        self.generation = 0                       # of the source's id space (bumped when it is repartitioned)
        self.watermark: int | None = None         # announced: every id of this origin below it is acknowledged
        self.committed_top: int | None = None     # the watermark of ``committed``: announced once it is saved
        self.id_top: int | None = None            # one more than the highest id pulled so far
        self.ordered = True                       # ids have increased so far: the watermark may rise
        self.out_of_order = 0                     # ids that did not increase

    @property
    def origin(self) -> str:
        return f"{self.name}.{self.replica}/{self.generation}"

    @property
    def stamp(self) -> tuple[str | None, int | None]:
        """What a batch cut now carries: ``(origin, watermark)``."""
        return self.origin, self.watermark

    # -- positions ---------------------------------------------------------------------------
    def mark(self, state: dict[str, Any]) -> Mark:
        """A new position (the stage's snapshot now), committed once its batches are acknowledged."""
        mark = Mark(state, self.id_top)
        self.marks.append(mark)
        return mark

    def advance(self) -> None:
        """Commit every leading mark whose batches are all acknowledged (never past one that is not)."""
        while self.marks and self.marks[0].outstanding <= 0:
            mark = self.marks.popleft()
            self.committed = mark.state
            if mark.top is not None:
                self.committed_top = mark.top
            if self.on_commit is not None:
                self.on_commit(mark.state)

    def to_save(self) -> tuple[int | None, list[Any]]:
        """The watermark to save with the committed position, and its state-file field."""
        top = self.committed_top if self.ordered and self.committed_top is not None else self.watermark
        return top, [self.generation, top, self.ordered]

    def saved(self, top: int | None) -> None:
        """The position and ``top`` are in the state file: only now is ``top`` announced."""
        self.watermark = top

    def restore(self, saved: dict[str, Any]) -> None:
        """The position, generation and watermark a restart resumes at (what ``to_save`` wrote).

        A watermark saved under another generation is dropped: a repartitioned id space starts afresh.
        """
        self.committed = saved.get("state")
        self.generation = int(saved.get("generation") or 0)
        gen, w, ordered = (list(saved.get("watermark") or []) + [None, None, True])[:3]
        if gen == self.generation and type(w) is int:
            self.watermark = self.id_top = w
            self.ordered = bool(ordered)

    # -- ids ---------------------------------------------------------------------------------
    def check_id_column(self, batch: Columns) -> Columns:
        """``check_ids`` on a columnar batch: one numpy pass when the ids increase (the usual case)."""
        ids = batch.data.get("id")
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu" or not len(ids):
            if ids is None or not len(batch):
                return batch
            return Columns.from_records(self.check_ids(batch.to_records()))   # a list column: per record
        if (self.id_top is None or int(ids[0]) >= self.id_top) and bool((ids[1:] > ids[:-1]).all()):
            self.id_top = int(ids[-1]) + 1
            return batch
        kept = self.check_ids(batch.to_records())
        return Columns.from_records(kept) if kept else Columns()

    def check_ids(self, taken: list[Record]) -> list[Record]:
        """Raise ``id_top`` over the ids of ``taken``; handle ids that do not increase (package docstring).

        Returns the records to send: all of them, unless one has an id below the announced
        watermark (dead-lettered: the sink would drop it as a duplicate).
        """
        top = self.id_top
        for r in taken:
            i = r.get("id") if type(r) is dict else None
            if type(i) is not int:
                continue
            if top is None or i >= top:
                top = i + 1
            else:
                break
        else:
            self.id_top = top
            return taken
        kept: list[Record] = []     # slow path: an id did not increase
        for r in taken:
            i = r.get("id") if type(r) is dict else None
            if type(i) is int and self.id_top is not None and i < self.id_top:
                if self.ordered:
                    self.ordered = False
                    logger.warning(f"source ids stopped increasing (id {i} after {self.id_top - 1}): the watermark of "
                                   f"{self.origin} stays at {self.watermark}; the sink keeps its ids exactly from now on")
                self.out_of_order += 1
                if self.watermark is not None and i < self.watermark:
                    self.counters.reject(r, f"id {i} is below watermark {self.watermark} that this source replica already "
                                            "announced (ids must increase per source replica): a sink would take it for a duplicate")
                    continue
            elif type(i) is int:
                self.id_top = i + 1
            kept.append(r)
        return kept
