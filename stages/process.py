"""Calling a stage's ``process``: sync or async, with per-record isolation of failures.

Shared by the stage runtime and the in-process test harness (:mod:`streampipe.testing`), so that
what a test sees is exactly what a stage process does.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streampipe.stages.api import Batch, Record, Stage, columnar_transform
from streampipe.stages.columns import Columns


@dataclass
class Outcome:
    """What one call of ``process`` on a batch produced (``records``: a list, or ``Columns`` from a columnar stage)."""

    records: list[Record] | Columns = field(default_factory=list)
    rejected: list[tuple[Record, str, str]] = field(default_factory=list)  # (record, error, traceback)
    exceptions: list[BaseException] = field(default_factory=list)          # what process raised, per failed record


class Processor:
    """Drives ``stage.process`` for one stage instance.

    A batch whose ``process`` raises is retried one record at a time, so one bad record costs
    only itself: the records that fail alone are rejected (dead-lettered) with their error.
    Records a stage rejects itself with ``self.reject(record, reason)`` are collected too.

    The boundary between forms is here: a columnar stage (``columnar = True``) is given
    :class:`Columns` (records are converted; one that is not a map is rejected alone) unless it
    also sets ``accepts_records = True`` (then records stay records), any other stage a list of
    records (columns are converted).
    """

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.columnar = columnar_transform(stage)
        # a columnar stage whose process() takes records too is given records as they come
        self.takes_records = self.columnar and bool(getattr(stage, "accepts_records", False))
        fn = stage.process
        self._asyncgen = inspect.isasyncgenfunction(fn)
        self._async = self._asyncgen or inspect.iscoroutinefunction(fn)
        self._loop: asyncio.AbstractEventLoop | None = asyncio.new_event_loop() if self._async else None

    def _call(self, batch: Batch | Columns) -> list[Record] | Columns:
        if self._loop is None:
            return as_records(self.stage.process(batch))  # type: ignore[arg-type]
        if self._asyncgen:
            async def collect() -> list[Record]:
                return [r async for r in self.stage.process(batch)]  # type: ignore[attr-defined,arg-type]
            return self._loop.run_until_complete(collect())
        result: Any = self._loop.run_until_complete(self.stage.process(batch))  # type: ignore[arg-type]
        return as_records(result)

    def run(self, batch: Batch | Columns) -> Outcome:
        if self.columnar and not isinstance(batch, Columns):
            return self._run(batch) if self.takes_records else self._run_columns_of(batch)
        if not self.columnar and isinstance(batch, Columns):
            batch = batch.to_records()
        if isinstance(batch, Columns):
            return self._run_columns(batch)
        return self._run(batch)

    def finish(self) -> Outcome:
        """The stage's ``finish()`` (the input ended), sync or async: its records, what it rejected,
        and what it raised (nothing to retry record by record: the error is the outcome's)."""
        outcome = Outcome()
        finish = getattr(self.stage, "finish", None)
        if callable(finish):
            try:
                result: Any = finish()
                if inspect.isasyncgen(result):
                    async def collect() -> list[Record]:
                        return [r async for r in result]
                    result = self._run_async(collect())
                elif inspect.isawaitable(result):
                    result = self._run_async(result)
                outcome.records = as_records(result)
            except Exception:
                outcome.exceptions.append(sys.exc_info()[1])  # type: ignore[arg-type]
        self._take_rejected(outcome)
        if isinstance(outcome.records, list):
            outcome.records = self._maps_only(outcome.records, outcome)
        return outcome

    def _take_rejected(self, outcome: Outcome) -> None:
        """The records the stage rejected itself (``self.reject``) go into ``outcome``."""
        take_rejected = getattr(self.stage, "take_rejected", None)   # a plain class (no base) has none
        if take_rejected is not None:
            outcome.rejected.extend(take_rejected())

    def _run_async(self, awaitable: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)

    def run_alone(self, batch: Batch | Columns, culprit: Callable[[int], str | None],
                  begin: Callable[[int], None]) -> Outcome:
        """``batch`` one record at a time (a batch that was in hand when the process died,
        :mod:`streampipe.stages.poison`): ``culprit(i)`` names why record ``i`` is dead-lettered
        unprocessed, or None; ``begin(i)`` is called before record ``i`` is processed."""
        rows = batch.to_records() if isinstance(batch, Columns) else batch
        outcome = Outcome()
        parts: list[list[Record] | Columns] = []
        for i, record in enumerate(rows):
            why = culprit(i)
            if why is not None:
                outcome.rejected.append((record, why, ""))
                continue
            begin(i)
            one = self.run([record])
            parts.append(one.records)
            outcome.rejected.extend(one.rejected)
            outcome.exceptions.extend(one.exceptions)
        outcome.records = _joined(parts)
        return outcome

    def _run_columns_of(self, batch: Batch) -> Outcome:
        """A list of records for a columnar stage: the maps as columns, anything else rejected."""
        bad = [r for r in batch if type(r) is not dict]
        if bad:
            batch = [r for r in batch if type(r) is dict]
        outcome = self._run_columns(Columns.from_records(batch))
        outcome.rejected[:0] = [(r, f"record is {type(r).__name__}, not a map", "") for r in bad]
        return outcome

    def _run_columns(self, batch: Columns) -> Outcome:
        outcome = Outcome()
        try:
            outcome.records = self._call(batch)
        except Exception:
            if not batch.n:
                outcome.exceptions.append(sys.exc_info()[1])  # type: ignore[arg-type]
            elif batch.n == 1:
                outcome.rejected.append((batch.to_records()[0], _error_text(), traceback.format_exc()))
                outcome.exceptions.append(sys.exc_info()[1])  # type: ignore[arg-type]
            else:
                parts = []
                for i in range(batch.n):
                    single = self._run_columns(batch.rows(i, i + 1))
                    parts.append(single.records)
                    outcome.rejected.extend(single.rejected)
                    outcome.exceptions.extend(single.exceptions)
                outcome.records = _joined(parts)
            return outcome
        finally:
            self._take_rejected(outcome)
        if isinstance(outcome.records, list):
            outcome.records = self._maps_only(outcome.records, outcome)
        return outcome

    @staticmethod
    def _maps_only(records: list[Any], outcome: Outcome) -> list[Record]:
        if all(type(r) is dict for r in records):
            return records
        kept = []
        for r in records:
            if type(r) is dict:
                kept.append(r)
            else:
                outcome.rejected.append(({"output": repr(r)[:2000]}, f"process() produced a {type(r).__name__}, not a record (a map)", ""))
        return kept

    def _run(self, batch: Batch) -> Outcome:
        outcome = Outcome()
        try:
            records = self._call(batch)
            if isinstance(records, Columns):          # a record stage may return columns too
                records = records.to_records()
            outcome.records = records
            if any(type(r) is not dict for r in outcome.records):   # a str, None, a number...
                kept = []
                for r in outcome.records:
                    if type(r) is dict:
                        kept.append(r)
                    else:
                        outcome.rejected.append(({"output": repr(r)[:2000]}, f"process() produced a {type(r).__name__}, not a record (a map)", ""))
                outcome.records = kept
        except Exception:
            if not batch:                                   # nothing to dead-letter: keep the error
                outcome.exceptions.append(sys.exc_info()[1])  # type: ignore[arg-type]
            if len(batch) <= 1:
                for record in batch:
                    outcome.rejected.append((record, _error_text(), traceback.format_exc()))
                    outcome.exceptions.append(sys.exc_info()[1])  # type: ignore[arg-type]
            else:
                for record in batch:
                    single = self._run([record])
                    outcome.records.extend(single.records)  # type: ignore[union-attr,arg-type]
                    outcome.rejected.extend(single.rejected)
                    outcome.exceptions.extend(single.exceptions)
        self._take_rejected(outcome)
        return outcome

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


def _error_text() -> str:
    exc = sys.exc_info()[1]
    return f"{type(exc).__name__}: {exc}"


def _joined(parts: list[list[Record] | Columns]) -> list[Record] | Columns:
    """The outputs of a columnar batch retried row by row, as one (a failed row's output is an empty list)."""
    parts = [p for p in parts if len(p)]
    if all(isinstance(p, Columns) for p in parts):
        return Columns.concat(parts)  # type: ignore[arg-type]
    out: list[Record] = []
    for p in parts:
        out.extend(p.to_records() if isinstance(p, Columns) else p)
    return out


def as_records(out: Any) -> list[Record] | Columns:
    """What ``process`` returned, as a list: a list, any iterable, one bare record, or None (or ``Columns``)."""
    if isinstance(out, (list, Columns)):
        return out
    if isinstance(out, dict):
        return [out]
    return list(out) if out is not None else []
