"""A stage author's test kit: run a stage in-process, and check it against the stage contract.

- :func:`run_stage` drives a stage with lists of records: no sockets, no processes. Fast and
  exact, for unit tests and for trying a stage in a REPL. It calls the stage through the same
  ``Processor`` the runtime uses, so failures isolate and dead-letter the same way.
- :func:`check_stage` runs the contract suite that every built-in stage passes on a stage of
  yours (as river's ``check_estimator`` does for estimators): every check runs and reports, and
  :class:`StageContractError` names each one that failed.

Both accept any object with the stage methods (``process`` or ``generate``; ``setup``,
``teardown``, ``snapshot``, ``restore``, ``route`` are optional), a :class:`streampipe.Stage`
subclass or not, and a plain function called once per record.

>>> from streampipe.stages.builtins.normalizer import Normalizer
>>> run = run_stage(Normalizer(), [[{"id": 0, "x": [1.0], "y": 0}, {"id": 1, "x": "bad", "y": 0}]])
>>> len(run.records), [reason for _, reason in run.dead_letters]
(1, ["field 'x': expected vector, got str"])
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streampipe.stages import wire
from streampipe.stages.api import Batch, Record, StageContext, as_stage, is_source, kind_of
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
              context: dict[str, Any] | None = None, finish: bool = False) -> Run:
    """Run ``stage`` over ``batches`` (or, for a source, take up to ``limit`` records, stopping
    early at the end of its stream or the first time it is idle, i.e. yields ``None``). With
    ``finish``, the input ends after the batches, as a finite stream's does in a pipeline: the
    stage's ``finish()`` runs and its records are collected too (a window's last windows).

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
        if finish:
            outcome = processor.finish()
            if outcome.exceptions:
                raise outcome.exceptions[0]
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
#
# As river's ``yield_checks``: each check is a function of its own, named for what it checks; the
# checks a stage gets are yielded by :func:`_yield_checks`, and every one runs and reports. The
# checks judge what a :class:`_Trial` saw: one instance run over the sample (with a restart from
# its snapshot before the last batch), done once and shared, plus what a check runs itself.
class StageContractError(AssertionError):
    """A stage broke the stage contract: the message has one line per failed check, ``check``
    names the first that failed and ``problem`` says how; ``report`` holds every check's outcome."""

    def __init__(self, stage: str, check: str, problem: str, report: StageReport | None = None) -> None:
        failed = report.failed if report is not None else {check: problem}
        super().__init__("\n".join(f"check_stage({stage}): {name}: {why}" for name, why in failed.items()))
        self.stage, self.check, self.problem, self.report = stage, check, problem, report


@dataclass
class CheckOutcome:
    """One check of :func:`check_stage`: its name, whether the stage passed it, and why not."""

    check: str
    passed: bool
    reason: str = ""


@dataclass
class StageReport:
    """What :func:`check_stage` checked and saw: every check's outcome, and the sample run."""

    stage: str
    source: bool
    checks: list[str] = field(default_factory=list)        # every check that ran, in order
    outcomes: list[CheckOutcome] = field(default_factory=list)   # the same, each passed or failed with its reason
    records: list[Record] = field(default_factory=list)    # output of the sample run (a source: what it generated)
    dead_letters: list[tuple[Record, str]] = field(default_factory=list)   # the bad records, as dead-lettered
    snapshot: dict[str, Any] = field(default_factory=dict)                 # the snapshot that round-tripped
    stateful: bool = False                                 # the snapshot changed with the work done

    @property
    def failed(self) -> dict[str, str]:
        """The failed checks, in order, each with its reason."""
        return {o.check: o.reason for o in self.outcomes if not o.passed}

    def outcome(self, check: str) -> CheckOutcome:
        """The outcome of the check named ``check`` (KeyError if it did not run)."""
        for o in self.outcomes:
            if o.check == check:
                return o
        raise KeyError(check)


