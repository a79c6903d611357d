"""The stage API: what a user implements to put code into a streampipe pipeline.

A stage is a plain class. The runtime (:mod:`streampipe.stages.runtime`) owns sockets, batching,
heartbeats, signals, acknowledgements and error handling; a stage never touches them.

    Stage                     a transform or a sink: ``process(batch) -> iterable of records``
    ├── Source                produces records: ``generate() -> iterator of records``
    ├── Sink                  a sink to a store of its own: ``write(batch, marks)``, exactly once
    ├── Plain                 a user's class that subclasses neither: what it lacks is Stage's
    └── FunctionStage         a user's function ``f(record) -> record | list | None``, per record
        └── AsyncFunctionStage    the same for an ``async def`` function

:func:`load_stage` (the one way the runtime, the fork server and :func:`streampipe.testing.run_stage`
get a stage) puts whatever a ``type:`` names behind this interface with :func:`as_stage`.

Lifecycle, in one stage process::

    stage = Cls(**options)    # cheap; options come from services.yaml ``options:``
    stage.context = ...       # set by the runtime before setup (name, replica, run dir, ...)
    stage.restore(state)      # only if a snapshot was saved by an earlier incarnation
    stage.setup()             # open files, load models; READY is reported after it returns
    stage.process(batch) ...  # once per input batch, in the order received
    stage.finish()            # once, if the input ends (every sender's end of stream is in)
    stage.teardown()          # on stop, after the last batch; flush and close here

A record is a ``dict`` of strings, numbers, booleans, ``None``, lists and dicts (whatever
msgpack carries). A record that a stage cannot handle should raise :class:`BadRecord` (or any
exception) from ``process``: the runtime then retries the batch one record at a time, sends
each failing record to ``<run dir>/deadletter/<stage>.jsonl`` with the error, and goes on.

Example, a complete transform stage:

>>> class Doubler(Stage):
...     def __init__(self, field: str = "x"):
...         super().__init__()
...         self.field = field
...     def process(self, batch):
...         for record in batch:
...             yield {**record, self.field: record[self.field] * 2}
>>> list(Doubler(field="v").process([{"id": 0, "v": 21}]))
[{'id': 0, 'v': 42}]
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Record = dict[str, Any]
Batch = list[Record]


class BadRecord(ValueError):
    """Raised by a stage for one record it cannot process; the record goes to the dead-letter file."""


@dataclass
class StageContext:
    """Where a stage runs. Set on ``stage.context`` by the runtime before ``setup``."""

    name: str = "stage"
    replica: int = 0
    replicas: int = 1
    run_dir: Path = field(default_factory=lambda: Path(".streampipe"))
    config_dir: Path = field(default_factory=Path.cwd)
    outputs: tuple[str, ...] = ("default",)
    max_batch: int = 1000     # records per batch the runtime cuts: a columnar source yields batches of this size
    #: the stage's ``inputs:`` as services.yaml names them (``normalizer.holdout`` for a named output)
    inputs: tuple[str, ...] = ()
    #: the input the batch ``process`` is given came by, one of ``inputs`` (the sending stage, with
    #: ``.<output>`` for a named one): set by the runtime before each ``process`` call, so a stage of
    #: two inputs (a join) tells them apart; a replayed dead letter names the stage that had sent it
    input: str | None = None
    beat: Callable[[str], None] | None = field(default=None, repr=False)   # set by the runtime (keepalive)
    #: per-key state of a stage with ``keyed_state = True``: key -> a msgpack-able value. The
    #: runtime saves it with the stage's snapshot (exactly once through SIGKILLs, as ``snapshot()``)
    #: and, when the stage is ``partition: key`` and its replica count changes, deals each key's
    #: entry to the replica that owns the key now. A list key comes back from a restore as a tuple.
    state: dict[Any, Any] = field(default_factory=dict, repr=False)

    def keepalive(self, waiting_for: str) -> None:
        """Say, from inside a long call, that the stage waits on purpose and is not hung: a sink
        whose database went away calls it in its reconnect loop. The runtime sends a heartbeat (at
        most 4 a second) naming ``waiting_for``, which ``status`` shows, so the supervisor (or
        run-stage's ``/healthz``) does not take it for hung after ``heartbeat_timeout``. Cheap:
        call it on every turn of the wait. Outside a runtime (a test) it does nothing."""
        if self.beat is not None:
            self.beat(waiting_for)

    def resolve_output(self, path: str | os.PathLike[str]) -> Path:
        """A path the stage writes: relative paths resolve against the run directory."""
        p = Path(path)
        return p if p.is_absolute() else self.run_dir / p

    def replica_output(self, path: str | os.PathLike[str]) -> Path:
        """A file each replica writes its own copy of: :meth:`resolve_output`, and with
        ``replicas`` > 1 replica N > 0 gets ``<stem>.N<suffix>`` (replica 0 keeps the name).

        >>> StageContext(replica=2, replicas=3, run_dir=Path("/r")).replica_output("out/rows.jsonl").as_posix()
        '/r/out/rows.2.jsonl'
        """
        p = self.resolve_output(path)
        return p.with_name(f"{p.stem}.{self.replica}{p.suffix}") if self.replicas > 1 and self.replica > 0 else p

    def resolve_input(self, path: str | os.PathLike[str]) -> Path:
        """A path the stage reads: relative paths resolve against the config's folder."""
        p = Path(path)
        return p if p.is_absolute() else self.config_dir / p


class Stage:
    """Base class of a transform or sink stage.

    Subclasses override :meth:`process`; every other method is optional.

    - ``__init__`` receives the stage's ``options`` from ``services.yaml`` as keyword arguments.
      ``streampipe validate`` checks them against its signature (names, and types where
      annotated); ``**options`` accepts any other key (this base keeps them in ``self.options``).
      It must be cheap and must not open sockets or files.
    - :meth:`setup` runs once in the stage process before the first batch. Heavy work (loading a
      model, opening an output file) goes here. READY is reported when it returns.
    - :meth:`process` is called with each input batch (a list of records, possibly empty) and
      returns or yields the output records. It may be ``async def``: the runtime then awaits it
      on an event loop. It must not block forever: the supervisor treats a stage whose loop makes
      no progress for ``heartbeat_timeout`` as hung and replaces it.
    - :meth:`route` names the output a record goes to (default output ``"default"``); a stage
      with named outputs lists them in ``outputs``.
    - :meth:`snapshot` / :meth:`restore` save and load the stage's state as a msgpack-able dict;
      ``restore(snapshot())`` on a fresh instance must give an equivalent stage.
    - :meth:`stats` returns a small dict of figures that ``streampipe status`` shows.
    - :meth:`finish` is called once when the input has ended (a finite stream: every replica of
      every input stage has sent its end of stream, and every batch before it is processed); what
      it returns goes downstream as any output does, before this stage passes the end on.
    - :meth:`teardown` runs once after the last batch, on a clean stop.

    Columns: a stage that sets ``columnar = True`` receives each batch as a
    :class:`~streampipe.stages.columns.Columns` (numpy arrays by field) instead of a list of
    records, and returns a ``Columns`` (or a list of records). The runtime converts only where
    two neighbouring stages want different forms, so a per-record stage between two columnar
    ones costs only its own conversions. A columnar source yields ``Columns`` batches from
    ``generate_columns()``. A columnar stage that raises is retried one row at a time, as a
    per-record stage is, and each failing row is dead-lettered as a record.
    """

    #: Named outputs besides ``"default"``, e.g. ``("holdout",)``.
    outputs: tuple[str, ...] = ()

    #: True: ``process`` receives :class:`~streampipe.stages.columns.Columns`, not a list of records.
    columnar: bool = False

    #: With ``columnar``: ``process`` also takes a list of records, and is given one as it came
    #: (from a per-record stage upstream) rather than the records converted to columns.
    accepts_records: bool = False

    #: True: every record the stage emits carries an ``id`` of the stage's own making, unique, and
    #: the same whenever the same output is made again (a window's result: from its key and start).
    #: The runtime then sends its outputs under an origin of the stage's own with no watermark, so
    #: a deduplicating sink holds each once, whichever input batch made it after a crash.
    own_ids: bool = False

    #: True: the stage keeps per-key state in ``self.context.state`` (see :class:`StageContext`);
    #: the runtime snapshots it and re-deals it by key on a rescale, so the stage needs neither
    #: ``snapshot()`` nor ``rescale()`` for it.
    keyed_state: bool = False

    context: StageContext

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.context = StageContext()
        self._rejected: list[tuple[Record, str, str]] = []

    def reject(self, record: Record, reason: str) -> None:
        """Send ``record`` to the dead-letter file with ``reason`` instead of passing it on."""
        if not hasattr(self, "_rejected"):
            self._rejected = []
        self._rejected.append((record, reason, ""))

    def take_rejected(self) -> list[tuple[Record, str, str]]:
        """The records rejected since the last call (used by the runtime)."""
        taken, self._rejected = getattr(self, "_rejected", []), []
        return taken

    def setup(self) -> None:
        """Acquire resources. Called once, in the stage process, before the first batch."""

    def process(self, batch: Batch) -> Iterable[Record]:
        """Transform one batch. The default passes records through unchanged."""
        return batch

    def route(self, record: Record) -> str:
        """The output a record goes to: ``"default"`` unless a stage overrides it."""
        return "default"

    def snapshot(self) -> dict[str, Any]:
        """The stage's state, msgpack-serialisable. Empty for a stateless stage."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Load a state produced by :meth:`snapshot` (called before :meth:`setup`)."""

    def stats(self) -> dict[str, Any]:
        """Figures for ``streampipe status`` (numbers and short strings)."""
        return {}

    def finish(self) -> Iterable[Record]:
        """The input has ended: return (or yield) the last records, e.g. every window still open.

        Called once, after every sender's end of stream is in and every batch before it has been
        processed and acknowledged; its records go downstream as ``process``'s do, and the stage
        passes the end of stream on only once they are acknowledged. A replica that crashes before
        that restarts from its snapshot (taken before ``finish``) and is called again, so the same
        records must come out again (with the same ids, for a deduplicating sink). The default
        returns nothing. Not called on a stop: an unbounded stream never ends.

        >>> class Total(Stage):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.n = 0
        ...     def process(self, batch):
        ...         self.n += len(batch)
        ...         return []
        ...     def finish(self):
        ...         return [{"id": 0, "total": self.n}]
        >>> t = Total(); t.process([{"id": 1}, {"id": 2}]); list(t.finish())
        []
        [{'id': 0, 'total': 2}]
        """
        return []

    def teardown(self) -> None:
        """Release resources. Called once after the last batch on a clean stop."""


class Source(Stage):
    """Base class of a stage that produces records instead of receiving them.

    Override :meth:`generate`: a generator that yields records. Yield ``None`` when nothing is
    ready yet (a rate limit, a file that has not grown): the runtime then serves its sockets for
    a moment and asks again, so the stage keeps heartbeating. Return to end the stream: the
    runtime flushes, waits until downstream has everything, marks the stage ``completed`` and
    exits 0; a completed stage is never restarted.

    A replayable source also implements :meth:`snapshot` and :meth:`restore` (its position, e.g.
    the next record id or a file offset). The runtime saves the snapshot taken when a batch was
    cut once every batch up to it is acknowledged downstream, and restores it on restart, so a
    restarted source resumes without skipping a record.

    A source whose replicas split one stream (by ``context.replica`` of ``context.replicas``)
    may also implement a classmethod ``repartition(states, replicas) -> list[dict]``: every old
    replica's saved state in, one state per new replica out, together owning exactly what the
    old ones had left (see :meth:`stages.builtins.generator.Generator.repartition`). The supervisor calls
    it when ``replicas`` changed between runs; without it such a change is refused.

    >>> class Count(Source):
    ...     def __init__(self, n: int = 3):
    ...         super().__init__()
    ...         self.n, self.next_id = n, 0
    ...     def generate(self):
    ...         while self.next_id < self.n:
    ...             self.next_id += 1              # advance first: snapshot() after a yield
    ...             yield {"id": self.next_id - 1}  # never repeats the record just emitted
    ...     def snapshot(self):
    ...         return {"next_id": self.next_id}
    ...     def restore(self, state):
    ...         self.next_id = state["next_id"]
    >>> [r["id"] for r in Count(n=3).generate()]
    [0, 1, 2]
    """

    def generate(self) -> Iterator[Record | None]:
        """Yield records, ``None`` when idle; return at the end of a finite stream."""
        raise NotImplementedError

    def committed(self, state: dict[str, Any]) -> None:
        """``state`` (a :meth:`snapshot` taken when a batch was cut) is acknowledged end to end:
        every record generated before it is done downstream (written, filtered or dead-lettered).
        A source reading a broker acknowledges its messages up to there to the broker here, and
        so the broker redelivers only what the pipeline has not finished. Called in the stage's
        loop, in order; a crash before it means those messages come again (and are dropped by
        the sinks' dedup when the records keep their ids)."""

    def saved(self, state: dict[str, Any]) -> None:
        """``state`` (a position :meth:`committed` was given) is now in the replica's state file:
        a restart resumes from it or later. A source that defines this hook has its position
        saved as soon as it commits (every ``PROMPT_SAVE_S``, not every ``STATE_SAVE_S``), so it
        can tell its client "durable" without waiting a second: the HTTP source answers 200 here.
        Called in the stage's loop, in order."""

    def process(self, batch: Batch) -> Iterable[Record]:  # pragma: no cover - sources have no input
        raise TypeError(f"{type(self).__name__} is a source: it has no input to process")


Kind = Literal["source", "transform", "function"]

HOOKS = ("process", "generate", "setup", "teardown", "route", "snapshot", "restore", "stats", "committed", "saved",
         "finish")


class Sink(Stage):
    """A sink that writes to a store of its own and holds each record there exactly once.

    Implement ``write(batch, marks)``: put the records of ``batch`` *and* ``marks`` (bytes) into
    the store in one transaction of its own; and ``load_marks()``: return the ``marks`` of the
    last transaction that committed (``None`` for an empty store). The runtime gives ``write``
    only records the store does not hold yet (by origin and ``id``, as the built-in consumer
    deduplicates), and ``marks`` describe the store once this batch is in it; so a record sent
    again after any crash is dropped before ``write`` sees it. A ``write`` that raises commits
    nothing (roll back): the batch is retried record by record and a record failing alone is
    dead-lettered. See :mod:`streampipe.stages.delivery`, and the built-in ``sqlite`` sink.

    >>> import sqlite3
    >>> class Rows(Sink):
    ...     def setup(self):
    ...         self.db = sqlite3.connect(":memory:")
    ...         self.db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER, y INTEGER)")
    ...         self.db.execute("CREATE TABLE IF NOT EXISTS marks (sink TEXT PRIMARY KEY, marks BLOB)")
    ...     def load_marks(self):
    ...         row = self.db.execute("SELECT marks FROM marks WHERE sink = 'rows'").fetchone()
    ...         return row[0] if row else None
    ...     def write(self, batch, marks):
    ...         with self.db:     # one transaction: the records and the marks, or neither
    ...             self.db.executemany("INSERT INTO rows VALUES (?, ?)", [(r["id"], r["y"]) for r in batch])
    ...             self.db.execute("INSERT OR REPLACE INTO marks VALUES ('rows', ?)", (marks,))
    """

    def load_marks(self) -> bytes | None:
        """The marks the last committed :meth:`write` was given (None: the store is empty)."""
        return None

    def write(self, batch: Batch, marks: bytes) -> None:
        """Commit ``batch`` and ``marks`` to the store in one transaction."""
        raise NotImplementedError(f"{type(self).__name__} is a Sink: it must implement write(batch, marks)")


def is_exact_sink(stage: object) -> bool:
    """True when a stage (class or instance) is on the sink API: ``write(batch, marks)`` and ``load_marks()``."""
    return callable(getattr(stage, "write", None)) and callable(getattr(stage, "load_marks", None))


def is_source(stage: object) -> bool:
    """True when a stage (class or instance) produces records rather than receiving them."""
    generate = getattr(stage, "generate", None)
    return callable(generate) and getattr(generate, "__func__", generate) is not Source.generate


def columnar_transform(stage: object) -> bool:
    """True when a transform's ``process`` is given columns: it is ``columnar`` and ``process`` was not
    overridden below the class that declares ``columnar`` (a subclass of the built-in normalizer
    whose own ``process`` expects records keeps getting records)."""
    return bool(getattr(stage, "columnar", False)) and _not_overridden_below(stage, "columnar", "process")


def columnar_source(stage: object) -> bool:
    """True when a source's batches come from ``generate_columns()``: it is ``columnar`` and no
    subclass overrode ``generate()`` below the class that defines ``generate_columns()`` (a
    subclass of the built-in generator that wraps ``generate()`` keeps getting records)."""
    return (bool(getattr(stage, "columnar", False)) and callable(getattr(stage, "generate_columns", None))
            and _not_overridden_below(stage, "generate_columns", "generate"))


def _not_overridden_below(stage: object, declared: str, method: str) -> bool:
    """True unless a class below the one that defines ``declared`` overrides ``method``."""
    mro = type(stage).__mro__
    overrides = next((k for k in mro if method in vars(k)), None)
    declares = next((k for k in mro if declared in vars(k)), None)
    return overrides is None or declares is None or issubclass(declares, overrides)


def kind_of(target: object) -> Kind:
    """What a ``type:`` names: a source or transform class, or a per-record function.

    Raises :class:`TypeError` saying why anything else cannot be a stage: a class with neither
    ``process`` nor ``generate``, a function that cannot be called with one record, or an object
    that is neither class nor function.
    """
    if isinstance(target, type):
        if is_source(target):
            return "source"
        if issubclass(target, Source):
            raise TypeError(f"class {target.__name__} is a Source but defines no generate()")
        if issubclass(target, Stage) or callable(getattr(target, "process", None)) or is_exact_sink(target):
            return "transform"
        raise TypeError(f"class {target.__name__} has neither process(batch), generate() nor "
                        "write(batch, marks) with load_marks(): it cannot be a stage")
    if callable(target):
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):   # a builtin without a signature: trust it
            return "function"
        try:
            signature.bind(None)
        except TypeError:
            name = getattr(target, "__name__", repr(target))
            raise TypeError(f"a function stage is called with one record, but {name}{signature} "
                            "does not take exactly one positional argument") from None
        return "function"
    raise TypeError(f"{type(target).__name__} {target!r:.40} is neither a class nor a function")


