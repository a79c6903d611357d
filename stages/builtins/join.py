"""join and enrich: two inputs joined by key in event time, each result emitted once.

    clicked:
      type: join
      inputs: [clicks, impressions]
      replicas: 2
      partition: key            # every record of one ad reaches one replica, from either input
      key: ad
      options: {left: clicks, right: impressions, key: ad, time: t, within: 30, lateness: 5, how: inner}
    orders_enriched:
      type: enrich
      inputs: [orders, customers]
      options: {stream: orders, table: customers, key: customer, time: t, lateness: 5}

Both stages tell their two inputs apart by the input a batch came by (``StageContext.input``):
``left`` / ``right`` (``stream`` / ``table``) name them as ``inputs:`` does, by default the first
and the second of ``inputs:``. Each input's watermark is the greatest event time it has shown
less ``lateness`` (see :mod:`streampipe.stages.builtins.sides`); a record behind its own input's
watermark is *late*: to the named output ``late`` when something reads it, else dead-lettered
with the reason. A record without the key, the event time (a finite number) or an ``id`` is
dead-lettered with the reason.

**join** is Flink's interval join: a left record at ``tl`` and a right record at ``tr`` match
when their keys are equal (``key``; ``right_key`` when the right's field differs) and
``|tr - tl| <= within``; every matching pair is emitted once (many to many). A record waits only
while a partner can still come: a waiting record is given up once the *other* input's watermark
passes its time plus ``within`` (no record of the other input that is not late can match it
then). With ``how: left`` a left record that never matched is emitted once, its right fields
null, when it is given up so. A pair is the left record's fields, the right record's fields (one
whose name the left has too under ``prefix`` + name, ``right_`` by default; ``right_fields``
takes only those), the left record's id as ``left_id`` and ``id``: a 63-bit hash of the left
and the right record's ids (:func:`pair_id`), so a pair made again after a crash is the same
record to a deduplicating sink. An unmatched left record gets ``right_fields`` as null (by
default the right's ``id``, key and time fields) and ``id = pair_id(left id, None)``.

**enrich** is an event-time temporal join of a stream with a table another input keeps up to
date: a stream record at ``t`` is joined with the table row of its key (``key``; ``table_key``)
with the greatest table time (``table_time``, default ``time``) at or below ``t``; it waits
until the table's watermark passes ``t`` (then no table row at or below ``t`` can still come),
then is emitted enriched: its fields and the row's, as a pair's (``prefix``, default
``table_``; ``table_fields``). Two rows of one key at one time: the later to arrive is the
row. A stream record whose key has no row by then is emitted with ``table_fields`` null
(``how: left``, by default) or dropped and counted (``how: inner``). The enriched record keeps
the stream record's ``id``: it is that record, once; the stream's ids must be unique within the
stream input (a source's are). The table versions older than the newest one at or below the
earliest time a stream record can still have (the stream's watermark, or an earlier record
still waiting) are dropped: the table holds about one row per key.

**Exact.** What waits (records, table versions, watermarks) is the stage's snapshot, so the
runtime keeps it exact through SIGKILLs (each record applied once); results travel under the
stage's own origin with their own ids (``own_ids``). The results depend only on the records
each replica is given and the order within each input (which decides what is late), never on
how the two inputs interleave, the batches or a clock (``tests/test_join.py`` checks them
against brute-force references). With replicas, ``partition: key`` by the join's key is
required (``validate`` says so), and :meth:`Join.rescale` deals the state of one replica count
to another by key.

>>> j = Join(left="clicks", right="views", key="ad", time="t", within=10, lateness=5, how="left")
>>> j.context.input = "views"
>>> j.process([{"id": 1, "ad": "a", "t": 5, "slot": 2}, {"id": 2, "ad": "b", "t": 6, "slot": 1}])
[]
>>> j.context.input = "clicks"
>>> [(r["left_id"], r["right_id"], r["slot"]) for r in j.process([{"id": 7, "ad": "a", "t": 12}, {"id": 8, "ad": "c", "t": 9}])]
[(7, 1, 2)]
>>> j.context.input = "views"      # the views' watermark, 25 - 5, passes 9 + 10: click 8 had no view
>>> [(r["left_id"], r["right_id"]) for r in j.process([{"id": 3, "ad": "b", "t": 25}])]
[(8, None)]
>>> e = Enrich(stream="orders", table="customers", key="customer", time="t")
>>> e.context.input = "customers"
>>> e.process([{"id": 1, "customer": "ada", "t": 0, "tier": "gold"}])
[]
>>> e.context.input = "orders"
>>> e.process([{"id": 50, "customer": "ada", "t": 3, "total": 9.5}])        # the table is at 0: it waits
[]
>>> e.context.input = "customers"
>>> [(r["id"], r["tier"], r["total"]) for r in e.process([{"id": 2, "customer": "ada", "t": 4, "tier": "silver"}])]
[(50, 'gold', 9.5)]
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Any, Literal

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.builtins.sides import EventTime, Late, Side, finite
from streampipe.stages.keys import BadKey, deal, key_bytes

How = Literal["inner", "left"]


def pair_id(left: Any, right: Any) -> int:
    """A 63-bit id for the pair of a left record of id ``left`` and a right one of id ``right``
    (``None``: no partner), the same in every process and run.

    >>> pair_id(1, 2) == pair_id(1, 2) != pair_id(2, 1), 0 <= pair_id("a", None) < 2 ** 63
    (True, True)
    """
    lb = key_bytes(left)
    digest = hashlib.blake2b(len(lb).to_bytes(4, "big") + lb + key_bytes(right), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class TwoInputs(Stage):
    """What join and enrich share: which input a batch came by, a record's key and time, the late
    ones, a result's fields. ``names`` are the two roles (``("left", "right")``)."""

    outputs = ("late",)
    own_ids = True
    names: tuple[str, str]

    def __init__(self, inputs: tuple[str | None, str | None], fields: dict[str, tuple[str, str]],
                 lateness: float, prefix: str, how: How, taken: list[str] | None) -> None:
        super().__init__()
        if not lateness >= 0:
            raise ValueError("lateness must be >= 0")
        if how not in ("inner", "left"):
            raise ValueError(f"how must be inner or left, not {how!r}")
        if inputs[0] is not None and inputs[0] == inputs[1]:
            raise ValueError(f"{self.names[0]} and {self.names[1]} name one input: {inputs[0]!r}")
        self.inputs, self.fields, self.lateness, self.prefix, self.how = inputs, fields, float(lateness), prefix, how
        self.taken = list(taken) if taken is not None else None
        self.late = Late()

    def named(self) -> tuple[str | None, str | None]:
        """The inputs of the two roles: the options, else the first and the second of ``inputs:``."""
        given = self.context.inputs
        return tuple(option if option is not None else (given[n] if len(given) > n else None)  # type: ignore[return-value]
                     for n, option in enumerate(self.inputs))

    def side_of_batch(self) -> str | None:
        """The role of the input the batch came by (None: neither; its records are dead letters)."""
        return next((name for name, given in zip(self.names, self.named(), strict=True) if given == self.context.input), None)

    def read(self, side: str, record: Record) -> tuple[Any, float] | None:
        """``record``'s key and event time, or None when it lacks one (dead-lettered, with the reason)."""
        key_field, time_field = self.fields[side]
        if key_field not in record:
            self.reject(record, f"no key: field {key_field!r} is missing ({side} input)")
            return None
        key, t = record[key_field], record.get(time_field)
        try:
            key_bytes(key)
        except BadKey as exc:
            self.reject(record, f"field {key_field!r}: {exc}")
            return None
        if not finite(t):
            self.reject(record, f"no event time: field {time_field!r} must be a finite number ({side} input)")
            return None
        if "id" not in record:
            self.reject(record, f"no id: the {side} record's id makes the result's ({side} input)")
            return None
        return key, t

    def merged(self, record: Record, other: Record | None, other_side: str) -> Record:
        """``record``'s fields and ``other``'s (``taken``, or all of them; None: those null), a name
        ``record`` has too under ``prefix`` + name."""
        row = dict(record)
        if other is None:
            names = self.taken if self.taken is not None else ["id", *self.fields[other_side]]
            values = dict.fromkeys(names)
        else:
            values = other if self.taken is None else {f: other.get(f) for f in self.taken}
        for name, value in values.items():
            row[self.prefix + name if name in record else name] = value
        return row

    def process(self, batch: Batch) -> list[Record]:  # type: ignore[override]
        side = self.side_of_batch()
        out: list[Record] = []
        for record in batch:
            if side is None:
                first, second = self.named()
                self.reject(record, f"from input {self.context.input!r}, which is neither the {self.names[0]} "
                                    f"({first}) nor the {self.names[1]} ({second})")
                continue
            got = self.read(side, record)
            if got is not None:
                self.take(side, record, *got, out)
        out += self.settle()
        return self.late.take() + out

    def route(self, record: Record) -> str:
        return self.late.route(record)

    def take(self, side: str, record: Record, key: Any, t: float, out: list[Record]) -> None:
        raise NotImplementedError

    def settle(self) -> list[Record]:
        """What the watermarks now settle: the results that were waiting for them."""
        raise NotImplementedError