def check_stage(stage: Callable[..., Any], sample_batches: Sequence[Batch] = (), *,
                bad_records: Sequence[Record] = (), run_dir: Path | None = None,
                context: dict[str, Any] | None = None, volatile: Collection[str] = VOLATILE,
                limit: int = SOURCE_LIMIT) -> StageReport:
    """Check a stage class (or a factory of fresh instances, or a per-record function) against
    the stage contract.

    ``stage`` is called with no argument for each instance the checks need, so pass the class,
    or ``lambda: MyStage(option=1)``; a function that takes one record is a function stage, as
    in ``services.yaml``. A transform or sink is fed ``sample_batches`` (good records, two
    batches or more); a source is asked for up to ``limit`` records, then ``limit`` more. The
    checks, in order:

    - ``init``: building an instance leaves no file or socket open (``__init__`` must be cheap;
      resources belong in ``setup``);
    - ``empty batch`` (transforms): ``process([])`` neither fails nor dead-letters;
    - ``outputs`` / ``generate``: every record is a map msgpack can carry, routed to a declared
      output, and no sample record is dead-lettered (a source: no id comes twice);
    - ``snapshot``: ``snapshot()`` crosses msgpack unchanged, and a fresh instance given
      ``restore(snapshot())`` has an equal snapshot;
    - ``restore``: that fresh instance then produces the same output on the same next batch
      (a source: resumes with the same records, none skipped or repeated);
    - ``teardown``: ``teardown()`` may run twice;
    - ``bad records`` (transforms, if given): a batch of ``bad_records`` followed by the first
      sample batch: each bad record is dead-lettered with a reason or passed on, never fatal,
      and no good record beside them is dead-lettered.

    Fields in ``volatile`` (the event time ``t``) are left out when outputs are compared. Every
    check runs, whatever the others found. When one or more fail, raises
    :class:`StageContractError` (an ``AssertionError``) with one line per failed check and the
    report as ``.report``; returns the :class:`StageReport` when all pass.

    >>> from streampipe import Stage
    >>> class Upper(Stage):
    ...     def process(self, batch):
    ...         return [{**r, "name": r["name"].upper()} for r in batch]
    >>> check_stage(Upper, [[{"id": 0, "name": "ada"}], [{"id": 1, "name": "bob"}]]).checks
    ['init', 'empty batch', 'outputs', 'snapshot', 'restore', 'teardown']
    >>> def shout(record):
    ...     return {**record, "name": record["name"].upper()}
    >>> check_stage(shout, [[{"id": 0, "name": "ada"}], [{"id": 1, "name": "bob"}]]).checks
    ['init', 'empty batch', 'outputs', 'snapshot', 'restore', 'teardown']
    """
    made = run_dir is None
    root = run_dir or Path(tempfile.mkdtemp(prefix="streampipe-check-"))
    try:
        trial = _Trial(stage, root, context or {}, volatile, list(sample_batches), list(bad_records), limit)
        report = trial.report
        for name, check in _yield_checks(trial):
            try:
                check(trial)
                report.outcomes.append(CheckOutcome(name, True))
            except _Broken as broken:
                report.outcomes.append(CheckOutcome(name, False, broken.problem))
            except Exception as exc:   # a check that cannot finish is a failed check, and the others still run
                report.outcomes.append(CheckOutcome(name, False, f"{type(exc).__name__}: {exc}"))
            report.checks.append(name)
        if report.failed:
            first, why = next(iter(report.failed.items()))
            raise StageContractError(report.stage, first, why, report)
        return report
    finally:
        if made:
            shutil.rmtree(root, ignore_errors=True)


