"""What a sink has delivered: which records of a batch are new, and the marks that say so.

One piece of logic for every sink that holds each record once: the built-in consumer (its marks
go to its state file with the file offset they cover) and a user's sink on the sink API
(:class:`ExactSink`: its marks go into the user's own store, in the same transaction as the
records).

:class:`Delivered` keeps one seen-id set per origin (:class:`~streampipe.stages.seen.SeenByOrigin`),
closed below each origin's watermark, so it is exact and bounded by the ids in flight, with no
clock. It is read before a write (:meth:`Delivered.fresh`) and changed only after it
(:meth:`Delivered.commit_ids`), so a failed write loses nothing.

The sink API (``streampipe.Sink``, or any class with ``write(batch, marks)`` and
``load_marks()``): the runtime gives ``write`` the records of a batch that the store does not
hold yet, and ``marks`` (bytes) that describe everything the store holds once this batch is in
it. The sink commits both in one transaction of its own store; ``load_marks()`` gives the last
committed marks back when the sink starts. A crash before the commit loses the batch's marks with
its records (upstream sends the batch again and it is new again); a crash after it leaves both
(the batch sent again is dropped as held). So the store holds each record once, whatever is
killed when. The marks are opaque msgpack; a store keeps them as a blob.

>>> d = Delivered()
>>> d.at("generator.0/0", None)
>>> [r["id"] for r in d.fresh([{"id": 1}, {"id": 2}])]
[1, 2]
>>> d.commit_ids(np.array([1, 2], np.int64))
>>> [r["id"] for r in d.fresh([{"id": 2}, {"id": 3}])], d.duplicates
([3], 1)
>>> again = Delivered.from_marks(d.marks()); again.at("generator.0/0", None)
>>> [r["id"] for r in again.fresh([{"id": 1}, {"id": 4}])]
[4]

:meth:`Delivered.take_new` (what :class:`ExactSink` writes) gives the same records and their ids,
in one pass when every id is an int64, record by record otherwise (here an id beyond int64):

>>> fresh, ids = again.take_new([{"id": 4}, {"id": 5}, {"id": 5}, {"id": 2**63}])
>>> [r["id"] for r in fresh], ids.tolist()
([4, 5, 9223372036854775808], [4, 5])
>>> again.commit_ids(ids)
>>> fresh, ids = again.take_new([{"id": 4}, {"id": 6}, {"id": 6}]); [r["id"] for r in fresh], ids.tolist()
([6], [6])
"""

from __future__ import annotations

from typing import Any

import numpy as np
from loguru import logger

from streampipe.stages import wire
from streampipe.stages.api import Batch, Record, Stage, StageContext
from streampipe.stages.columns import Columns
from streampipe.stages.seen import SeenByOrigin, holdable