class Join(TwoInputs):
    names = ("left", "right")

    def __init__(self, key: str, time: str, within: float, left: str | None = None, right: str | None = None,
                 right_key: str | None = None, right_time: str | None = None, lateness: float = 0.0,
                 how: How = "inner", prefix: str = "right_", right_fields: list[str] | None = None) -> None:
        super().__init__((left, right), {"left": (key, time), "right": (right_key or key, right_time or time)},
                         lateness, prefix, how, right_fields)
        if not within >= 0:
            raise ValueError("within must be >= 0")
        self.within = float(within)
        self.sides = {"left": Side(key_bytes), "right": Side(key_bytes)}    # entry: [t, id, record, matched]
        self.pairs = self.unmatched = 0

    def snapshot(self) -> dict[str, Any]:
        return {"sides": {name: side.state() for name, side in self.sides.items()}, "pairs": self.pairs,
                "unmatched": self.unmatched, "late": self.late.count}

    def restore(self, state: dict[str, Any]) -> None:
        for name, side in self.sides.items():
            side.load(state.get("sides", {}).get(name, {}))
        self.pairs, self.unmatched = int(state.get("pairs", 0)), int(state.get("unmatched", 0))
        self.late.count = int(state.get("late", 0))

    @classmethod
    def rescale(cls, states: list[dict[str, Any]], replicas: int) -> list[dict[str, Any]]:
        """Every old replica's snapshot (``{}``: it never saved) -> one per new replica: replica
        ``i`` holds what waits for the keys ``replica_of_key(key, replicas) == i``, and each
        input's watermark as the furthest old replica had it (the figures go to replica 0)."""
        dealt = {name: Side.deal([s.get("sides", {}).get(name, {}) for s in states], replicas) for name in cls.names}
        out: list[dict[str, Any]] = [{"sides": {name: dealt[name][i] for name in cls.names}} for i in range(replicas)]
        out[0].update({n: sum(int(s.get(n, 0)) for s in states) for n in ("pairs", "unmatched", "late")})
        return out

    def take(self, side: str, record: Record, key: Any, t: float, out: list[Record]) -> None:
        mine, other = self.sides[side], self.sides["right" if side == "left" else "left"]
        if mine.saw(t, self.lateness):
            self.late.add(self, record, f"event time {t:g} behind the {side} input's watermark "
                                        f"{mine.watermark(self.lateness):g}")
            return
        matched = False
        for entry in other.get(key).values():
            if abs(entry[0] - t) <= self.within:
                matched = entry[3] = True
                out.append(self.pair(record, entry[2]) if side == "left" else self.pair(entry[2], record))
        wm = other.watermark(self.lateness)
        if wm is None or t + self.within >= wm:          # a partner can still come
            mine.add(key, [t, record["id"], record, matched])
        elif side == "left" and not matched:
            self.unmatched += 1
            if self.how == "left":
                out.append(self.pair(record, None))

    def settle(self) -> list[Record]:
        out = []
        left, right = self.sides["left"], self.sides["right"]
        wr, wl = right.watermark(self.lateness), left.watermark(self.lateness)
        if wr is not None:
            for _, (_, _, record, matched) in left.expire(wr - self.within):
                if not matched:
                    self.unmatched += 1
                    if self.how == "left":
                        out.append(self.pair(record, None))
        if wl is not None:
            right.expire(wl - self.within)
        return out

    def pair(self, left: Record, right: Record | None) -> Record:
        row = self.merged(left, right, "right")
        row["left_id"], row["id"] = left["id"], pair_id(left["id"], None if right is None else right["id"])
        self.pairs += right is not None
        return row

    def stats(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "unmatched": self.unmatched, "late": self.late.count,
                "waiting_left": len(self.sides["left"]), "waiting_right": len(self.sides["right"]),
                "watermark_left": self.sides["left"].watermark(self.lateness),
                "watermark_right": self.sides["right"].watermark(self.lateness)}