class _Broken(Exception):
    """Raised by a check: the stage breaks the contract, as ``problem`` says."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


Check = Callable[["_Trial"], None]


def _yield_checks(trial: _Trial) -> Iterator[tuple[str, Check]]:
    """The checks for this stage, in the order they run: a source's, or a transform's."""
    yield "init", check_init
    if trial.report.source:
        yield "snapshot", check_snapshot
        yield "generate", check_generate
        yield "restore", check_restore
        yield "teardown", check_teardown
        return
    yield "empty batch", check_empty_batch
    yield "outputs", check_outputs
    yield "snapshot", check_snapshot
    yield "restore", check_restore
    yield "teardown", check_teardown
    if trial.bad:
        yield "bad records", check_bad_records


# -- the checks ----------------------------------------------------------------------------------
def check_init(trial: _Trial) -> None:
    """Build one more instance (the first one paid for the imports) and compare open fds."""
    before = _open_fds()
    stage = trial.factory()
    opened = sorted(set(_open_fds().items()) - set(before.items()))
    if opened:
        what = ", ".join(target for _, target in opened)
        raise _Broken(f"__init__ left {len(opened)} file(s) or socket(s) open ({what}); "
                      "open them in setup() and close them in teardown()")
    del stage


def check_empty_batch(trial: _Trial) -> None:
    """``process([])`` on an instance of its own neither fails nor dead-letters anything."""
    stage = trial.make()
    _optional(stage, "setup")
    processor = Processor(stage)
    try:
        empty = processor.run([])
    finally:
        processor.close()
        _optional(stage, "teardown")
    if empty.exceptions or empty.rejected:
        why = repr(empty.exceptions[0]) if empty.exceptions else empty.rejected[0][1]
        raise _Broken(f"process([]) failed: {why}")
    trial.judge_records(stage, empty.records)


def check_outputs(trial: _Trial) -> None:
    """Every output of the sample run is a record the wire carries; no sample record is dead-lettered."""
    sample = trial.sample()
    for index, (records, rejected) in enumerate([*sample.before, sample.last]):
        if rejected:
            record, reason = rejected[0]
            raise _Broken(f"batch {index}: a sample record was dead-lettered ({reason}): {_short(record)}")
        trial.judge_records(sample.stage, records)


def check_generate(trial: _Trial) -> None:
    """Every record a source generated is one the wire carries, and no id comes twice."""
    sample = trial.sample()
    records = trial.report.records
    trial.judge_records(sample.stage, records)
    ids = [r["id"] for r in records if "id" in r]
    if len(ids) != len(set(ids)):
        raise _Broken(f"the same id came twice: {sorted(i for i in set(ids) if ids.count(i) > 1)[:10]}")


def check_snapshot(trial: _Trial) -> None:
    """The sample run's snapshot crosses msgpack unchanged and a fresh instance restores it equal."""
    sample = trial.sample()
    snap = trial.snapshot_of(sample.snapshot)
    try:
        crossed = wire.unpackb(wire.packb(snap))
    except (TypeError, ValueError) as exc:
        raise _Broken(f"msgpack cannot carry the snapshot ({exc}): {_short(snap)}") from None
    if crossed != snap:
        raise _Broken(f"the snapshot changes when it crosses msgpack: {_short(snap)} -> {_short(crossed)}")
    if snap and not callable(getattr(sample.stage, "restore", None)):
        raise _Broken("snapshot() returns state but the stage has no restore()")
    again = trial.restored(snap)
    if (round_trip := trial.snapshot_of(_optional(again, "snapshot"))) != snap:
        raise _Broken(f"restore(snapshot()) on a fresh instance gives snapshot {_short(round_trip)}, not {_short(snap)}")
    trial.report.snapshot, trial.report.stateful = snap, snap != trial.snapshot_of(sample.fresh)


def check_restore(trial: _Trial) -> None:
    """An instance restarted from the snapshot does what the one that was not restarted does."""
    sample = trial.sample()
    if isinstance(sample.restarted, BaseException):
        raise _Broken(f"no restart from the snapshot: {type(sample.restarted).__name__}: {sample.restarted}")
    restarted, unrestarted = sample.restarted, sample.last[0]
    if trial.stable(restarted) == trial.stable(unrestarted):
        return
    if trial.report.source:
        raise _Broken(f"after restore(snapshot()) the source went on with {_ids(restarted)}, "
                      f"not {_ids(unrestarted)} (records skipped or repeated)")
    raise _Broken(f"the next batch gave {len(restarted)} different record(s) after restore(snapshot()) "
                  f"than without a restart ({len(unrestarted)}); first: {trial.first_difference(unrestarted, restarted)}")


def check_teardown(trial: _Trial) -> None:
    """The sample run's instance took a second ``teardown()`` without raising."""
    sample = trial.sample()
    if sample.second_teardown is not None:
        exc = sample.second_teardown
        raise _Broken(f"a second teardown() raised {type(exc).__name__}: {exc}")