class Delivered:
    """The ids a sink holds, per origin, and the origin and watermark of the batch at hand."""

    def __init__(self, dedup: bool = True, seen: SeenByOrigin | None = None, repeats: bool = False) -> None:
        self.dedup = dedup
        self.repeats = repeats          # an id repeated within one batch is kept (a stage's input: one record
                                        # may have become several upstream), not only its first
        self.seen = seen if seen is not None else SeenByOrigin()
        self.origin: str | None = None
        self.watermark: int | None = None
        self.duplicates = 0
        self.undeduplicated = 0                   # records without an integer id
        self.below_watermark = 0                  # ids below their own batch's watermark: ids rewritten upstream?

    def at(self, origin: str | None, watermark: int | None) -> None:
        """The batch being handled comes from ``origin`` with its ``watermark``."""
        self.origin, self.watermark = origin, watermark

    def fresh(self, batch: Batch) -> list[Record]:
        """The records of ``batch`` not held before (all of them without ``dedup``). Changes nothing."""
        if not self.dedup:
            return list(batch)
        held = [k for k, r in enumerate(batch) if holdable(r.get("id"))]
        self.undeduplicated += len(batch) - len(held)
        if not held:
            return list(batch)
        mask = self._fresh_mask(np.array([batch[k]["id"] for k in held], np.int64))
        drop = {k for k, fresh in zip(held, mask.tolist()) if not fresh}
        return [r for k, r in enumerate(batch) if k not in drop] if drop else list(batch)

    def fresh_rows(self, ids: np.ndarray) -> np.ndarray | None:
        """:meth:`fresh` on an int64 id column: a mask of the rows to write, or None for all of them."""
        if not self.dedup:
            return None
        top = self.seen.of(self.origin).top      # of() first: a new origin learns its older generations
        if (not self.seen.older.get(self.origin) and int(ids[0]) >= top
                and (len(ids) == 1 or bool((ids[1:] > ids[:-1]).all()))):
            return None        # above everything seen, increasing: all fresh (the usual case)
        return self._fresh_mask(ids)

    def _fresh_mask(self, q: np.ndarray) -> np.ndarray:
        """Which ids of ``q`` (int64) to write: unseen in their origin (and in its older generations),
        the first of repeats within the batch."""
        seen = self.seen.of(self.origin)
        older = self.seen.older.get(self.origin)
        mask = ~seen.contains(q)
        if older:
            mask &= ~self.seen.older_written_mask(self.origin, q)
        if len(q) > 1 and not self.repeats:
            once = np.zeros(len(q), bool)
            once[np.unique(q, return_index=True)[1]] = True     # the first of each id in the batch
            mask &= once
        self.duplicates += len(q) - int(mask.sum())
        return mask

    @staticmethod
    def ids_of(records: list[Record]) -> np.ndarray:
        """The holdable ids of ``records`` as int64."""
        return np.array([rid for r in records if holdable(rid := r.get("id"))], np.int64)

    def commit_ids(self, ids: np.ndarray) -> None:
        """Mark ``ids`` (int64) held and close the origin's holes below the batch's watermark."""
        seen = self.seen.of(self.origin)
        seen.add_many(ids)
        w = self.watermark
        if w is not None and self.dedup:
            if len(ids) and int(ids.min()) < w:   # a batch's ids are never below its own watermark unless rewritten
                if not self.below_watermark:
                    logger.warning(f"records from {self.origin} carry ids below their batch's watermark {w}: "
                                   "does a stage upstream change record ids? dedup of such ids is not exact")
                self.below_watermark += int((ids < w).sum())
            seen.close_below(w)

    def take_new(self, batch: list[Record] | Columns) -> tuple[list[Record] | Columns, np.ndarray]:
        """The records of ``batch`` not held yet, and their holdable ids (to :meth:`commit_ids` once
        they are handled): what a stateful stage applies, so that a record sent again by a
        restarted upstream stage is not counted twice."""
        if isinstance(batch, Columns):
            ids = batch.data.get("id")
            if not (isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind == "i" and len(ids)):
                batch = batch.to_records()
            else:
                ids = ids.astype(np.int64, copy=False)
                keep = self.fresh_rows(ids)
                return (batch, ids) if keep is None else (batch.take(keep), ids[keep])
        ids = [r.get("id") for r in batch]
        if ids and all(type(i) is int for i in ids):         # the usual case: one pass, as a column
            try:
                q = np.array(ids, np.int64)
            except OverflowError:
                q = None                                 # an id beyond int64: record by record
            if q is not None:
                keep = self.fresh_rows(q)
                return (list(batch), q) if keep is None else ([r for r, k in zip(batch, keep.tolist()) if k], q[keep])
        fresh = self.fresh(batch)
        return fresh, Delivered.ids_of(fresh)

    # -- marks -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return self.seen.state()

    def marks(self) -> bytes:
        """Everything held, as bytes a store keeps beside the records (:meth:`from_marks`)."""
        return wire.packb({"v": 1, "origins": self.seen.state()})

    @classmethod
    def from_marks(cls, marks: bytes | None, dedup: bool = True) -> Delivered:
        if not marks:
            return cls(dedup)
        saved = wire.unpackb(bytes(marks))
        if not isinstance(saved, dict) or saved.get("v") != 1 or not isinstance(saved.get("origins"), dict):
            raise ValueError("these are not delivery marks written by streampipe (load_marks() must return what write() was given)")
        return cls(dedup, SeenByOrigin.from_state(saved["origins"]))

    def stats(self) -> dict[str, Any]:
        stats = {"duplicates_dropped": self.duplicates, "dedup_holes": self.seen.holes,
                 "dedup_origins": len(self.seen.sets), "not_deduplicated": self.undeduplicated}
        if self.below_watermark:
            stats["ids_below_watermark"] = self.below_watermark
        return stats


class ExactSink(Stage):
    """A user's sink on the sink API behind the :class:`Stage` interface (see the module docstring).

    ``process`` hands ``write`` only the records the store does not hold, with the marks of the
    store once they are in; the ids are marked held only once ``write`` returned. A ``write``
    that raises changes nothing: the batch is retried record by record (the Processor's rule),
    and a record that fails alone is dead-lettered, its id not held.
    """

    def __init__(self, user: Any) -> None:
        self.user = user
        super().__init__()
        self.delivered = Delivered()
        self._marks: bytes | None = None            # what the store holds: the marks of its last commit
        for name in ("teardown", "route"):
            method = getattr(user, name, None)
            if callable(method):
                setattr(self, name, method)
        self.outputs = tuple(getattr(user, "outputs", ()) or ())

    @property
    def context(self) -> StageContext:
        return self._context

    @context.setter
    def context(self, value: StageContext) -> None:
        self._context = value
        self.user.context = value

    def setup(self) -> None:
        setup = getattr(self.user, "setup", None)
        if callable(setup):
            setup()
        self._marks = self.user.load_marks()
        self.delivered = Delivered.from_marks(self._marks)

    def on_origin(self, origin: str | None, watermark: int | None) -> None:
        self.delivered.at(origin, watermark)
        hook = getattr(self.user, "on_origin", None)
        if callable(hook):
            hook(origin, watermark)

    def process(self, batch: Batch) -> list[Record]:
        fresh, ids = self.delivered.take_new(batch)
        if not fresh:
            return []
        self.delivered.commit_ids(ids)
        marks = self.delivered.marks()
        try:
            self.user.write(fresh, marks)
        except BaseException:
            old, self.delivered = self.delivered, Delivered.from_marks(self._marks)   # the store took nothing
            self.delivered.at(old.origin, old.watermark)
            self.delivered.duplicates, self.delivered.undeduplicated = old.duplicates, old.undeduplicated
            self.delivered.below_watermark = old.below_watermark
            raise
        self._marks = marks
        return []

    def take_rejected(self) -> list[tuple[Record, str, str]]:
        take = getattr(self.user, "take_rejected", None)
        return list(take()) if callable(take) else []

    def stats(self) -> dict[str, Any]:
        stats = getattr(self.user, "stats", None)
        own = stats() if callable(stats) else {}
        return {**(own if isinstance(own, dict) else {}), **self.delivered.stats()}
