"""The stage API: what a user implements to put code into a streampipe pipeline.

A stage is a plain class. The runtime (:mod:`stages.runtime`) owns sockets, batching,
heartbeats, signals, acknowledgements and error handling; a stage never touches them.

    Stage                     a transform or a sink: ``process(batch) -> iterable of records``
    └── Source                produces records: ``generate() -> iterator of records``

Lifecycle, in one stage process::

    stage = Cls(**options)    # cheap; options come from services.yaml ``options:``
    stage.context = ...       # set by the runtime before setup (name, replica, run dir, ...)
    stage.restore(state)      # only if a snapshot was saved by an earlier incarnation
    stage.setup()             # open files, load models; READY is reported after it returns
    stage.process(batch) ...  # once per input batch, in the order received
    stage.teardown()          # on stop, after the last batch; flush and close here

A record is a ``dict`` of strings, numbers, booleans, ``None``, lists and dicts (whatever
msgpack carries). A record that a stage cannot handle should raise :class:`BadRecord` (or any
exception) from ``process``: the runtime then retries the batch one record at a time, sends
each failing record to ``<run dir>/deadletter/<stage>.jsonl`` with the error, and goes on.

Example, a complete transform stage:

>>> class Doubler(Stage):
...     def __init__(self, field: str = "x", **options):
...         super().__init__(**options)
...         self.field = field
...     def process(self, batch):
...         for record in batch:
...             yield {**record, self.field: record[self.field] * 2}
>>> list(Doubler(field="v").process([{"id": 0, "v": 21}]))
[{'id': 0, 'v': 42}]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def resolve_output(self, path: str | os.PathLike[str]) -> Path:
        """A path the stage writes: relative paths resolve against the run directory."""
        p = Path(path)
        return p if p.is_absolute() else self.run_dir / p

    def resolve_input(self, path: str | os.PathLike[str]) -> Path:
        """A path the stage reads: relative paths resolve against the config's folder."""
        p = Path(path)
        return p if p.is_absolute() else self.config_dir / p


class Stage:
    """Base class of a transform or sink stage.

    Subclasses override :meth:`process`; every other method is optional.

    - ``__init__(**options)`` receives the stage's ``options`` from ``services.yaml``. It must
      be cheap and must not open sockets or files: the runtime may build a stage only to check it.
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
    - :meth:`teardown` runs once after the last batch, on a clean stop.
    """

    #: Named outputs besides ``"default"``, e.g. ``("holdout",)``.
    outputs: tuple[str, ...] = ()

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
    old ones had left (see :meth:`stages.generator.Generator.repartition`). The supervisor calls
    it when ``replicas`` changed between runs; without it such a change is refused.

    >>> class Count(Source):
    ...     def __init__(self, n: int = 3, **options):
    ...         super().__init__(**options)
    ...         self.n, self.next_id = n, 0
    ...     def generate(self):
    ...         while self.next_id < self.n:
    ...             yield {"id": self.next_id}
    ...             self.next_id += 1
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

    def process(self, batch: Batch) -> Iterable[Record]:  # pragma: no cover - sources have no input
        raise TypeError(f"{type(self).__name__} is a source: it has no input to process")


def is_source(stage: Stage | type[Stage]) -> bool:
    """True when a stage (class or instance) produces records rather than receiving them."""
    cls = stage if isinstance(stage, type) else type(stage)
    return callable(getattr(cls, "generate", None)) and not (
        issubclass(cls, Source) and cls.generate is Source.generate
    )