def as_stage(obj: object) -> Stage:
    """``obj`` behind the :class:`Stage` interface: a Stage as it is, a function (called per
    record) through :class:`FunctionStage`, any other object with ``process`` or ``generate``
    through :class:`Plain`. Raises :class:`TypeError` for anything else."""
    if isinstance(obj, Stage):
        return obj
    if isinstance(obj, type):
        raise TypeError(f"{obj.__name__} is a class: pass an instance")
    if callable(getattr(obj, "process", None)) or callable(getattr(obj, "generate", None)) or is_exact_sink(obj):
        return Plain(obj)
    if kind_of(obj) == "function":
        return AsyncFunctionStage(obj) if inspect.iscoroutinefunction(obj) else FunctionStage(obj)  # type: ignore[arg-type]
    raise TypeError(f"{obj!r} is not a stage")  # pragma: no cover - kind_of raised already


class Plain(Stage):
    """A user's object whose class subclasses neither :class:`Stage` nor :class:`Source`.

    Each of ``process``, ``generate``, ``setup``, ``teardown``, ``route``, ``snapshot``,
    ``restore``, ``stats`` and ``finish`` that the object defines is called; the others are Stage's
    defaults, and ``outputs``, ``columnar``, ``accepts_records``, ``own_ids`` and ``keyed_state`` are
    the object's if it has them. The object gets ``.context``
    too, so its methods read ``self.context`` as a Stage's do.

    >>> class Upper:
    ...     def process(self, batch):
    ...         return [{**r, "name": r["name"].upper()} for r in batch]
    >>> stage = as_stage(Upper())
    >>> list(stage.process([{"name": "ada"}])), stage.route({}), stage.snapshot()
    ([{'name': 'ADA'}], 'default', {})
    >>> class Windows:                  # makes its own result ids, as the built-in window does
    ...     own_ids = True
    ...     def process(self, batch):
    ...         return batch
    >>> as_stage(Windows()).own_ids, stage.own_ids
    (True, False)
    """

    def __init__(self, user: object) -> None:
        self.user = user
        super().__init__()
        for name in HOOKS:
            method = getattr(user, name, None)
            if callable(method):
                setattr(self, name, method)
        self.outputs = tuple(getattr(user, "outputs", ()) or ())
        self.columnar = bool(getattr(user, "columnar", False))
        self.accepts_records = bool(getattr(user, "accepts_records", False))
        self.own_ids = bool(getattr(user, "own_ids", False))    # its outputs under its own origin, as a Stage's
        self.keyed_state = bool(getattr(user, "keyed_state", False))
        if callable(getattr(user, "generate_columns", None)):
            self.generate_columns = user.generate_columns  # type: ignore[attr-defined]

    @property
    def context(self) -> StageContext:
        return self._context

    @context.setter
    def context(self, value: StageContext) -> None:
        self._context = value
        self.user.context = value  # type: ignore[attr-defined]


