"""A stage author's test kit: run a stage in-process, and check it against the stage contract.

- :func:`run_stage` drives a stage with lists of records: no sockets, no processes. Fast and
  exact, for unit tests and for trying a stage in a REPL. It calls the stage through the same
  ``Processor`` the runtime uses, so failures isolate and dead-letter the same way.
- :func:`check_stage` runs the contract suite that every built-in stage passes on a stage of
  yours (as river's ``check_estimator`` does for estimators), and raises
  :class:`StageContractError` naming the first check that fails.

Both accept any object with the stage methods (``process`` or ``generate``; ``setup``,
``teardown``, ``snapshot``, ``restore``, ``route`` are optional), a :class:`streampipe.Stage`
subclass or not.

>>> from streampipe.stages.normalizer import Normalizer
>>> run = run_stage(Normalizer(), [[{"id": 0, "x": [1.0], "y": 0}, {"id": 1, "x": "bad", "y": 0}]])
>>> len(run.records), [reason for _, reason in run.dead_letters]
(1, ["field 'x': expected vector, got str"])
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streampipe.stages import wire
from streampipe.stages.api import Batch, Record, StageContext, as_stage, is_source
from streampipe.stages.columns import Columns
from streampipe.stages.process import Processor

__all__ = ["Run", "StageContractError", "StageReport", "check_stage", "run_stage"]

SOURCE_LIMIT = 100        # records a source check takes before and after the snapshot
VOLATILE = ("t",)         # fields set from the clock (the built-in sources' event time ``t``)


@dataclass
class Run:
    """What :func:`run_stage` saw: every output record, the same by output name, and dead letters."""

    records: list[Record] = field(default_factory=list)
    by_output: dict[str, list[Record]] = field(default_factory=dict)
    dead_letters: list[tuple[Record, str]] = field(default_factory=list)


def run_stage(stage: Any, batches: Iterable[Batch] = (), *, run_dir: Path | None = None,
              limit: int | None = None, setup: bool = True, teardown: bool = True,
              context: dict[str, Any] | None = None) -> Run:
    """Run ``stage`` over ``batches`` (or, for a source, take up to ``limit`` records, stopping
    early at the end of its stream or the first time it is idle, i.e. yields ``None``).

    Every record is round-tripped through msgpack as it would be on a socket, so a stage that
    emits something the wire cannot carry fails here too.
    """
    stage = as_stage(stage)    # a plain class's instance or a function works as in a pipeline
    _set_context(stage, run_dir or Path(tempfile.mkdtemp(prefix="streampipe-test-")), context)
    result = Run()
    if setup:
        _optional(stage, "setup")
    if is_source(stage):
        for record in stage.generate():
            if record is None:
                break
            _collect(stage, [record], result)
            if limit is not None and len(result.records) >= limit:
                break
    else:
        processor = Processor(stage)
        for batch in batches:
            outcome = processor.run(wire.unpackb(wire.packb(batch)))
            result.dead_letters.extend((r, reason) for r, reason, _ in outcome.rejected)
            _collect(stage, outcome.records, result)
        processor.close()
    if teardown:
        _optional(stage, "teardown")
    return result


def _collect(stage: Any, out: list[Record] | Columns, result: Run) -> None:
    # a columnar stage's output as the next record stage would see it
    records: list[Record] = wire.unpackb(wire.packb(out.to_records() if isinstance(out, Columns) else out))
    result.records.extend(records)
    for r in records:
        result.by_output.setdefault(_route(stage, r), []).append(r)


def _set_context(stage: Any, run_dir: Path, context: dict[str, Any] | None) -> None:
    stage.context = StageContext(run_dir=run_dir, **(context or {}))


def _optional(stage: Any, method: str, *args: Any) -> Any:
    """Call ``stage.method(*args)`` if the stage defines it (every method but process/generate is optional)."""
    fn = getattr(stage, method, None)
    return fn(*args) if callable(fn) else None


def _route(stage: Any, record: Record) -> str:
    route = getattr(stage, "route", None)
    return str(route(record)) if callable(route) else "default"


# -- the contract ------------------------------------------------------------------------------
class StageContractError(AssertionError):
    """A stage broke the stage contract; ``check`` names the check, the message says how."""

    def __init__(self, stage: str, check: str, problem: str) -> None:
        super().__init__(f"check_stage({stage}): {check}: {problem}")
        self.stage, self.check, self.problem = stage, check, problem


@dataclass
class StageReport:
    """What :func:`check_stage` checked and saw, when every check passed."""

    stage: str
    source: bool
    checks: list[str] = field(default_factory=list)        # the checks that ran, in order
    records: list[Record] = field(default_factory=list)    # output of the sample run (a source: what it generated)
    dead_letters: list[tuple[Record, str]] = field(default_factory=list)   # the bad records, as dead-lettered
    snapshot: dict[str, Any] = field(default_factory=dict)                 # the snapshot that round-tripped
    stateful: bool = False                                 # the snapshot changed with the work done


def check_stage(stage: Callable[[], Any], sample_batches: Sequence[Batch] = (), *,
                bad_records: Sequence[Record] = (), run_dir: Path | None = None,
                context: dict[str, Any] | None = None, volatile: Collection[str] = VOLATILE,
                limit: int = SOURCE_LIMIT) -> StageReport:
    """Check a stage class (or a factory of fresh instances) against the stage contract.

    ``stage`` is called with no argument for each instance the checks need, so pass the class,
    or ``lambda: MyStage(option=1)``. A transform or sink is fed ``sample_batches`` (good
    records, two batches or more); a source is asked for up to ``limit`` records, then
    ``limit`` more. The checks, in order:

    - ``init``: building an instance leaves no file or socket open (``__init__`` must be cheap;
      resources belong in ``setup``);
    - ``empty batch`` (transforms): ``process([])`` neither fails nor dead-letters;
    - ``outputs`` / ``generate``: every record is a map msgpack can carry, routed to a declared
      output, and no sample record is dead-lettered;
    - ``snapshot``: ``snapshot()`` crosses msgpack unchanged, and a fresh instance given
      ``restore(snapshot())`` has an equal snapshot;
    - ``restore``: that fresh instance then produces the same output on the same next batch
      (a source: resumes with the same records, none skipped or repeated);
    - ``teardown``: ``teardown()`` may run twice;
    - ``bad records`` (transforms, if given): a batch of ``bad_records`` followed by the first
      sample batch: each bad record is dead-lettered with a reason or passed on, never fatal,
      and no good record beside them is dead-lettered.

    Fields in ``volatile`` (the event time ``t``) are left out when outputs are compared.
    Raises :class:`StageContractError` (an ``AssertionError``) at the first failed check and
    returns a :class:`StageReport` when all pass.

    >>> from streampipe import Stage
    >>> class Upper(Stage):
    ...     def process(self, batch):
    ...         return [{**r, "name": r["name"].upper()} for r in batch]
    >>> check_stage(Upper, [[{"id": 0, "name": "ada"}], [{"id": 1, "name": "bob"}]]).checks
    ['init', 'empty batch', 'outputs', 'snapshot', 'restore', 'teardown']
    """
    made = run_dir is None
    root = run_dir or Path(tempfile.mkdtemp(prefix="streampipe-check-"))
    try:
        return _Checker(stage, root, context or {}, volatile).run(list(sample_batches), list(bad_records), limit)
    finally:
        if made:
            shutil.rmtree(root, ignore_errors=True)


class _Checker:
    def __init__(self, factory: Callable[[], Any], run_dir: Path, context: dict[str, Any],
                 volatile: Collection[str]) -> None:
        if not callable(factory):
            raise TypeError("check_stage needs the stage class or a factory of fresh instances, "
                            f"not an instance of {type(factory).__name__}")
        self.factory, self.run_dir, self.context, self.volatile = factory, run_dir, context, volatile
        self.name = factory.__qualname__ if isinstance(factory, type) else repr(factory)
        self.report: StageReport | None = None

    def fail(self, check: str, problem: str) -> StageContractError:
        return StageContractError(self.name, check, problem)

    def make(self) -> Any:
        stage = self.factory()
        if not callable(getattr(stage, "process", None)) and not callable(getattr(stage, "generate", None)):
            raise self.fail("init", f"{type(stage).__name__} has neither process() nor generate()")
        _set_context(stage, self.run_dir, self.context)
        return stage

    def run(self, batches: list[Batch], bad: list[Record], limit: int) -> StageReport:
        first = self.make()
        if not isinstance(self.factory, type):
            self.name = type(first).__qualname__    # a factory: name the stage it makes
        report = self.report = StageReport(stage=self.name, source=is_source(first))
        self.check_init()
        if report.source:
            self.check_source(limit)
        else:
            self.check_transform(batches, bad)
        return report

    def passed(self, check: str) -> None:
        assert self.report is not None
        self.report.checks.append(check)

    # -- init ---------------------------------------------------------------------------------
    def check_init(self) -> None:
        """Build one more instance (the first one paid for the imports) and compare open fds."""
        before = _open_fds()
        stage = self.factory()
        opened = sorted(set(_open_fds().items()) - set(before.items()))
        if opened:
            what = ", ".join(target for _, target in opened)
            raise self.fail("init", f"__init__ left {len(opened)} file(s) or socket(s) open ({what}); "
                                    "open them in setup() and close them in teardown()")
        del stage
        self.passed("init")

    # -- transforms ---------------------------------------------------------------------------
    def check_transform(self, batches: list[Batch], bad: list[Record]) -> None:
        assert self.report is not None
        stage = self.make()
        fresh_snapshot = self.snapshot_of(stage)
        _optional(stage, "setup")
        processor = Processor(stage)
        try:
            empty = processor.run([])
            if empty.exceptions or empty.rejected:
                why = repr(empty.exceptions[0]) if empty.exceptions else empty.rejected[0][1]
                raise self.fail("empty batch", f"process([]) failed: {why}")
            self.check_records("empty batch", stage, empty.records)
            self.passed("empty batch")
            for i, batch in enumerate(batches[:-1]):
                self.report.records += self.process_sample(stage, processor, batch, i)
            self.passed("outputs")
            snap = self.check_snapshot(stage, fresh_snapshot)
            last = batches[-1] if batches else []
            # a restart from the snapshot (and the run directory as it is at that point) ...
            again = self.restored(snap)
            _optional(again, "setup")
            restarted = Processor(again)
            try:
                out_b = self.process_sample(again, restarted, last, len(batches) - 1)
            finally:
                restarted.close()
                _optional(again, "teardown")
            # ... must do what the stage does without one
            out_a = self.process_sample(stage, processor, last, len(batches) - 1)
            self.report.records += out_a
        finally:
            processor.close()
        self.check_teardown(stage)
        if self.stable(out_a) != self.stable(out_b):
            raise self.fail("restore", f"the next batch gave {len(out_b)} different record(s) after restore(snapshot()) "
                                       f"than without a restart ({len(out_a)}); first: {self.first_difference(out_a, out_b)}")
        self.passed("restore")
        self.passed("teardown")
        if bad:
            self.check_bad_records(batches[0] if batches else [], bad)

    def process_sample(self, stage: Any, processor: Processor, batch: Batch, index: int) -> list[Record]:
        outcome = processor.run(wire.unpackb(wire.packb(batch)))
        if outcome.rejected:
            record, reason, _ = outcome.rejected[0]
            raise self.fail("outputs", f"batch {index}: a sample record was dead-lettered ({reason}): {_short(record)}")
        records = outcome.records.to_records() if isinstance(outcome.records, Columns) else outcome.records
        self.check_records("outputs", stage, records)
        return records

    def check_records(self, check: str, stage: Any, records: list[Any] | Columns) -> None:
        outputs = {"default", *getattr(stage, "outputs", ())}
        if isinstance(records, Columns):
            records = records.to_records()
        for record in records:
            if type(record) is not dict:
                raise self.fail(check, f"produced a {type(record).__name__}, not a record (a map): {_short(record)}")
            try:
                wire.unpackb(wire.packb(record))
            except (TypeError, ValueError) as exc:
                raise self.fail(check, f"a record msgpack cannot carry ({exc}): {_short(record)}") from None
            if (out := _route(stage, record)) not in outputs:
                raise self.fail(check, f"route() sent a record to {out!r}, not one of the declared outputs {sorted(outputs)}")

    def check_bad_records(self, good: Batch, bad: list[Record]) -> None:
        """Last, on an instance of its own: ``bad`` records first in a batch, then ``good`` ones."""
        assert self.report is not None
        run = run_stage(self.make(), [[*bad, *good]], run_dir=self.run_dir, context=self.context)
        if any(not reason for _, reason in run.dead_letters):
            raise self.fail("bad records", "a record was dead-lettered without a reason")
        good_rejected = [r for r, _ in run.dead_letters if r in good and r not in bad]
        if good_rejected:
            raise self.fail("bad records", f"a good record beside the bad ones was dead-lettered too: {_short(good_rejected[0])}")
        self.report.dead_letters = run.dead_letters
        self.passed("bad records")

    # -- snapshot / restore ---------------------------------------------------------------------
    def snapshot_of(self, stage: Any) -> dict[str, Any]:
        snap = _optional(stage, "snapshot")
        if snap is None:
            return {}
        if not isinstance(snap, dict):
            raise self.fail("snapshot", f"snapshot() returned a {type(snap).__name__}, not a dict")
        return snap

    def check_snapshot(self, stage: Any, fresh: dict[str, Any]) -> dict[str, Any]:
        assert self.report is not None
        snap = self.snapshot_of(stage)
        try:
            crossed = wire.unpackb(wire.packb(snap))
        except (TypeError, ValueError) as exc:
            raise self.fail("snapshot", f"msgpack cannot carry the snapshot ({exc}): {_short(snap)}") from None
        if crossed != snap:
            raise self.fail("snapshot", f"the snapshot changes when it crosses msgpack: {_short(snap)} -> {_short(crossed)}")
        if snap and not callable(getattr(stage, "restore", None)):
            raise self.fail("snapshot", "snapshot() returns state but the stage has no restore()")
        again = self.restored(snap)
        if (round_trip := self.snapshot_of(again)) != snap:
            raise self.fail("snapshot", f"restore(snapshot()) on a fresh instance gives snapshot {_short(round_trip)}, "
                                        f"not {_short(snap)}")
        self.report.snapshot, self.report.stateful = snap, snap != fresh
        self.passed("snapshot")
        return snap

    def restored(self, snap: dict[str, Any]) -> Any:
        stage = self.make()
        if snap:
            stage.restore(wire.unpackb(wire.packb(snap)))
        return stage

    def check_teardown(self, stage: Any) -> None:
        _optional(stage, "teardown")
        try:
            _optional(stage, "teardown")
        except Exception as exc:
            raise self.fail("teardown", f"a second teardown() raised {type(exc).__name__}: {exc}") from None

    # -- sources ------------------------------------------------------------------------------
    def check_source(self, limit: int) -> None:
        assert self.report is not None
        stage = self.make()
        fresh_snapshot = self.snapshot_of(stage)
        _optional(stage, "setup")
        gen = stage.generate()
        first = self.take(stage, gen, limit)
        snap = self.check_snapshot(stage, fresh_snapshot)
        rest = self.take(stage, gen, limit)
        self.report.records = first + rest
        ids = [r["id"] for r in self.report.records if "id" in r]
        if len(ids) != len(set(ids)):
            raise self.fail("generate", f"the same id came twice: {sorted(i for i in set(ids) if ids.count(i) > 1)[:10]}")
        self.passed("generate")
        self.check_teardown(stage)
        again = self.restored(snap)
        _optional(again, "setup")
        resumed = self.take(again, again.generate(), len(rest)) if rest else []
        _optional(again, "teardown")
        if self.stable(resumed) != self.stable(rest):
            raise self.fail("restore", f"after restore(snapshot()) the source went on with {_ids(resumed)}, "
                                       f"not {_ids(rest)} (records skipped or repeated)")
        self.passed("restore")
        self.passed("teardown")

    def take(self, stage: Any, gen: Iterator[Any], limit: int) -> list[Record]:
        """Up to ``limit`` records, stopping at the end of the stream or when the source is idle."""
        taken: list[Record] = []
        for record in gen:
            if record is None:
                break
            self.check_records("generate", stage, [record])
            taken.append(record)
            if len(taken) >= limit:
                break
        return taken

    # -- comparing outputs ----------------------------------------------------------------------
    def stable(self, records: list[Record]) -> list[Record]:
        return [{k: v for k, v in r.items() if k not in self.volatile} for r in wire.unpackb(wire.packb(records))]

    def first_difference(self, a: list[Record], b: list[Record]) -> str:
        for x, y in zip(self.stable(a), self.stable(b)):
            if x != y:
                return f"{_short(x)} became {_short(y)}"
        return f"{len(a)} records became {len(b)}"


def _open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each is (a path, ``socket:[…]``, ``pipe:[…]``)."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass    # the listing's own descriptor, closed by now
    return fds


def _ids(records: list[Record]) -> str:
    ids = [r.get("id", "?") for r in records]
    return f"ids {ids[:5]}{'…' if len(ids) > 5 else ''} ({len(ids)} records)"


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