def check_bad_records(trial: _Trial) -> None:
    """On an instance of its own: the bad records first in a batch, then the first sample batch."""
    good = trial.batches[0] if trial.batches else []
    run = run_stage(trial.make(), [[*trial.bad, *good]], run_dir=trial.run_dir, context=trial.context)
    if any(not reason for _, reason in run.dead_letters):
        raise _Broken("a record was dead-lettered without a reason")
    good_rejected = [r for r, _ in run.dead_letters if r in good and r not in trial.bad]
    if good_rejected:
        raise _Broken(f"a good record beside the bad ones was dead-lettered too: {_short(good_rejected[0])}")
    trial.report.dead_letters = run.dead_letters


# -- the trial: the stage, and the sample run the checks judge ----------------------------------
Processed = tuple[list[Record], list[tuple[Record, str]]]   # one batch: the records out, the records dead-lettered


@dataclass
class _Sample:
    """One instance over the sample: the batches before the last (a source: ``limit`` records), its
    snapshot, then the last batch (``limit`` more) by an instance restored from that snapshot and
    by the instance itself, then two teardowns."""

    stage: Any
    fresh: Any                          # snapshot() before any work
    before: list[Processed]             # transforms: the batches before the last
    snapshot: Any                       # snapshot() after them (a source: after the first ``limit`` records)
    last: Processed                     # the last batch (a source: the next records), by this instance
    restarted: list[Record] | BaseException    # the same by an instance restored from ``snapshot``, or why not
    second_teardown: BaseException | None


def _is_function_stage(target: Callable[..., Any]) -> bool:
    """A function called with one record (as ``type: module:function``), not a factory called with none."""
    if isinstance(target, type):
        return False
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind()
        return False
    except TypeError:
        pass
    try:
        return kind_of(target) == "function"
    except TypeError:
        return False