class FunctionStage(Stage):
    """A function as a transform, as bytewax's ``map``: called once per record, it returns a
    record, a list of records, or ``None`` to drop the record. It takes no options.

    >>> def enrich(record):
    ...     return None if record["x"] < 0 else {**record, "y": record["x"] * 2}
    >>> FunctionStage(enrich).process([{"x": 1}, {"x": -1}])
    [{'x': 1, 'y': 2}]
    """

    def __init__(self, fn: Callable[[Record], Any]) -> None:
        super().__init__()
        self.fn = fn

    def process(self, batch: Batch) -> list[Record]:
        out: list[Record] = []
        for record in batch:
            _collect(out, self.fn(record))
        return out


class AsyncFunctionStage(FunctionStage):
    """An ``async def`` function as a transform: the calls for one batch run concurrently
    (``asyncio.gather``, order kept), so an I/O-bound function overlaps its waits."""

    async def process(self, batch: Batch) -> list[Record]:  # type: ignore[override]
        import asyncio  # here: this module is imported by every CLI command, which needs no event loop

        out: list[Record] = []
        for result in await asyncio.gather(*(self.fn(record) for record in batch)):
            _collect(out, result)
        return out


def _collect(out: list[Record], result: Any) -> None:
    """Add what a function stage returned for one record: a record, a list of them, or None."""
    if isinstance(result, list):
        out.extend(result)
    elif result is not None:
        out.append(result)   # anything but a dict is dead-lettered by the Processor, named
