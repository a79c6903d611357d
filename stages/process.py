"""Calling a stage's ``process``: sync or async, with per-record isolation of failures.

Shared by the stage runtime and the in-process test harness (:mod:`streampipe.testing`), so that
what a test sees is exactly what a stage process does.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from streampipe.stages.api import Batch, Record, Stage


@dataclass
class Outcome:
    """What one call of ``process`` on a batch produced."""

    records: list[Record] = field(default_factory=list)
    rejected: list[tuple[Record, str, str]] = field(default_factory=list)  # (record, error, traceback)
    exceptions: list[BaseException] = field(default_factory=list)          # what process raised, per failed record


class Processor:
    """Drives ``stage.process`` for one stage instance.

    A batch whose ``process`` raises is retried one record at a time, so one bad record costs
    only itself: the records that fail alone are rejected (dead-lettered) with their error.
    Records a stage rejects itself with ``self.reject(record, reason)`` are collected too.
    """

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        fn = stage.process
        self._asyncgen = inspect.isasyncgenfunction(fn)
        self._async = self._asyncgen or inspect.iscoroutinefunction(fn)
        self._loop: asyncio.AbstractEventLoop | None = asyncio.new_event_loop() if self._async else None

    def _call(self, batch: Batch) -> list[Record]:
        if self._loop is None:
            return as_records(self.stage.process(batch))
        if self._asyncgen:
            async def collect() -> list[Record]:
                return [r async for r in self.stage.process(batch)]  # type: ignore[attr-defined]
            return self._loop.run_until_complete(collect())
        result: Any = self._loop.run_until_complete(self.stage.process(batch))  # type: ignore[arg-type]
        return as_records(result)

    def run(self, batch: Batch) -> Outcome:
        outcome = Outcome()
        try:
            outcome.records = self._call(batch)
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
                    single = self.run([record])
                    outcome.records.extend(single.records)
                    outcome.rejected.extend(single.rejected)
                    outcome.exceptions.extend(single.exceptions)
        take_rejected = getattr(self.stage, "take_rejected", None)   # a plain class (no base) has none
        if take_rejected is not None:
            outcome.rejected.extend(take_rejected())
        return outcome

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


def _error_text() -> str:
    exc = sys.exc_info()[1]
    return f"{type(exc).__name__}: {exc}"


def as_records(out: Any) -> list[Record]:
    """What ``process`` returned, as a list: a list, any iterable, one bare record, or None."""
    if isinstance(out, list):
        return out
    if isinstance(out, dict):
        return [out]
    return list(out) if out is not None else []