class _Trial:
    def __init__(self, factory: Callable[..., Any], run_dir: Path, context: dict[str, Any], volatile: Collection[str],
                 batches: list[Batch], bad: list[Record], limit: int) -> None:
        if not callable(factory):
            raise TypeError("check_stage needs the stage class or a factory of fresh instances, "
                            f"not an instance of {type(factory).__name__}")
        function = _is_function_stage(factory)
        named = isinstance(factory, type) or function
        self.name = getattr(factory, "__qualname__", repr(factory)) if named else repr(factory)
        if function:
            target = factory
            factory = lambda: as_stage(target)   # noqa: E731 - a fresh FunctionStage per instance, as in a pipeline
        self.factory, self.run_dir, self.context, self.volatile = factory, run_dir, context, volatile
        self.batches, self.bad, self.limit = batches, bad, limit
        self.made_function: str | None = None
        first = self.make(first=True)
        if not named:
            self.name = self.made_function or type(first).__qualname__    # a factory: name the stage it makes
        self.report = StageReport(stage=self.name, source=is_source(first))
        self._sample: _Sample | BaseException | None = None

    def make(self, first: bool = False) -> Any:
        stage = self.factory()
        if _is_function_stage(stage):   # a factory of a function stage: run as in a pipeline (and as run_stage does)
            self.made_function = getattr(stage, "__qualname__", repr(stage))
            stage = as_stage(stage)
        if not callable(getattr(stage, "process", None)) and not callable(getattr(stage, "generate", None)):
            problem = f"{type(stage).__name__} has neither process() nor generate()"
            if first:   # nothing else can be checked
                raise StageContractError(self.name, "init", problem)
            raise _Broken(problem)
        _set_context(stage, self.run_dir, self.context)
        return stage

    def snapshot_of(self, snap: Any) -> dict[str, Any]:
        """A stage's ``snapshot()`` result as the runtime keeps it (``None``: no state)."""
        if snap is None:
            return {}
        if not isinstance(snap, dict):
            raise _Broken(f"snapshot() returned a {type(snap).__name__}, not a dict")
        return snap

    def restored(self, snap: dict[str, Any]) -> Any:
        stage = self.make()
        if snap:
            stage.restore(wire.unpackb(wire.packb(snap)))
        return stage

    def judge_records(self, stage: Any, records: list[Any] | Columns) -> None:
        outputs = {"default", *getattr(stage, "outputs", ())}
        if isinstance(records, Columns):
            records = records.to_records()
        for record in records:
            if type(record) is not dict:
                raise _Broken(f"produced a {type(record).__name__}, not a record (a map): {_short(record)}")
            try:
                wire.unpackb(wire.packb(record))
            except (TypeError, ValueError) as exc:
                raise _Broken(f"a record msgpack cannot carry ({exc}): {_short(record)}") from None
            if (out := _route(stage, record)) not in outputs:
                raise _Broken(f"route() sent a record to {out!r}, not one of the declared outputs {sorted(outputs)}")

    # -- the sample run, once for every check -----------------------------------------------------
    def sample(self) -> _Sample:
        if self._sample is None:
            try:
                self._sample = self._sample_source() if self.report.source else self._sample_transform()
            except Exception as exc:
                self._sample = exc
        if isinstance(self._sample, BaseException):
            raise _Broken(f"the sample run failed: {type(self._sample).__name__}: {self._sample}")
        return self._sample

    def _restart(self, snap: Any, work: Callable[[Any], list[Record]]) -> list[Record] | BaseException:
        """``work`` done by a fresh instance restored from ``snap`` (set up and torn down around it)."""
        try:
            again = self.restored(self.snapshot_of(snap))
            _optional(again, "setup")
            try:
                return work(again)
            finally:
                _optional(again, "teardown")
        except Exception as exc:
            return exc

    def _sample_transform(self) -> _Sample:
        stage = self.make()
        fresh = _optional(stage, "snapshot")
        _optional(stage, "setup")
        processor = Processor(stage)
        last_batch = self.batches[-1] if self.batches else []
        try:
            before = [self._process(processor, batch) for batch in self.batches[:-1]]
            snap = _optional(stage, "snapshot")

            def next_batch(again: Any) -> list[Record]:
                restarted = Processor(again)
                try:
                    return self._process(restarted, last_batch)[0]
                finally:
                    restarted.close()

            # a restart from the snapshot (and the run directory as it is at that point) ...
            restarted = self._restart(snap, next_batch)
            # ... must do what the stage does without one
            last = self._process(processor, last_batch)
        finally:
            processor.close()
        self.report.records = [r for records, _ in [*before, last] for r in records]
        return _Sample(stage, fresh, before, snap, last, restarted, self._teardown_twice(stage))

    def _sample_source(self) -> _Sample:
        stage = self.make()
        fresh = _optional(stage, "snapshot")
        _optional(stage, "setup")
        gen = stage.generate()
        first = self._take(gen, self.limit)
        snap = _optional(stage, "snapshot")
        rest = self._take(gen, self.limit)
        self.report.records = first + rest
        second = self._teardown_twice(stage)
        restarted = self._restart(snap, lambda again: self._take(again.generate(), len(rest)) if rest else [])
        return _Sample(stage, fresh, [], snap, (rest, []), restarted, second)

    @staticmethod
    def _process(processor: Processor, batch: Batch) -> Processed:
        outcome = processor.run(wire.unpackb(wire.packb(batch)))
        records = outcome.records.to_records() if isinstance(outcome.records, Columns) else outcome.records
        return records, [(r, reason) for r, reason, _ in outcome.rejected]

    @staticmethod
    def _take(gen: Iterator[Any], limit: int) -> list[Record]:
        """Up to ``limit`` records, stopping at the end of the stream or when the source is idle."""
        taken: list[Record] = []
        for record in gen:
            if record is None:
                break
            taken.append(record)
            if len(taken) >= limit:
                break
        return taken

    @staticmethod
    def _teardown_twice(stage: Any) -> BaseException | None:
        _optional(stage, "teardown")
        try:
            _optional(stage, "teardown")
        except Exception as exc:
            return exc
        return None

    # -- comparing outputs ----------------------------------------------------------------------
    def stable(self, records: list[Any]) -> list[Any]:
        try:
            crossed = wire.unpackb(wire.packb(records))
        except (TypeError, ValueError) as exc:
            raise _Broken(f"outputs msgpack cannot carry cannot be compared ({exc})") from None
        return [{k: v for k, v in r.items() if k not in self.volatile} if isinstance(r, dict) else r for r in crossed]

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
