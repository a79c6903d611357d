"""The sending side: batches (:class:`OutBatch`), one :class:`Link` per receiving replica, one
:class:`Edge` per output edge (least-loaded choice, resend to the same link, FENCE), id and key partitioning."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from streampipe.stages import network, wire
from streampipe.stages.api import Record
from streampipe.stages.columns import Columns
from streampipe.stages.keys import BadKey, replica_of_key
from streampipe.stages.runtime.tokens import InToken, Mark
from streampipe.stages.runtime.tunables import RECONNECT_IVL_MS, ZERO_COPY_BYTES
from streampipe.stages.spec import EdgeSpec, StageSpec

if TYPE_CHECKING:
    from streampipe.stages.runtime.counters import Counters


class OutBatch:
    __slots__ = ("seq", "frames", "n", "parent", "sent_at", "tries", "copy", "link")

    def __init__(self, seq: int, frames: list[bytes], n: int, parent: InToken | Mark | None) -> None:
        self.seq, self.frames, self.n, self.parent = seq, frames, n, parent
        self.sent_at, self.tries = 0.0, 0
        self.copy = len(frames) <= 2 or sum(len(f) for f in frames) < ZERO_COPY_BYTES
        self.link: Link | None = None     # the replica it went to: a resend goes there again


ID_BLOCK = 16384   # ids of one block go to the same replica of a dest partitioned by id: big enough
                   # that few batches straddle two (a 1000-record batch of a strided origin spans 2000
                   # ids), small enough that replicas take turns every ~40 ms at 400 k records/s
_GOLDEN64 = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def replica_of_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """The replica (of ``n``) each id goes to: a hash of its block of ``ID_BLOCK`` ids, so
    consecutive ids travel together and every sender, in any process, agrees."""
    blocks = (ids // ID_BLOCK).astype(np.uint64)
    return ((blocks * np.uint64(_GOLDEN64)) >> np.uint64(32)) % np.uint64(n)


def replica_of_id(i: int, n: int) -> int:
    """:func:`replica_of_ids` for one Python int."""
    return ((((i // ID_BLOCK) & _MASK64) * _GOLDEN64 & _MASK64) >> 32) % n


def split_by_id(records: list[Record] | Columns, n: int) -> list[tuple[int | None, list[Record] | Columns]]:
    """``records`` split by the replica their ids go to; records without an integer id go
    together under None (any replica: nothing deduplicates them)."""
    if isinstance(records, Columns):
        ids = records.data.get("id")
        if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu" and len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            if lo // ID_BLOCK == hi // ID_BLOCK:      # one block (the usual case): no per-id hash
                return [(replica_of_id(lo, n), records)]
            k = replica_of_ids(ids, n)
            first = int(k[0])
            if bool((k == first).all()):
                return [(first, records)]
            return [(int(j), records.take(k == j)) for j in np.unique(k).tolist()]
        records = records.to_records()
    groups: dict[int | None, list[Record]] = {}
    for r in records:
        i = r.get("id")
        groups.setdefault(replica_of_id(i, n) if type(i) is int else None, []).append(r)
    return list(groups.items())


def split_by_key(records: list[Record] | Columns, key_field: str, n: int,
                 reject: Callable[[Any, str], None]) -> list[tuple[int, list[Record] | Columns]]:
    """``records`` split by the replica (of ``n``) their key's group goes to
    (:func:`streampipe.stages.keys.replica_of_key`; a column's distinct keys hashed once each); a
    record without the key, or with one that cannot be hashed alike everywhere, is handed to
    ``reject`` with the reason."""
    if isinstance(records, Columns):
        column = records.data.get(key_field)
        if isinstance(column, np.ndarray) and column.ndim == 1 and column.dtype.kind in "iuU" and len(column):
            keys, index = np.unique(column, return_inverse=True)
            owners = np.array([replica_of_key(k, n) for k in keys.tolist()], dtype=np.int64)[index]
            first = int(owners[0])
            if bool((owners == first).all()):
                return [(first, records)]
            return [(int(j), records.take(owners == j)) for j in np.unique(owners).tolist()]
        records = records.to_records()
    groups: dict[int, list[Record]] = {}
    for r in records:
        if key_field not in r:
            reject(r, f"no key field {key_field!r} (the next stage is partitioned by it: partition: key)")
            continue
        try:
            owner = replica_of_key(r[key_field], n)
        except BadKey as exc:
            reject(r, f"field {key_field!r}: {exc}")
            continue
        groups.setdefault(owner, []).append(r)
    return list(groups.items())


class Wiring:
    """What every edge of one replica shares: who sends (``spec``, ``epoch``), the delivery, how a
    link's socket is opened, and the counters a send adds to. A unit test passes a subclass whose
    :meth:`open` returns a fake socket."""

    def __init__(self, spec: StageSpec, epoch: int, acked: bool, counters: Counters,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None, curve: network.Curve | None = None) -> None:
        self.spec, self.epoch, self.acked, self.counters = spec, epoch, acked, counters
        self.ctx, self.curve = ctx, curve

    def open(self, endpoint: str, immediate: bool) -> tuple[Any, Any]:
        """A PUSH connected to the replica at ``endpoint`` alone, and its :class:`network.Reach`."""
        assert self.ctx is not None
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.spec.hwm)
        sock.setsockopt(zmq.LINGER, -1 if not self.acked else 0)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        if immediate:      # a replica that is down takes no new batch: they go to the live ones
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:
            self.curve.client(sock)
        reach = network.Reach(sock)
        sock.connect(network.connect_from(endpoint, self.spec.bind_host))
        return sock, reach


def keep_sendable(records: list[Any] | Columns, counters: Counters) -> list[Record]:
    """The records that are maps msgpack can encode; the others go to the dead-letter file."""
    if isinstance(records, Columns):
        records = records.to_records()
    good = []
    for record in records:
        try:
            if not isinstance(record, dict):
                raise TypeError(f"output is a {type(record).__name__}, not a map")
            wire.packb(record)
        except (TypeError, ValueError, OverflowError) as exc:
            counters.reject_output(record, str(exc))
            continue
        good.append(record)
    return good


class Link:
    """One replica of an edge's destination: a PUSH connected to it alone, the batches waiting
    to go to it (resends: a batch goes back to the replica it went to)."""

    def __init__(self, edge: Edge, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock, self.reach = edge.wiring.open(endpoint, edge.immediate)
        self.outq: deque[OutBatch] = deque()
        # a replica that is draining (a graceful stop): nothing more goes to it, not even a resend,
        # and a FENCE tells it so; what waits for it stays in outq until it is replaced
        self.fenced = False
        self.fence_due = False
        # run-stage: fenced at its replica's own word (a LEAVE), until its connection drops and a
        # handshake follows (a new process there: see Reach.reconnected_since)
        self.left_at: int | None = None           # reach.mark() when it left

    def close(self, linger: int) -> None:
        self.reach.close()
        self.sock.close(linger=linger)


class Edge:
    """The sending end of one pipeline edge: one :class:`Link` per replica of its dest.

    A new batch goes to the replica holding the fewest unacknowledged batches among those with a
    live connection (a slow replica gets fewer; a dead one none). A batch resent after
    ``ack_timeout`` goes back to the replica it went to, never to another: a replica that was
    only slow has it (or has written it) already, and drops the copy by its ids or its sender's
    sequence, where another replica could not tell it from a new batch. A sink with replicas
    therefore writes each id once across its files. Only a replica that leaves the edge (scaled
    down, its address gone) hands its batches to the others.

    To a dest partitioned by id (``keyed``: the consumer, or ``partition: id``) a batch is split
    by the blocks of its ids and each part goes to the replica its block hashes to, so an id
    reaches the same replica even when a transform that crashed processes its batch again and
    cuts it differently. A replica that is down holds up its share until it is back (as a
    partition would); its parts wait in its link's queue.
    """

    def __init__(self, wiring: Wiring, spec: EdgeSpec, immediate: bool = False) -> None:
        self.wiring, self.name, self.output, self.dest = wiring, spec.name, spec.output, spec.dest
        self.immediate = immediate
        self.keyed = spec.keyed and wiring.acked        # records go to a replica by their id's block
        self.key_field = spec.key_field                 # ... or by their key's group (partition: key)
        self.by_index: list[Link] = []              # the links in replica order: a key group's owner
        self.links: dict[str, Link] = {}
        self.by_key: list[Link] = []                # the links in the order every sender agrees on
        self.endpoints: list[str] = []
        self.ack_endpoint = wiring.spec.ack           # what its headers name (run-stage: the advertised one)
        self.seq = 0
        self.sent = 0                             # records sent on this edge (a resend not again): its rate in the dashboard
        self.turn = 0                             # rotates the choice among equally loaded replicas
        self.pending: list[Record] = []
        self.pending_cols: list[Columns] = []     # a columnar source's batches not cut yet
        self.pending_since = 0.0
        self.outq: deque[OutBatch] = deque()      # new batches, not given to a replica yet
        self.unacked: dict[int, OutBatch] = {}
        self.rtt = 0.0
        self.eos_from: set[str] = set()
        self.connect(spec.endpoints)

    def fence(self, endpoint: str, on: bool) -> None:
        """Send nothing more to the replica at ``endpoint`` (it drains to stop), or again (it exited)."""
        link = self.links.get(endpoint)
        if link is not None:
            link.fenced = link.fence_due = on

    def leave(self, endpoint: str, now: float) -> bool:
        """The replica at ``endpoint`` stops (it said so: run-stage, no supervisor to say it): fence
        it as :meth:`fence` does, until a new process there connects (its connection drops, then a
        handshake: an event of the old connection still unread is not one). ``endpoint`` is its
        input as it announces it; a replica bound to every interface is matched by its port alone
        when one link has that port."""
        link = self.links.get(endpoint)
        if link is None:
            port = endpoint.rsplit(":", 1)[-1]
            same_port = [lk for lk in self.links.values() if lk.endpoint.rsplit(":", 1)[-1] == port]
            link = same_port[0] if len(same_port) == 1 else None
        if link is None:
            return False
        link.fenced = link.fence_due = True
        link.left_at = link.reach.mark(now)
        return True

    def _send_fence(self, link: Link) -> None:
        """The FENCE after the last batch sent to ``link`` (one socket per replica: it arrives after them)."""
        header = {"src": self.wiring.spec.name, "r": self.wiring.spec.replica, "e": self.name, "ep": self.wiring.epoch,
                  "seq": self.seq, "ack": self.ack_endpoint}
        try:
            link.sock.send_multipart(wire.fence_frames(header), flags=zmq.NOBLOCK)
            link.fence_due = False
        except zmq.Again:
            pass    # its queue is full: the next send() tries again

    def connect(self, endpoints: list[str]) -> None:
        """Connect to the replicas at ``endpoints`` and drop the others. Batches waiting for or
        in flight to a dropped one are given to the others; to a dest partitioned by key whose
        replica count changed, every batch not acknowledged is cut again for the new count."""
        recut = self.key_field is not None and bool(self.by_index) and len(endpoints) != len(self.by_index)
        for ep in endpoints:
            if ep not in self.links:
                self.links[ep] = Link(self, ep)
        for ep in list(self.links):
            if ep not in endpoints:
                link = self.links.pop(ep)
                orphans = list(link.outq) + [ob for ob in self.unacked.values() if ob.link is link]
                for ob in orphans:
                    self.unacked.pop(ob.seq, None)
                    ob.link = None
                self.outq.extendleft(sorted(orphans, key=lambda ob: ob.seq, reverse=True))
                link.close(linger=0)
        self.endpoints = list(endpoints)
        self.by_key = [self.links[ep] for ep in sorted(self.links)]
        self.by_index = [self.links[ep] for ep in endpoints]
        if recut:
            self._recut()

    def _recut(self) -> None:
        """Every batch not acknowledged, cut again by key for the replicas the edge has now (a
        rescale of its dest moved key groups). The old copies are not sent again: an ack for one
        still on its way finds nothing; a record in a batch its old replica took anyway is in that
        replica's saved state, whose applied ids every new replica holds (stages/repartition.py)."""
        held: dict[int, OutBatch] = {ob.seq: ob for ob in self.unacked.values()}
        for q in (self.outq, *(link.outq for link in self.links.values())):
            held.update((ob.seq, ob) for ob in q)
            q.clear()
        self.unacked.clear()
        for _, ob in sorted(held.items()):
            header = wire.unpackb(ob.frames[0])
            records = (wire.read_columns(header["c"], header["n"], ob.frames[1:]) if "c" in header
                       else wire.unpackb(ob.frames[1]))
            self.cut(records, ob.parent, (header.get("o"), header.get("w")))
            if ob.parent is not None:
                ob.parent.outstanding -= 1       # its new parts are counted in its place

    def lowest_unacked(self) -> int:
        """The lowest seq of this edge not acknowledged yet (the next one when all are): every
        batch below it is acknowledged, so a receiver can forget having seen it."""
        lo = self.seq
        if self.unacked:
            lo = min(lo, min(self.unacked))
        for q in (self.outq, *(link.outq for link in self.links.values())):
            if q:
                lo = min(lo, min(ob.seq for ob in q))
        return lo

    @property
    def queued(self) -> bool:
        """Whether a batch waits to be sent (new, or a resend for its replica), or a FENCE."""
        return bool(self.outq) or any(link.outq or link.fence_due for link in self.links.values())

    def waiting_socks(self) -> list[zmq.Socket[bytes]]:
        """The sockets a blocked sender waits on to become writable (a fenced replica's is not waited on)."""
        open_links = [link for link in self.links.values() if not link.fenced]
        if self.outq:
            return [link.sock for link in open_links]
        return [link.sock for link in open_links if link.outq]

    def reach_update(self, now: float) -> None:
        for link in self.links.values():
            link.reach.update(now)
            if link.left_at is not None and link.reach.reconnected_since(link.left_at):
                link.left_at = None                 # a new process at its address: it takes batches again
                link.fenced = link.fence_due = False

    def unreachable(self, now: float, after: float) -> bool:
        """No replica has had a live connection for ``after`` seconds."""
        return bool(self.links) and all(link.reach.unreachable(now, after) for link in self.links.values())

    def close(self, linger: int) -> None:
        for link in self.links.values():
            link.close(linger)

    @property
    def load(self) -> int:
        return len(self.outq) + sum(len(link.outq) for link in self.links.values()) + len(self.unacked)

    def full(self) -> bool:
        return self.load >= (self.wiring.spec.max_inflight if self.wiring.acked else 1)

    def cut(self, records: list[Record] | Columns, parent: InToken | Mark | None,
            stamp: tuple[str | None, int | None] = (None, None)) -> None:
        """Frame ``records`` (a list of records or columns) as one batch stamped with ``(origin,
        watermark)`` and queue it for sending; to a dest partitioned by id, one batch per replica
        its records' ids go to (:func:`replica_of_ids`).

        A batch whose payload is over the receivers' ``max_message_bytes`` (they would refuse it)
        is cut in halves; a single record over it goes to the dead-letter file.
        """
        if self.key_field is not None and len(self.by_index) > 1:
            for owner, part in split_by_key(records, self.key_field, len(self.by_index), self.wiring.counters.reject):
                self._cut(part, parent, stamp, self.by_index[owner])
            return
        if self.keyed and len(self.by_key) > 1:
            for k, part in split_by_id(records, len(self.by_key)):
                self._cut(part, parent, stamp, None if k is None else self.by_key[k])
            return
        self._cut(records, parent, stamp, None)

    def _cut(self, records: list[Record] | Columns, parent: InToken | Mark | None,
             stamp: tuple[str | None, int | None], link: Link | None) -> None:
        self.seq += 1
        header = {"k": "d", "src": self.wiring.spec.name, "r": self.wiring.spec.replica, "e": self.name,
                  "ep": self.wiring.epoch, "seq": self.seq, "n": len(records), "t": time.time(),
                  "ack": self.ack_endpoint if self.wiring.acked else None, "o": stamp[0], "w": stamp[1]}
        if self.wiring.acked:
            header["lo"] = self.lowest_unacked()
        try:
            frames = wire.data_frames(header, records)
        except (TypeError, ValueError, OverflowError):
            records = keep_sendable(records, self.wiring.counters)      # dead-letter what cannot cross the wire
            if not records:
                return
            header["n"] = len(records)
            frames = wire.data_frames(header, records)
        size = max(len(f) for f in frames[1:]) if len(frames) > 1 else 0
        if size > self.wiring.spec.max_message_bytes:
            self.seq -= 1            # nothing was queued under it
            if len(records) == 1:
                record = records.to_records()[0] if isinstance(records, Columns) else records[0]
                self.wiring.counters.reject_output(record, f"a record of {size} bytes is over max_message_mb")
                return
            half = len(records) // 2
            if isinstance(records, Columns):
                self._cut(records.rows(0, half), parent, stamp, link)
                self._cut(records.rows(half, len(records)), parent, stamp, link)
            else:
                self._cut(records[:half], parent, stamp, link)
                self._cut(records[half:], parent, stamp, link)
            return
        if parent is not None:
            parent.outstanding += 1
        ob = OutBatch(self.seq, frames, len(records), parent)
        if link is None:
            self.outq.append(ob)
        else:                   # its replica is settled by its ids: it waits for that one
            ob.link = link
            link.outq.append(ob)

    def hold(self, batch: list[Record] | Columns, now: float) -> None:
        """A source's records routed here, held until the next cut (``max_batch``, ``linger_ms``
        or the stream's end: :meth:`flush_pending`)."""
        if not self.pending_n:
            self.pending_since = now
        if isinstance(batch, Columns):
            self.pending_cols.append(batch)
        else:
            self.pending.extend(batch)

    def flush_pending(self, parent: Mark | None, stamp: tuple[str | None, int | None]) -> None:
        if self.pending:
            records, self.pending = self.pending, []
            self.cut(records, parent, stamp)
        if self.pending_cols:
            batch, self.pending_cols = Columns.concat(self.pending_cols), []
            step = self.wiring.spec.max_batch
            for start in range(0, len(batch), step):
                self.cut(batch.rows(start, start + step), parent, stamp)

    @property
    def pending_n(self) -> int:
        return len(self.pending) + sum(len(c) for c in self.pending_cols)

    def send(self, now: float) -> bool:
        """Send what is queued without blocking; False when a replica's socket pushed back (HWM)
        with batches still waiting."""
        done = True
        for link in self.links.values():          # resends first, each to its own replica
            if link.fenced:
                if link.fence_due:
                    self._send_fence(link)
                continue
            while link.outq:
                if not self._send_to(link, link.outq[0], now):
                    done = False
                    break
                link.outq.popleft()
        full: set[Link] = set()
        while self.outq:
            chosen = self._choose(full)
            if chosen is None:
                return False
            if self._send_to(chosen, self.outq[0], now):
                self.outq.popleft()
            else:
                full.add(chosen)
        return done

    def _choose(self, full: set[Link]) -> Link | None:
        """The replica for a new batch: the least loaded with a live connection, else the least loaded."""
        links = [link for link in self.links.values() if link not in full and not link.fenced]
        if not links:
            return None
        live = [link for link in links if link.reach.up] or links
        sent = Counter(ob.link for ob in self.unacked.values())
        self.turn += 1
        k = self.turn % len(live)
        return min(live[k:] + live[:k], key=lambda link: sent[link] + len(link.outq))

    def _send_to(self, link: Link, ob: OutBatch, now: float) -> bool:
        try:
            link.sock.send_multipart(ob.frames, flags=zmq.NOBLOCK, copy=ob.copy)   # copy=False costs more below 64 KiB
        except zmq.Again:
            return False
        if ob.tries == 0:
            self.wiring.counters.sent(ob.n)
            self.sent += ob.n
        if self.wiring.acked:
            ob.link = link
            ob.sent_at, ob.tries = now, ob.tries + 1
            self.unacked[ob.seq] = ob
        return True

    def timeout(self, ob: OutBatch) -> float:
        base = max(self.wiring.spec.ack_timeout, 4.0 * self.rtt)
        return base * (2 ** min(ob.tries - 1, 4))

    def resend_late(self, now: float) -> None:
        late = [ob for ob in self.unacked.values() if now - ob.sent_at > self.timeout(ob)]
        for ob in late:
            del self.unacked[ob.seq]
            if ob.link is not None and ob.link.endpoint in self.links:
                ob.link.outq.append(ob)
            else:
                self.outq.appendleft(ob)
            self.wiring.counters.resending()

    def acked(self, seq: int, now: float) -> OutBatch | None:
        """The batch ``seq`` is acknowledged: forget it. A copy queued for a resend (its ack was
        only late) is taken off the queue, so a replica that replaced the one that acked it never
        gets it (it could not tell it from a new batch)."""
        ob = self.unacked.pop(seq, None)
        if ob is None:
            return self._unqueue(seq)
        if ob.tries == 1:
            sample = now - ob.sent_at
            self.rtt = sample if self.rtt == 0 else 0.8 * self.rtt + 0.2 * sample
        return ob

    def _unqueue(self, seq: int) -> OutBatch | None:
        for q in (self.outq, *(link.outq for link in self.links.values())):
            for ob in q:
                if ob.seq == seq and ob.tries:      # sent once already: this ack is its own
                    q.remove(ob)
                    return ob
        return None