class Enrich(TwoInputs):
    names = ("stream", "table")

    def __init__(self, key: str, time: str, stream: str | None = None, table: str | None = None,
                 table_key: str | None = None, table_time: str | None = None, lateness: float = 0.0,
                 how: How = "left", prefix: str = "table_", table_fields: list[str] | None = None) -> None:
        super().__init__((stream, table), {"stream": (key, time), "table": (table_key or key, table_time or time)},
                         lateness, prefix, how, table_fields)
        self.stream = Side(key_bytes)                     # entry: [t, record]
        self.table = EventTime()
        self.rows: dict[bytes, list[list[Any]]] = {}      # key -> its versions [t, row], by time
        self.keys: dict[bytes, Any] = {}                  # key bytes -> the key as it came
        self.enriched = self.missing = 0

    def snapshot(self) -> dict[str, Any]:
        return {"stream": self.stream.state(), "table": {"newest": self.table.newest,
                                                         "rows": [[self.keys[kb], v] for kb, v in self.rows.items()]},
                "enriched": self.enriched, "missing": self.missing, "late": self.late.count}

    def restore(self, state: dict[str, Any]) -> None:
        self.stream.load(state.get("stream", {}))
        table = state.get("table", {})
        self.table.newest = table.get("newest")
        self.rows, self.keys = {}, {}
        for key, versions in table.get("rows", []):
            kb = key_bytes(key)
            self.rows[kb], self.keys[kb] = [list(v) for v in versions], key
        self.enriched, self.missing = int(state.get("enriched", 0)), int(state.get("missing", 0))
        self.late.count = int(state.get("late", 0))

    @classmethod
    def rescale(cls, states: list[dict[str, Any]], replicas: int) -> list[dict[str, Any]]:
        """As :meth:`Join.rescale`: the waiting stream records and the table's rows by key, each
        input's watermark the furthest an old replica had."""
        streams = Side.deal([s.get("stream", {}) for s in states], replicas)
        newest = max((s["table"]["newest"] for s in states if s.get("table", {}).get("newest") is not None), default=None)
        rows = deal([row for s in states for row in s.get("table", {}).get("rows", [])], replicas, key_of=lambda row: row[0])
        out: list[dict[str, Any]] = [{"stream": streams[i], "table": {"newest": newest, "rows": rows[i]}}
                                     for i in range(replicas)]
        out[0].update({n: sum(int(s.get(n, 0)) for s in states) for n in ("enriched", "missing", "late")})
        return out

    def take(self, side: str, record: Record, key: Any, t: float, out: list[Record]) -> None:
        mine = self.stream if side == "stream" else self.table
        if mine.saw(t, self.lateness):
            self.late.add(self, record, f"event time {t:g} behind the {side} input's watermark "
                                        f"{mine.watermark(self.lateness):g}")
            return
        kb = key_bytes(key)
        if side == "stream":
            self.stream.add(key, [t, record])            # settle() emits it once the table has passed t
            return
        versions = self.rows.setdefault(kb, [])
        self.keys[kb] = key
        at = bisect.bisect_right(versions, t, key=lambda v: v[0])
        if at and versions[at - 1][0] == t:
            versions[at - 1] = [t, record]               # one time, two rows: the later to arrive
        else:
            versions.insert(at, [t, record])
        self.prune(kb)

    def prune(self, kb: bytes) -> None:
        """Drop ``kb``'s versions older than the newest one at or below the earliest time a stream
        record can still be joined at: no record can need them."""
        wm, earliest = self.stream.watermark(self.lateness), self.stream.earliest()
        floor = earliest if wm is None else wm if earliest is None else min(wm, earliest)
        versions = self.rows.get(kb)
        if floor is None or not versions:
            return
        at = bisect.bisect_right(versions, floor, key=lambda v: v[0])
        if at > 1:
            del versions[:at - 1]

    def settle(self) -> list[Record]:
        wm = self.table.watermark(self.lateness)
        if wm is None:
            return []
        out, touched = [], set()
        for key, (t, record) in self.stream.expire(wm):
            kb = key_bytes(key)
            touched.add(kb)
            versions = self.rows.get(kb, [])
            at = bisect.bisect_right(versions, t, key=lambda v: v[0])
            if at:
                self.enriched += 1
                out.append(self.merged(record, versions[at - 1][1], "table"))
            else:
                self.missing += 1
                if self.how == "left":
                    out.append(self.merged(record, None, "table"))
        for kb in touched:          # once all are out: one given up here is still owed its version above
            self.prune(kb)
        return out

    def stats(self) -> dict[str, Any]:
        return {"enriched": self.enriched, "missing": self.missing, "late": self.late.count,
                "waiting": len(self.stream), "table_keys": len(self.rows),
                "table_rows": sum(len(v) for v in self.rows.values()),
                "watermark_stream": self.stream.watermark(self.lateness),
                "watermark_table": self.table.watermark(self.lateness)}
