"""The stage process: sockets, batching, framing, acknowledgements, heartbeats, drain on SIGTERM.

One :class:`StageRuntime` runs in each stage replica process. It is a single-threaded loop
around one ``zmq.Poller``; the stage's own code (``process`` / ``generate``) runs inside that
loop, so a heartbeat proves the loop is alive (a stage stuck in ``process`` stops beating and the
supervisor replaces it as hung).

Sockets of one replica::

    PULL  bind    <input>        records from every upstream stage (absent for a source)
    PULL  bind    <ack>          acknowledgements from downstream replicas
    PUSH  connect edge endpoints one per replica of each output edge's dest (:class:`Link`)
    PUSH  connect <ack of src>   acknowledgements back to each upstream sender (lazily)
    DEALER connect <control>     hello / ready / heartbeats up, endpoint changes and stop down

Delivery ``at-least-once``: a sender keeps every batch until its receiver acknowledges it and
resends it, to the same replica, when the ack is late (the receiver died with it queued, or is
slow); a receiver drops a copy of a batch it has taken already (:meth:`StageRuntime.copy_of_seen`). A transform acknowledges an
input batch only once every batch it produced from it is acknowledged downstream, so an ack at
the source means the record reached the sink. ``max_inflight`` unacknowledged batches per edge
bound memory and give backpressure. Delivery ``at-most-once`` skips all of that.

Origins and watermarks (what makes the sink's dedup exact without a clock): a source replica
stamps every DATA header with its origin ``o`` (``"<stage>.<replica>/<generation>"``, the
generation of its id space kept in its state file) and, under at-least-once, a watermark ``w``:
one more than the highest id in every batch up to its committed position *as saved in its state
file*, so every id of this origin below ``w`` is acknowledged end to end and a restarted or
repartitioned replica never emits an id below a watermark it announced (a watermark ahead of the
saved position would let a new generation re-emit ids the sink can no longer tell from another
partition's, see :mod:`streampipe.stages.seen`). A transform copies ``o`` and ``w`` from an input
batch onto every batch it cuts from it; a stage that defines ``on_origin(origin, watermark)``
(the consumer) is told them before each ``process``. This needs integer ids that increase per
source replica. A source whose ids stop increasing freezes its watermark where it was (the sink
then keeps that origin's ids exactly; ``ids_out_of_order`` in its stats) and dead-letters a record
whose id is below the watermark it already announced: a sink would take it for a duplicate.
Records without an integer id do not take part.
"""

from __future__ import annotations

import bisect
import ctypes
import faulthandler
import gc
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from loguru import logger

from streampipe._rotating import watch_stdio
from streampipe.stages import fence, network, wire
from streampipe.stages.ackpoints import KEEP_SENDER_EPOCHS, AckPoints
from streampipe.stages.api import Record, Source, Stage, StageContext, columnar_source, is_source
from streampipe.stages.columns import Columns
from streampipe.stages.delivery import Delivered
from streampipe.stages.poison import Journal
from streampipe.stages.process import Processor
from streampipe.stages.registry import load_stage
from streampipe.stages.seen import SeenByOrigin
from streampipe.stages.spec import DUMP_STACK_SIGNAL, EdgeSpec, StageSpec
from streampipe.stages.state import DeadLetters, load_replica_state, read_layout, save_state

HEARTBEAT_INTERVAL_S = 0.25     # 40 beats inside the default 10 s heartbeat_timeout
RESEND_CHECK_S = 0.05           # how often unacked batches are checked for a late ack
IDLE_WAIT_MS = 2                # a source that yielded None is asked again after this
ACK_FLUSH_EVERY = 16            # acks sent after this many batches, not only once per loop pass
SOURCE_BATCHES_PER_TICK = 8     # batches a busy source makes between two looks at its sockets
MAX_MSGS_PER_TICK = 64          # input messages handled before serving acks/heartbeats again
ZERO_COPY_BYTES = 64 << 10      # a message at least this big is sent with copy=False (below it costs more)
EOS_RESEND_S = 0.5              # an end-of-stream not acknowledged is sent again after this
EOS_WAIT_S = 60.0               # give up waiting for downstream to confirm end-of-stream
STATE_SAVE_S = 1.0              # a source commits its position at most this often (an fsync: ~ms on a busy disk)
PROMPT_SAVE_S = 0.01            # ... or this often when it waits on the saves (``saved()``: an HTTP answer holds on it)
ACK_SAVE_MIN_S = 0.02           # a stateful transform saves at most this often; its acks wait up to this long,
                                # which a window of max_inflight=128 batches absorbs up to 6,400 batches/s
ACK_SAVE_SHARE = 0.2            # ... and spends at most this share of its time saving (an fsync: 1-100 ms)
RECONNECT_IVL_MS = 10           # PUSH reconnect timer: ZeroMQ's 100 ms default delays respawn
MAX_SENDERS = 512               # run-stage: ack endpoints remembered (and ack sockets kept open)
LOG_ERRORS_PER_S = 10          # failed records logged with a traceback per second; the rest counted
LATENCY_BUCKETS_MS = (0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0)
GC_GEN0 = 20_000                # allocations between young collections (CPython's default 700 made a
                                # 1000-record batch of dicts trigger ~3 of them: half of msgpack decode's time)

ADOPT_WAIT_S = 2.0              # a forked stage waits at most this long to be adopted by the supervisor

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_START_FAILED = 3


class InToken:
    """An input batch awaiting the acks of what it produced before it is acknowledged."""

    __slots__ = ("ack", "edge", "ep", "seq", "outstanding")

    def __init__(self, header: dict[str, Any]) -> None:
        self.ack, self.edge, self.ep, self.seq = header["ack"], header["e"], header["ep"], header["seq"]
        self.outstanding = 0


class Taken:
    """The seqs of one sender's batches this process has taken: all below ``mark`` (the sender
    said, by its ``lo``, that every batch below it is acknowledged) and those in ``above``, which
    holds only what is still in flight."""

    __slots__ = ("mark", "above")

    def __init__(self) -> None:
        self.mark = 0
        self.above: set[int] = set()

    def __contains__(self, seq: int) -> bool:
        return seq < self.mark or seq in self.above

    def add(self, seq: int) -> None:
        self.above.add(seq)

    def close_below(self, lo: int) -> None:
        if lo > self.mark:
            self.mark = lo
            if self.above:
                self.above = {s for s in self.above if s >= lo}


class Mark:
    """A source position: committed once every batch cut with it is acknowledged.

    ``top`` is one more than the highest id pulled up to this position: the origin's watermark
    once the mark is committed.
    """

    __slots__ = ("state", "top", "outstanding")

    def __init__(self, state: dict[str, Any], top: int | None) -> None:
        self.state, self.top, self.outstanding = state, top, 0


def stamp_of(header: dict[str, Any]) -> tuple[str | None, int | None]:
    """The ``(origin, watermark)`` a received batch carries (None for what is absent or mistyped)."""
    o, w = header.get("o"), header.get("w")
    return (o if type(o) is str else None), (w if type(w) is int else None)


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


class Link:
    """One replica of an edge's destination: a PUSH connected to it alone, the batches waiting
    to go to it (resends: a batch goes back to the replica it went to)."""

    def __init__(self, edge: Edge, endpoint: str) -> None:
        rt = edge.rt
        self.endpoint = endpoint
        self.sock = rt.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, rt.spec.hwm)
        self.sock.setsockopt(zmq.LINGER, -1 if not rt.acked else 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        if edge.immediate:      # a replica that is down takes no new batch: they go to the live ones
            self.sock.setsockopt(zmq.IMMEDIATE, 1)
        if rt.curve is not None:
            rt.curve.client(self.sock)
        self.reach = network.Reach(self.sock)
        self.sock.connect(network.connect_from(endpoint, rt.spec.bind_host))
        self.outq: deque[OutBatch] = deque()
        # a replica that is draining (a graceful stop): nothing more goes to it, not even a resend,
        # and a FENCE tells it so; what waits for it stays in outq until it is replaced
        self.fenced = False
        self.fence_due = False

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

    def __init__(self, rt: StageRuntime, spec: EdgeSpec, immediate: bool = False) -> None:
        self.rt, self.name, self.output, self.dest = rt, spec.name, spec.output, spec.dest
        self.immediate = immediate
        self.keyed = spec.keyed and rt.acked        # records go to a replica by their id's block
        self.links: dict[str, Link] = {}
        self.by_key: list[Link] = []                # the links in the order every sender agrees on
        self.endpoints: list[str] = []
        self.ack_endpoint = rt.spec.ack           # what its headers name (run-stage: the advertised one)
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

    def _send_fence(self, link: Link) -> None:
        """The FENCE after the last batch sent to ``link`` (one socket per replica: it arrives after them)."""
        header = {"src": self.rt.spec.name, "r": self.rt.spec.replica, "e": self.name, "ep": self.rt.epoch,
                  "seq": self.seq, "ack": self.ack_endpoint}
        try:
            link.sock.send_multipart(wire.fence_frames(header), flags=zmq.NOBLOCK)
            link.fence_due = False
        except zmq.Again:
            pass    # its queue is full: the next send() tries again

    def connect(self, endpoints: list[str]) -> None:
        """Connect to the replicas at ``endpoints`` and drop the others. Batches waiting for or
        in flight to a dropped one are given to the others."""
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
        return self.load >= (self.rt.spec.max_inflight if self.rt.acked else 1)

    def cut(self, records: list[Record] | Columns, parent: InToken | Mark | None,
            stamp: tuple[str | None, int | None] = (None, None)) -> None:
        """Frame ``records`` (a list of records or columns) as one batch stamped with ``(origin,
        watermark)`` and queue it for sending; to a dest partitioned by id, one batch per replica
        its records' ids go to (:func:`replica_of_ids`).

        A batch whose payload is over the receivers' ``max_message_bytes`` (they would refuse it)
        is cut in halves; a single record over it goes to the dead-letter file.
        """
        if self.keyed and len(self.by_key) > 1:
            for k, part in split_by_id(records, len(self.by_key)):
                self._cut(part, parent, stamp, None if k is None else self.by_key[k])
            return
        self._cut(records, parent, stamp, None)

    def _cut(self, records: list[Record] | Columns, parent: InToken | Mark | None,
             stamp: tuple[str | None, int | None], link: Link | None) -> None:
        self.seq += 1
        header = {"k": "d", "src": self.rt.spec.name, "r": self.rt.spec.replica, "e": self.name,
                  "ep": self.rt.epoch, "seq": self.seq, "n": len(records), "t": time.time(),
                  "ack": self.ack_endpoint if self.rt.acked else None, "o": stamp[0], "w": stamp[1]}
        if self.rt.acked:
            header["lo"] = self.lowest_unacked()
        try:
            frames = wire.data_frames(header, records)
        except (TypeError, ValueError, OverflowError):
            records = self.rt.keep_sendable(records)      # dead-letter what cannot cross the wire
            if not records:
                return
            header["n"] = len(records)
            frames = wire.data_frames(header, records)
        size = max(len(f) for f in frames[1:]) if len(frames) > 1 else 0
        if size > self.rt.spec.max_message_bytes:
            self.seq -= 1            # nothing was queued under it
            if len(records) == 1:
                record = records.to_records()[0] if isinstance(records, Columns) else records[0]
                self.rt.reject_output(record, f"a record of {size} bytes is over max_message_mb")
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

    def flush_pending(self, parent: Mark | None, stamp: tuple[str | None, int | None]) -> None:
        if self.pending:
            records, self.pending = self.pending, []
            self.cut(records, parent, stamp)
        if self.pending_cols:
            batch, self.pending_cols = Columns.concat(self.pending_cols), []
            step = self.rt.spec.max_batch
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
            self.rt.records_out += ob.n
            self.sent += ob.n
        if self.rt.acked:
            ob.link = link
            ob.sent_at, ob.tries = now, ob.tries + 1
            self.unacked[ob.seq] = ob
        return True

    def timeout(self, ob: OutBatch) -> float:
        base = max(self.rt.spec.ack_timeout, 4.0 * self.rtt)
        return base * (2 ** min(ob.tries - 1, 4))

    def resend_late(self, now: float) -> None:
        late = [ob for ob in self.unacked.values() if now - ob.sent_at > self.timeout(ob)]
        for ob in late:
            del self.unacked[ob.seq]
            if ob.link is not None and ob.link.endpoint in self.links:
                ob.link.outq.append(ob)
            else:
                self.outq.appendleft(ob)
            self.rt.resent += 1

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


class ErrorLog:
    """Logs records that failed in ``process``, with their traceback, at most ``LOG_ERRORS_PER_S`` a second.

    A stream of bad records must not turn into a stream of tracebacks: past the limit, failures
    are counted and summed up in one line a second (the dead-letter file still has every one).
    """

    def __init__(self) -> None:
        self.window_start, self.logged, self.suppressed = 0.0, 0, 0

    def report(self, outcome: Any) -> None:
        now = time.monotonic()
        if now - self.window_start >= 1.0:
            if self.suppressed:
                logger.warning(f"{self.suppressed} more records failed in the last second (see the dead-letter file)")
            self.window_start, self.logged, self.suppressed = now, 0, 0
        excs = iter(outcome.exceptions)
        for record, error, tb in outcome.rejected:
            exc = next(excs, None) if tb else None
            if self.logged >= LOG_ERRORS_PER_S:
                self.suppressed += 1
                continue
            self.logged += 1
            rid = record.get("id") if isinstance(record, dict) else None
            if exc is not None:
                logger.opt(exception=exc).error(f"record {rid} failed in process: {error}; sent to the dead-letter file")
            else:
                logger.warning(f"record {rid} rejected: {error}; sent to the dead-letter file")


class StageRuntime:
    """Runs one stage replica until it is stopped, its stream ends, or it crashes."""

    def __init__(self, spec: StageSpec, stage: Stage) -> None:
        self.spec, self.stage = spec, stage
        self.acked = spec.delivery == "at-least-once"
        self.epoch = int.from_bytes(os.urandom(4), "little")
        self.source = is_source(stage)
        # a columnar source yields Columns batches from generate_columns() instead of records
        self.columnar_source = self.source and columnar_source(stage)
        self.ctx = zmq.Context()
        self.stopping = False
        # a graceful stop (the supervisor's ``stop``): the senders whose FENCE (nothing more
        # follows) is awaited before the input is complete; None: stop taking input at once
        self.drain_from: set[str] | None = None
        self.fenced_by: set[str] = set()
        self.finished = False                     # a source's stream ended
        self.records_in = self.records_out = self.errors = self.dead = self.resent = 0
        self.copies_dropped = 0      # input batches that were resent copies of ones taken already
        self.seen_batches: dict[tuple[str, str, int], Taken] = {}     # per sender: seqs taken
        self.in_progress: set[tuple[str, str, int, int]] = set()      # taken, not acknowledged yet
        self.batches = 0
        self.lat_ewma_ms = 0.0
        self.lat_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.blocked = False
        self.marks: deque[Mark] = deque()
        self.committed: dict[str, Any] | None = None
        self.generation = 0                       # of the source's id space (bumped when it is repartitioned)
        self.watermark: int | None = None         # announced: every id of this origin below it is acknowledged
        self.committed_top: int | None = None     # the watermark of ``committed``: announced once it is saved
        self.id_top: int | None = None            # one more than the highest id pulled so far
        self.ordered = True                       # ids have increased so far: the watermark may rise
        self.out_of_order = 0                     # ids that did not increase
        self.on_origin = getattr(stage, "on_origin", None)
        committed = getattr(stage, "committed", None)      # a source hears which position is done end to end
        self.on_commit = committed if self.source and getattr(committed, "__func__", None) is not Source.committed else None
        saved = getattr(stage, "saved", None)              # ... and which position is on disk (it then saves promptly)
        self.on_saved = saved if self.source and getattr(saved, "__func__", None) is not Source.saved else None
        self.last_saved: dict[str, Any] | None = None     # the committed state written last
        # a transform with state saves its snapshot where its acks advance (see stages.ackpoints)
        stateful = not self.source and self.acked and getattr(stage.snapshot, "__func__", None) is not Stage.snapshot
        self.ackpoints = AckPoints(ACK_SAVE_MIN_S) if stateful else None
        # ... and the ids it has applied, per origin, saved with it: a record sent again by a
        # restarted upstream stage (in a batch of another sender life) is not applied twice
        self.applied_ids = Delivered(repeats=True) if stateful else None
        self.acks_out: dict[str, dict[tuple[str, int], list[int]]] = {}
        self.acks_pending = 0
        self.eos_headers: list[dict[str, Any]] = []   # end-of-stream messages to confirm to their senders
        self.ack_socks: dict[str, zmq.Socket[bytes]] = {}
        self.dead_letters = DeadLetters(Path(spec.run_dir) / "deadletter" / f"{spec.name}.jsonl", spec.ident,
                                        spec.file_max_bytes, spec.log_retention)
        # the input batch in hand, noted so that a record that kills the process is isolated
        self.journal = (Journal(self.state_path.with_suffix(".inflight"), spec.last_exit)
                        if self.acked and spec.input and spec.control else None)
        self.processor = Processor(stage)
        # route() is called per record only when a named output is actually consumed
        self.routes = getattr(stage.route, "__func__", None) is not Stage.route and any(e.output != "default" for e in spec.edges)
        self.last_error = ""
        self.error_log = ErrorLog()
        self.rejects = wire.Rejects()             # malformed messages dropped, by socket
        # the only addresses acks are sent to: the senders the supervisor names, or (run-stage,
        # no supervisor) those a batch arrived from, checked against the connection's peer address
        self.ack_peers: frozenset[str] | dict[str, None] = frozenset(spec.ack_peers)
        self.standalone = not spec.control
        if self.standalone:
            self.ack_peers = {}
        self.stats_reported = False               # a stats() problem is reported once
        self.on_tell: Callable[[str, dict[str, Any]], None] | None = None   # run-stage: health and metrics
        self.curve = network.Curve(Path(spec.curve_keys)) if spec.curve_keys else None
        if self.curve is not None:
            self.curve.start_authenticator(self.ctx)
        self.insecure = ""                        # why a tcp bind is open to the network, if it is
        self.resolver: network.Resolver | None = None
        self.resolved_version = 0

        self.ctl: zmq.Socket[bytes] | None = None
        if spec.control:
            self.ctl = self.ctx.socket(zmq.DEALER)
            self.ctl.setsockopt(zmq.IDENTITY, spec.ident.encode())
            self.ctl.setsockopt(zmq.MAXMSGSIZE, wire.CONTROL_MAX_BYTES)
            self.ctl.setsockopt(zmq.LINGER, 500)
            self.ctl.setsockopt(zmq.SNDHWM, 100)
            self.ctl.connect(spec.control)
        self.inp: zmq.Socket[bytes] | None = None
        self.ackp: zmq.Socket[bytes] | None = None
        self.edges: list[Edge] = []

    # -- set-up ------------------------------------------------------------------------------
    def bind(self) -> None:
        self.ackp = self.ctx.socket(zmq.PULL)
        self.ackp.setsockopt(zmq.LINGER, 0)
        self.ackp.setsockopt(zmq.MAXMSGSIZE, wire.CONTROL_MAX_BYTES)
        self.secure(self.ackp, self.spec.ack)
        self.ackp.bind(self.spec.ack)
        bound_ack = self.ackp.get_string(zmq.LAST_ENDPOINT)     # run-stage may bind port 0
        targets = {e.name: (e.addresses, e.port) for e in self.spec.edges if e.addresses}
        self.edges = [Edge(self, e, immediate=e.name in targets) for e in self.spec.edges]
        self.edges_by_name = {e.name: e for e in self.edges}
        if targets:
            self.ack_port = int(bound_ack.rsplit(":", 1)[1])
            self.resolver = network.Resolver(targets, self.spec.resolve_interval)
            self.apply_resolved()
        if self.spec.input:
            self.inp = self.ctx.socket(zmq.PULL)
            self.inp.setsockopt(zmq.RCVHWM, self.spec.hwm)
            self.inp.setsockopt(zmq.LINGER, 0)
            self.inp.setsockopt(zmq.MAXMSGSIZE, self.spec.max_message_bytes)   # libzmq drops bigger frames unallocated
            self.secure(self.inp, self.spec.input)
            self.inp.bind(self.spec.input)

    def secure(self, sock: zmq.Socket[bytes], endpoint: str) -> None:
        """CURVE on a tcp socket this replica binds; without it, a bind open to the network is loud."""
        if not endpoint.startswith("tcp://"):
            return
        if self.curve is not None:
            self.curve.serve(sock)
            return
        host = network.host_of(endpoint).replace("*", "0.0.0.0")
        if not network.is_loopback(host) and not self.insecure:
            self.insecure = f"tcp bind on {host} without CURVE: anyone who reaches it can send data and acks"
            logger.warning(f"INSECURE: {self.insecure} (set security: curve and keys:)")

    def apply_resolved(self) -> None:
        """Connect the edges to what their names resolve to now (run-stage)."""
        assert self.resolver is not None
        self.resolved_version = self.resolver.version
        for name, endpoints in self.resolver.endpoints.items():
            edge = self.edges_by_name[name]
            if endpoints != edge.endpoints:
                edge.connect(endpoints)
            host = network.advertised_host(self.spec.advertise_host, self.spec.bind_host, endpoints)
            edge.ack_endpoint = f"tcp://{host}:{self.ack_port}"

    def tell(self, op: str, **fields: Any) -> None:
        for key in ("error", "traceback", "last_error"):    # under the supervisor's CONTROL_MAX_BYTES
            if key in fields:
                fields[key] = fields[key][-wire.TEXT_MAX_CHARS:]
        if self.on_tell is not None:
            self.on_tell(op, fields)
        if self.ctl is None:
            return
        try:
            self.ctl.send(wire.control(op, pid=os.getpid(), **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        poller = zmq.Poller()
        assert self.ackp is not None
        poller.register(self.ackp, zmq.POLLIN)
        if self.ctl is not None:
            poller.register(self.ctl, zmq.POLLIN)
        if self.inp is not None:
            poller.register(self.inp, zmq.POLLIN)
        gen: Iterator[Any] | None = None
        if self.source and not self.finished:
            gen = self.stage.generate_columns() if self.columnar_source else self.stage.generate()  # type: ignore[attr-defined]
        next_hb = next_resend = next_save = 0.0
        taking = self.inp is not None             # the input is registered with the poller
        deadline = float("inf")
        eos_sent_at = 0.0
        eos_started: float | None = None

        while True:
            now = time.monotonic()
            if self.stopping and deadline == float("inf"):
                deadline = now + max(0.5, self.spec.stop_grace - 0.75)
                gen = None
            if self.resolver is not None and self.resolver.version != self.resolved_version:
                self.apply_resolved()
            for edge in self.edges:
                if edge.queued:
                    edge.send(now)
            self.blocked = any(e.full() for e in self.edges)
            if self.ackpoints is not None:
                self.save_at_ack_points(now)
            self.flush_acks()

            # end of the stream or stop: decide whether we are done
            if taking and not self.taking_input():
                assert self.inp is not None
                poller.unregister(self.inp)       # what is still queued there was never taken: it is resent
                taking = False
            if (self.finished or self.stopping) and gen is None:
                if not taking:
                    if self.source and any(e.pending_n for e in self.edges):
                        self.cut_source_batches()
                    for edge in self.edges:
                        edge.send(now)
                    settled = all(not e.queued and not e.unacked for e in self.edges)
                    if self.finished and settled:
                        if eos_started is None:
                            eos_started = now
                        if self.eos_confirmed():
                            break
                        if now - eos_sent_at > EOS_RESEND_S:
                            self.send_eos()
                            eos_sent_at = now
                        if now - eos_started > EOS_WAIT_S:
                            break
                    elif settled:
                        break
                if now >= deadline:
                    self.undrained()
                    break

            if now >= next_hb:
                self.heartbeat()
                next_hb = now + HEARTBEAT_INTERVAL_S
            if self.acked and now >= next_resend:
                for edge in self.edges:
                    edge.resend_late(now)
                next_resend = now + RESEND_CHECK_S
            if self.source and self.committed is not None and (
                    now >= next_save or (self.on_saved is not None and self.committed is not self.last_saved
                                         and now >= next_save - STATE_SAVE_S + PROMPT_SAVE_S)):
                self.save_state()
                next_save = now + STATE_SAVE_S

            # produce (source) or linger-flush (partial batches)
            idle = True
            for _ in range(SOURCE_BATCHES_PER_TICK):   # a poll per batch cost a source 13 % of its CPU
                if gen is None or self.blocked:
                    break
                produced, gen = self.pull_source(gen, now)
                idle = not produced
                if gen is None and not self.stopping:
                    self.finished = True
                for edge in self.edges:
                    if edge.outq:
                        edge.send(now)
                self.blocked = any(e.full() for e in self.edges)
                if idle:
                    break
            self.flush_lingering(now)
            for edge in self.edges:
                if edge.queued:
                    edge.send(now)   # a batch the linger timer just cut leaves now, not at the next wake-up

            timeout_ms = self.poll_timeout(now, idle and gen is not None, next_hb)
            writable_wait = [sock for e in self.edges if e.queued for sock in e.waiting_socks()] if self.blocked else []
            for sock in writable_wait:      # blocked by a full socket: wake when it drains
                poller.register(sock, zmq.POLLOUT)
            events = dict(poller.poll(timeout_ms))
            for sock in writable_wait:
                poller.unregister(sock)
            if self.ctl is not None and self.ctl in events:
                self.read_control()
            if self.ackp in events:
                self.read_acks()
            now = time.monotonic()
            if taking and self.inp in events and not self.blocked:
                self.read_input(now)
        return EXIT_OK

    def taking_input(self) -> bool:
        """Whether input batches are still taken: until the stop, and while stopping until every
        sender named by the supervisor has sent its FENCE (nothing more follows it). Knowledge,
        not quiet: a steady stream is never idle, and every batch taken is finished and
        acknowledged before the replica exits, so upstream resends nothing it had."""
        if self.inp is None:
            return False
        if not self.stopping:
            return True
        return self.drain_from is not None and not self.drain_from <= self.fenced_by

    def undrained(self) -> None:
        """The stop deadline passed before the replica drained: say what is left (it is resent)."""
        unacked = sum(len(e.unacked) + len(e.outq) for e in self.edges)
        missing = sorted((self.drain_from or set()) - self.fenced_by)
        logger.warning(f"stop_grace ran out before the drain ended: {unacked} batches not acknowledged downstream, "
                       f"{len(missing)} senders not fenced{': ' + ', '.join(missing) if missing else ''}; "
                       "what was not acknowledged is sent again and may be processed twice")

    def poll_timeout(self, now: float, source_idle: bool, next_hb: float) -> int:
        if self.source and not source_idle and not self.blocked and not (self.finished or self.stopping):
            return 0
        wait = next_hb - now
        for edge in self.edges:
            if edge.pending_n:
                wait = min(wait, edge.pending_since + self.spec.linger_ms / 1000.0 - now)
        if self.acked and any(e.unacked for e in self.edges):
            wait = min(wait, RESEND_CHECK_S)
        if source_idle:
            wait = min(wait, IDLE_WAIT_MS / 1000.0)
        if self.stopping or self.finished:
            wait = min(wait, 0.02)
        return max(0, int(wait * 1000))

    # -- input -------------------------------------------------------------------------------
    def read_input(self, now: float) -> None:
        assert self.inp is not None
        for _ in range(MAX_MSGS_PER_TICK):
            if self.blocked:
                return
            try:
                if self.standalone:    # the peer address checks the ack address a header names
                    got = self.inp.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    self.handle([f.bytes for f in got], network.SenderCheck(self.peer_address(got[0])))
                    continue
                frames = self.inp.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(frames)
            self.blocked = any(e.full() for e in self.edges)
            if self.acks_pending >= ACK_FLUSH_EVERY:
                self.flush_acks()   # upstream's window refills while we work through ours

    @staticmethod
    def peer_address(frame: zmq.Frame) -> str | None:
        try:
            return str(frame.get("Peer-Address"))
        except zmq.ZMQError:
            return None     # not a tcp connection

    def handle(self, frames: list[bytes], peers: Container[str] | None = None) -> None:
        try:
            header, records = wire.read_message(frames, self.ack_peers if peers is None else peers, self.acked)
        except wire.Malformed as exc:
            self.rejects.drop("input", str(exc))
            return
        if peers is not None and header.get("ack"):
            self.learn_sender(header["ack"])
        if records is None:
            if header["k"] == wire.FENCE:
                self.fenced_by.add(header["ack"])
            else:
                self.on_eos(header)
            return
        token = InToken(header) if header.get("ack") else None
        if token is not None and self.copy_of_seen(token, header):
            return
        if token is not None and self.ackpoints is not None:
            if self.ackpoints.applied(token):
                self.ack_token(token)    # in the restored state already: acknowledge, do not count it twice
                return
            if self.ackpoints.held(token):
                return                   # a resent copy: the held ack of the first one answers both
            self.ackpoints.processed(token)
        stamp = stamp_of(header)
        if self.on_origin is not None:
            self.on_origin(*stamp)
        new_ids = None
        if self.applied_ids is not None:     # per sending stage: a record may come by two paths, once by each
            self.applied_ids.at(f"{header['src']}|{stamp[0]}", stamp[1])
            records, new_ids = self.applied_ids.take_new(records)
        self.records_in += len(records)
        t0 = time.perf_counter()
        if token is None or self.journal is None:
            outcome = self.processor.run(records)
        else:                  # noted first: a record that kills the process is found (stages.poison)
            key = (token.ack, token.edge, token.ep, token.seq)
            if self.journal.is_suspect(key):
                outcome = self.processor.run_alone(records, lambda i: self.journal.culprit(key, i),  # type: ignore[union-attr]
                                                   lambda i: self.journal.begin(key, i))        # type: ignore[union-attr]
            else:
                self.journal.begin(key)
                outcome = self.processor.run(records)
            self.journal.end(key)
        self.observe_latency((time.perf_counter() - t0) * 1000.0)
        for record, error, tb in outcome.rejected:
            self.reject(record, error, tb)
        if new_ids is not None:
            self.applied_ids.commit_ids(new_ids)    # type: ignore[union-attr]
        if outcome.rejected:
            self.error_log.report(outcome)
        self.emit(outcome.records, token, stamp)
        if token is not None and token.outstanding == 0:
            self.queue_ack(token)

    def keep_sendable(self, records: list[Any] | Columns) -> list[Record]:
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
                self.reject_output(record, str(exc))
                continue
            good.append(record)
        return good

    def reject(self, record: Any, error: str, tb: str = "") -> None:
        """The one way a record goes to the dead-letter file: counted, and the stage's last error."""
        self.errors += 1
        self.dead += 1
        self.last_error = error
        self.dead_letters.write(record, error, tb)

    def reject_output(self, record: Any, reason: str) -> None:
        """An output record that cannot be sent: counted and dead-lettered."""
        self.reject(repr(record)[:2000], f"unsendable output: {reason}")

    def observe_latency(self, ms: float) -> None:
        self.batches += 1
        self.lat_ewma_ms = ms if self.batches == 1 else 0.9 * self.lat_ewma_ms + 0.1 * ms
        self.lat_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1

    def emit(self, records: list[Record] | Columns, token: InToken | None, stamp: tuple[str | None, int | None]) -> None:
        """Hand a transform's output for one input batch to the edges: one batch per edge, now.

        Input batches were already sized by the source's ``max_batch`` / ``linger_ms``; batching
        them again here would add a linger per hop (measured: p50 3.3 -> 8.3 ms at 1 k/s).
        """
        if not self.edges or not records:
            return
        groups = self.group(records)
        for edge in self.edges:
            recs = groups.get(edge.output)
            if recs:
                edge.cut(recs, token, stamp)

    def group(self, records: list[Record] | Columns) -> dict[str, Any]:
        """The batch split by output name (lists of records, or columns from a columnar stage)."""
        if not self.routes:
            return {"default": records}
        if isinstance(records, Columns):
            route_columns = getattr(self.stage, "route_columns", None)
            if route_columns is None:      # a per-record route() on a columnar stage's output
                records = records.to_records()
            else:
                return self.group_columns(records, route_columns)
        groups: dict[str, list[Record]] = {}
        route = self.stage.route
        for r in records:
            try:
                output = route(r)
            except Exception as exc:   # a broken route() costs its record, not the stage
                self.reject(r, f"route() failed: {type(exc).__name__}: {exc}", traceback.format_exc())
                continue
            groups.setdefault(output, []).append(r)
        return groups

    def group_columns(self, batch: Columns, route_columns: Callable[[Columns], Any]) -> dict[str, Columns]:
        """Split columns by ``route_columns(batch)``: an array (or list) of output names, one per row."""
        try:
            names = np.asarray(route_columns(batch))
            if names.shape != (len(batch),):
                raise ValueError(f"returned {names.shape[0] if names.ndim else 'no'} names for {len(batch)} rows")
        except Exception as exc:     # as a broken route(): the batch goes nowhere, its rows are dead-lettered
            error, tb = f"route_columns() failed: {type(exc).__name__}: {exc}", traceback.format_exc()
            for r in batch.to_records():
                self.reject(r, error, tb)
            return {}
        outputs = np.unique(names).tolist()
        if len(outputs) == 1:
            return {str(outputs[0]): batch}
        return {str(name): batch.take(names == name) for name in outputs}

    def on_eos(self, header: dict[str, Any]) -> None:
        self.acks_out.setdefault(header["ack"], {}).setdefault(("eos", 0), []).append(0)
        self.eos_headers.append(header)
        logger.info(f"end of stream from {header['src']}.{header['r']}")

    # -- source ------------------------------------------------------------------------------
    def pull_source(self, gen: Iterator[Any], now: float) -> tuple[bool, Iterator[Any] | None]:
        """Take up to one batch from the source; (produced anything, generator or None at end)."""
        if self.columnar_source:
            return self.pull_columns(gen, now)
        taken: list[Record] = []
        alive: Iterator[Record | None] | None = gen
        t0 = time.perf_counter()
        try:
            for _ in range(self.spec.max_batch):
                r = next(gen)
                if r is None:
                    break
                taken.append(r)
        except StopIteration:
            alive = None
        if taken and self.acked:
            taken = self.check_ids(taken)
        rejected = self.stage.take_rejected()
        for record, error, tb in rejected:   # lines a replay could not parse
            self.reject(record, error, tb)
        if taken:
            self.observe_latency((time.perf_counter() - t0) * 1000.0)
            self.records_in += len(taken)
            groups = self.group(taken)
            for edge in self.edges:
                recs = groups.get(edge.output)
                if recs:
                    if not edge.pending:
                        edge.pending_since = now
                    edge.pending.extend(recs)
            if any(len(e.pending) >= self.spec.max_batch for e in self.edges) or alive is None:
                self.cut_source_batches()
        elif alive is None or rejected:
            self.cut_source_batches()   # a mark with no batch: the position past them commits
        return bool(taken), alive

    def pull_columns(self, gen: Iterator[Columns | None], now: float) -> tuple[bool, Iterator[Columns | None] | None]:
        """``pull_source`` for a columnar source: ``Columns`` batches until ``max_batch`` rows are pending."""
        alive: Iterator[Columns | None] | None = gen
        t0 = time.perf_counter()
        taken: list[Columns] = []
        rows = 0
        try:
            while rows < self.spec.max_batch:
                batch = next(gen)
                if batch is None:
                    break
                if not isinstance(batch, Columns):
                    raise TypeError(f"generate_columns() yielded a {type(batch).__name__}, not Columns")
                if self.acked:
                    batch = self.check_id_column(batch)
                if len(batch):
                    taken.append(batch)
                    rows += len(batch)
        except StopIteration:
            alive = None
        if taken:
            self.observe_latency((time.perf_counter() - t0) * 1000.0)
            self.records_in += rows
            for part in taken:
                groups = self.group(part)
                for edge in self.edges:
                    cols = groups.get(edge.output)
                    if cols is not None and len(cols):
                        if not edge.pending_n:
                            edge.pending_since = now
                        if isinstance(cols, Columns):
                            edge.pending_cols.append(cols)
                        else:
                            edge.pending.extend(cols)
            if any(e.pending_n >= self.spec.max_batch for e in self.edges) or alive is None:
                self.cut_source_batches()
        elif alive is None:
            self.cut_source_batches()
        return bool(taken), alive

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
        """Raise ``id_top`` over the ids of ``taken``; handle ids that do not increase (module docstring).

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
                    self.reject(r, f"id {i} is below watermark {self.watermark} that this source replica already "
                                   "announced (ids must increase per source replica): a sink would take it for a duplicate")
                    continue
            elif type(i) is int:
                self.id_top = i + 1
            kept.append(r)
        return kept

    @property
    def origin(self) -> str:
        return f"{self.spec.name}.{self.spec.replica}/{self.generation}"

    def cut_source_batches(self) -> None:
        mark = self._mark_for_flush()
        stamp = (self.origin, self.watermark)
        for edge in self.edges:
            edge.flush_pending(mark, stamp)
        if mark is not None:
            self.advance_commit()   # never past a mark whose batches are still unacknowledged

    def _mark_for_flush(self) -> Mark | None:
        if not (self.source and self.acked):
            return None
        mark = Mark(self.stage.snapshot(), self.id_top)
        self.marks.append(mark)
        return mark

    def flush_lingering(self, now: float) -> None:
        """A source's partial batch leaves after ``linger_ms`` (only sources hold partial batches)."""
        linger = self.spec.linger_ms / 1000.0
        if any(e.pending_n and now - e.pending_since >= linger for e in self.edges):
            self.cut_source_batches()

    def send_eos(self) -> None:
        for edge in self.edges:
            header = {"src": self.spec.name, "r": self.spec.replica, "e": edge.name, "ep": self.epoch,
                      "seq": edge.seq, "ack": edge.ack_endpoint}
            for link in edge.links.values():      # each replica confirms its own; a repeat is harmless
                try:
                    link.sock.send_multipart(wire.eos_frames(header), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def eos_confirmed(self) -> bool:
        return all(len(e.eos_from) >= len(e.endpoints) for e in self.edges)

    # -- acks --------------------------------------------------------------------------------
    def copy_of_seen(self, token: InToken, header: dict[str, Any]) -> bool:
        """Whether this input batch is a resent copy of one this process has taken already
        (it is dropped: acknowledged again if the first copy's ack has left, else that ack will
        answer both). Without this a copy resent because an ack was late (not lost) was processed
        again, and its outputs could go to another replica of the next stage, which could not tell
        them from new ones: a sink with replicas wrote them twice.

        Known per sender (ack address, edge, epoch) as a set of seqs that the sender's ``lo``
        (every seq below it is acknowledged) closes: knowledge, no clock. A restarted process
        knows nothing of its predecessor's batches: what it is resent, it processes."""
        sender = (token.ack, token.edge, token.ep)
        seen = self.seen_batches.get(sender)
        if seen is None:
            seen = self.seen_batches[sender] = Taken()
            same = [k for k in self.seen_batches if k[:2] == sender[:2]]
            for old in same[:-KEEP_SENDER_EPOCHS]:    # a sender's earlier lives: it restarted since
                del self.seen_batches[old]
        lo = header.get("lo")
        if lo is not None:
            seen.close_below(lo)
            if self.ackpoints is not None:
                self.ackpoints.close_below(sender, lo)
        if token.seq in seen:
            self.copies_dropped += 1
            if (token.ack, token.edge, token.ep, token.seq) not in self.in_progress:
                self.ack_token(token)
            return True
        seen.add(token.seq)
        self.in_progress.add((token.ack, token.edge, token.ep, token.seq))
        return False

    def queue_ack(self, token: InToken) -> None:
        if self.ackpoints is not None:
            self.ackpoints.due(token)    # sent once a saved snapshot covers it: save_at_ack_points()
            return
        self.ack_token(token)

    def ack_token(self, token: InToken) -> None:
        self.in_progress.discard((token.ack, token.edge, token.ep, token.seq))
        self.acks_out.setdefault(token.ack, {}).setdefault((token.edge, token.ep), []).append(token.seq)
        self.acks_pending += 1

    def flush_acks(self) -> None:
        if not self.acks_out:
            return
        for endpoint, groups in self.acks_out.items():
            sock = self.ack_socks.get(endpoint)
            if sock is None:
                if endpoint not in self.ack_peers:
                    continue   # its sender is gone (scaled down) since the input arrived
                sock = self.ack_socks[endpoint] = self.ctx.socket(zmq.PUSH)
                if self.curve is not None and endpoint.startswith("tcp://"):
                    self.curve.client(sock)
                sock.setsockopt(zmq.LINGER, 200)
                sock.setsockopt(zmq.SNDHWM, 10_000)
                sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
                sock.connect(network.connect_from(endpoint, self.spec.bind_host))
            for (edge, ep), seqs in groups.items():
                if edge == "eos":
                    for header in self.eos_headers:
                        if header["ack"] == endpoint:
                            msg = wire.ack_message(wire.EOS_ACK, header["e"], header["ep"], [header["seq"]], self.spec.ident)
                            self._send_ack(sock, msg)
                    self.eos_headers = [h for h in self.eos_headers if h["ack"] != endpoint]
                    continue
                self._send_ack(sock, wire.ack_message(wire.ACK, edge, ep, seqs, self.spec.ident))
        self.acks_out.clear()
        self.acks_pending = 0

    @staticmethod
    def _send_ack(sock: zmq.Socket[bytes], msg: bytes) -> None:
        try:
            sock.send(msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the sender is gone or swamped: it will resend and we will ack again

    def read_acks(self) -> None:
        assert self.ackp is not None
        now = time.monotonic()
        while True:
            try:
                frames = self.ackp.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = wire.read_ack(wire.single(frames))
                edge = self.edges_by_name.get(msg["e"])
                if edge is None:
                    raise wire.Malformed(f"ack for an unknown edge {msg['e'][:80]!r}")
            except wire.Malformed as exc:
                self.rejects.drop("ack", str(exc))
                continue
            if msg["ep"] != self.epoch:
                continue  # meant for an earlier incarnation of this replica
            if msg["k"] == wire.EOS_ACK:
                edge.eos_from.add(msg["from"])
                continue
            for seq in msg["s"]:
                ob = edge.acked(seq, now)
                if ob is not None and ob.parent is not None:
                    self.resolve(ob.parent)
        if self.marks:
            self.advance_commit()

    def resolve(self, parent: InToken | Mark) -> None:
        parent.outstanding -= 1
        if parent.outstanding == 0 and isinstance(parent, InToken):
            self.queue_ack(parent)

    def advance_commit(self) -> None:
        while self.marks and self.marks[0].outstanding <= 0:
            mark = self.marks.popleft()
            self.committed = mark.state
            if mark.top is not None:
                self.committed_top = mark.top
            if self.on_commit is not None:
                self.on_commit(mark.state)

    def save_at_ack_points(self, now: float, force: bool = False) -> None:
        """Save the snapshot that covers exactly the batches whose acks are due, then release those acks."""
        assert self.ackpoints is not None
        self.ackpoints.cut(now, self.snapshot_with_ids, force)
        ready = self.ackpoints.ready()
        if ready is None:
            return
        state, tokens = ready
        t0 = time.monotonic()
        save_state(self.state_path, {"state": state["state"], "ids": state["ids"], "completed": False,
                                     "acked": self.ackpoints.keys()})
        self.ackpoints.min_interval = max(ACK_SAVE_MIN_S, (time.monotonic() - t0) / ACK_SAVE_SHARE)
        self.committed = state["state"]
        for token in tokens:
            self.ack_token(token)

    def snapshot_with_ids(self) -> dict[str, Any]:
        """A stateful transform's cut: its snapshot and the ids it has applied, taken together."""
        assert self.applied_ids is not None
        return {"state": self.stage.snapshot(), "ids": self.applied_ids.state()}

    def save_state(self) -> None:
        if self.ackpoints is not None:    # on a clean stop: whatever is acknowledged by now, and its acks
            self.save_at_ack_points(time.monotonic(), force=True)
            self.flush_acks()
            return
        state = self.committed if self.source and self.acked else self.stage.snapshot()
        if state is None:
            return
        saved: dict[str, Any] = {"state": state, "completed": self.finished and self.eos_confirmed(),
                                 "generation": self.generation, "replicas": self.spec.replicas}
        if self.source:
            top = self.committed_top if self.ordered and self.committed_top is not None else self.watermark
            saved["watermark"] = [self.generation, top, self.ordered]
        save_state(self.state_path, saved)
        if self.source:
            self.watermark = top    # only now: it never runs ahead of the position a restart resumes at
            self.last_saved = state
            if self.on_saved is not None:
                self.on_saved(state)

    def restore_origin(self, saved: dict[str, Any]) -> None:
        """A source's generation and the watermark committed with its position (``save_state``).

        A watermark saved under another generation is dropped: a repartitioned id space starts afresh.
        """
        self.generation = int(saved.get("generation") or 0)
        gen, w, ordered = (list(saved.get("watermark") or []) + [None, None, True])[:3]
        if gen == self.generation and type(w) is int:
            self.watermark = self.id_top = w
            self.ordered = bool(ordered)

    @property
    def state_path(self) -> Path:
        return Path(self.spec.run_dir) / "state" / f"{self.spec.ident}.msgpack"

    # -- control -----------------------------------------------------------------------------
    def read_control(self) -> None:
        assert self.ctl is not None
        while True:
            try:
                frames = self.ctl.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = wire.read_supervisor_message(wire.single(frames))
            except wire.Malformed as exc:
                self.rejects.drop("control", str(exc))
                continue
            op = msg["op"]
            if op == "stop":
                self.stopping = True
                if "senders" in msg:
                    self.drain_from = set(msg["senders"])
            elif op == "fence":
                edge = self.edges_by_name.get(msg["edge"])
                if edge is not None:
                    edge.fence(msg["endpoint"], msg["on"])
            elif op == "connect":
                edge = self.edges_by_name.get(msg.get("edge", ""))
                if edge is not None:
                    self.read_acks()      # acks a replica sent before it left, before its batches are re-dealt
                    edge.connect(list(msg.get("endpoints", [])))
            elif op == "peers":
                self.set_ack_peers(msg.get("acks", []))

    def learn_sender(self, endpoint: str) -> None:
        """A sender checked against its connection (run-stage): acks may go to it. The newest
        ``MAX_SENDERS`` are kept; the ack socket of one forgotten is closed."""
        assert isinstance(self.ack_peers, dict)
        self.ack_peers.pop(endpoint, None)
        self.ack_peers[endpoint] = None
        while len(self.ack_peers) > MAX_SENDERS:
            old = next(iter(self.ack_peers))
            del self.ack_peers[old]
            sock = self.ack_socks.pop(old, None)
            if sock is not None:
                sock.close(linger=0)

    def set_ack_peers(self, endpoints: list[str]) -> None:
        """The replicas feeding this one changed (a scale upstream): acks go only to these, and
        the ack sockets of senders that are gone are closed."""
        self.ack_peers = frozenset(endpoints)
        for endpoint in [e for e in self.ack_socks if e not in self.ack_peers]:
            self.ack_socks.pop(endpoint).close(linger=0)
        self.eos_headers = [h for h in self.eos_headers if h["ack"] in self.ack_peers]

    def unreachable(self) -> list[str]:
        """The edges that have had no connected receiver for ``heartbeat_timeout``."""
        now = time.monotonic()
        for edge in self.edges:
            edge.reach_update(now)
        return [e.name for e in self.edges if e.unreachable(now, self.spec.heartbeat_timeout)]

    def heartbeat(self) -> None:
        self.rejects.flush()
        self.tell("hb", records_in=self.records_in, records_out=self.records_out, errors=self.errors,
                  unreachable=self.unreachable(), insecure=self.insecure,
                  denied=self.curve.log.denied if self.curve is not None else 0,
                  dead_letters=self.dead, dead_letters_dropped=self.dead_letters.dropped, resent=self.resent,
                  copies_dropped=self.copies_dropped,
                  malformed=self.rejects.total, blocked=self.blocked,
                  queue=sum(e.load for e in self.edges), edges_out={e.name: e.sent for e in self.edges}, latency_ms=round(self.lat_ewma_ms, 3),
                  latency_buckets=self.lat_buckets, batches=self.batches, stats=self.stage_stats(),
                  last_error=self.last_error, finished=self.finished)

    def stage_stats(self) -> dict[str, Any]:
        """The stage's ``stats()`` as msgpack can carry it; a problem is reported once, and the
        heartbeat goes on (a heartbeat that cannot be sent gets the stage killed as hung)."""
        try:
            stats = self.stage.stats()
            if not isinstance(stats, dict):
                raise TypeError(f"returned a {type(stats).__name__}, not a dict")
        except Exception as exc:
            return self.stats_problem(f"stats() failed: {type(exc).__name__}: {exc}", {"stats_error": str(exc)[:200]})
        try:
            size = len(wire.packb(stats))
        except Exception as exc:
            stats = {str(k): _packable(v) for k, v in stats.items()}
            size = len(wire.packb(stats))
            self.stats_problem(f"stats() returned what msgpack cannot carry ({exc}); its values are sent as text", stats)
        if size > wire.STATS_MAX_BYTES:
            return self.stats_problem(f"stats() is {size} bytes packed, over {wire.STATS_MAX_BYTES}: not sent", {})
        if self.out_of_order:
            stats = {**stats, "ids_out_of_order": self.out_of_order}
        return stats

    def stats_problem(self, problem: str, stats: dict[str, Any]) -> dict[str, Any]:
        if not self.stats_reported:
            self.stats_reported = True
            self.last_error = problem
            logger.warning(problem)
        return stats

    def close(self) -> None:
        self.processor.close()
        if self.journal is not None:
            self.journal.close()
        self.dead_letters.close()
        if self.resolver is not None:
            self.resolver.stop()
        linger = 0 if self.acked else 1000
        for edge in self.edges:
            edge.close(linger)
        for sock in self.ack_socks.values():
            sock.close(linger=200)
        for maybe in (self.inp, self.ackp):
            if maybe is not None:
                maybe.close(linger=0)
        if self.ctl is not None:
            self.ctl.close(linger=500)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()


def _packable(value: Any) -> Any:
    """``value`` if msgpack can carry it, else its repr."""
    try:
        wire.packb(value)
        return value
    except Exception:
        try:
            return repr(value)[:200]
        except Exception:
            return f"<unprintable {type(value).__name__}>"


# -- process bootstrap ---------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def tune_gc() -> None:
    """Keep the garbage collector off the per-record path: what exists once the stage is set up
    (imported modules, a model, the fork server's preloads) is frozen out of every collection, and
    young collections run every ``GC_GEN0`` allocations. Records that only pass through are freed
    by reference counting; the collector still runs, for cycles a stage's own code makes."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)


def die_with_parent(supervisor_pid: int, adopt_wait: float = ADOPT_WAIT_S) -> None:
    """Make the kernel SIGKILL this process when the supervisor dies, even by SIGKILL.

    A fork-server stage is a grandchild that the supervisor (a child subreaper) adopts when the
    middle process exits, a few ms after the fork: wait for that first. If the parent is still
    not the supervisor (no subreaper support), a watcher thread polls the supervisor's pid.
    """
    if supervisor_pid <= 0:
        return
    deadline = time.monotonic() + adopt_wait
    while os.getppid() != supervisor_pid and time.monotonic() < deadline:
        time.sleep(0.0002)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == supervisor_pid:
        return
    if not pid_alive(supervisor_pid):
        os._exit(EXIT_CRASH)

    def watch() -> None:
        while pid_alive(supervisor_pid):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether a process exists (a zombie counts: use psutil where that matters)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setup_logging(spec: StageSpec, stdout: bool = False) -> None:
    """JSON lines into ``logs/<stage>.<r>.jsonl`` (rotated), or to stdout (run-stage: a container's log)."""
    logger.remove()
    logger.configure(extra={"stage": spec.name, "replica": spec.replica})
    if stdout:
        logger.add(sys.stdout, serialize=True, level=spec.log_level, enqueue=False, backtrace=False)
        return
    logs = Path(spec.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logger.add(logs / f"{spec.ident}.jsonl", serialize=True, level=spec.log_level,
               rotation=spec.log_rotation, retention=spec.log_retention, enqueue=False, backtrace=False)


class Host:
    """What runs a replica without a supervisor (``streampipe run-stage``) hooks into: it hears
    everything the replica would tell a supervisor, and keeps a finished source up until stopped
    (a container that exits after its stream would be restarted for ever)."""

    def on_tell(self, op: str, fields: dict[str, Any]) -> None:
        pass

    def idle(self, stop: threading.Event) -> None:
        logger.info("stream completed; idle until stopped")
        stop.wait()


def restore_point(spec: StageSpec) -> dict[str, Any] | None:
    """A source replica's saved position, refused if it belongs to another replica count.

    The supervisor repartitions the positions before it starts a source whose ``replicas``
    changed; a replica started another way must not guess (its share of the ids depends on it).
    """
    state_dir = Path(spec.run_dir) / "state"
    layout = read_layout(state_dir, spec.name)
    if layout is not None and layout.differs(spec.replicas) and not layout.completed:
        raise RuntimeError(f"the saved positions of {spec.name} are for {layout.replicas} replicas, not {spec.replicas}: "
                           f"start it with `streampipe up`, which repartitions them, or set replicas: {layout.replicas}")
    return load_replica_state(state_dir, spec.name, spec.replica)


def main(spec: StageSpec, host: Host | None = None) -> int:
    """Run one stage replica; returns the process exit status. ``host``: run without a supervisor."""
    stop_requested = threading.Event()
    rt: StageRuntime | None = None

    def on_term(signum: int, frame: Any) -> None:
        stop_requested.set()
        if rt is not None:
            rt.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    faulthandler.enable()                                  # a crash in C code: its stack to .stderr
    faulthandler.register(DUMP_STACK_SIGNAL, all_threads=True)   # the supervisor's word before it kills a hung replica
    # Ctrl-C is the supervisor's to handle; a replica in the foreground drains on it
    signal.signal(signal.SIGINT, on_term if host is not None else signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getppid() == spec.supervisor_pid:      # a cold start: arm the death signal at once
        die_with_parent(spec.supervisor_pid)
    if not fence.claim(spec.run_dir, spec.ident):   # another process is this replica: bind nothing, write nothing
        return fence.FENCED_EXIT
    setup_logging(spec, stdout=host is not None)
    if host is None:
        watch_stdio(Path(spec.run_dir) / "logs" / f"{spec.ident}.stderr", spec.file_max_bytes, spec.log_retention)
    try:
        stage = load_stage(spec.type, spec.options, Path(spec.config_dir))
        stage.context = StageContext(name=spec.name, replica=spec.replica, replicas=spec.replicas,
                                     run_dir=Path(spec.run_dir), config_dir=Path(spec.config_dir),
                                     outputs=tuple(sorted({e.output for e in spec.edges})), max_batch=spec.max_batch)
        rt = StageRuntime(spec, stage)
        if host is not None:
            rt.on_tell = host.on_tell
        rt.tell("hello")
        saved = restore_point(spec) if rt.source else load_replica_state(rt.state_path.parent, spec.name, spec.replica)
        if saved is not None:
            if saved.get("completed") and rt.source:
                logger.info("stream already completed in an earlier run; nothing to do")
                rt.tell("completed")
                if host is not None:
                    host.idle(stop_requested)
                rt.close()
                return EXIT_OK
            stage.restore(saved.get("state") or {})
            if rt.source:
                rt.committed = saved.get("state")
                rt.restore_origin(saved)
            elif rt.ackpoints is not None:
                rt.ackpoints.restore(saved.get("acked") or [])
                rt.applied_ids = Delivered(seen=SeenByOrigin.from_state(saved.get("ids") or {}), repeats=True)
        rt.bind()
        stage.setup()
        tune_gc()
    except Exception as exc:
        tb = traceback.format_exc()
        logger.opt(exception=True).error(f"stage failed to start: {type(exc).__name__}: {exc}")
        print(tb, file=sys.stderr, flush=True)
        if rt is None and spec.control:   # failed before the runtime existed: tell the supervisor on a socket of our own
            ctl: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
            ctl.setsockopt(zmq.IDENTITY, spec.ident.encode())
            ctl.connect(spec.control)
            ctl.send(wire.control("error", pid=os.getpid(), error=f"{type(exc).__name__}: {exc}"[-wire.TEXT_MAX_CHARS:],
                                  traceback=tb[-wire.TEXT_MAX_CHARS:]))
            ctl.close(linger=500)
        elif rt is not None:
            rt.tell("error", error=f"{type(exc).__name__}: {exc}", traceback=tb)
            rt.close()
        return EXIT_START_FAILED
    if stop_requested.is_set():
        rt.stopping = True
    rt.tell("ready")
    # a forked stage is adopted by the supervisor once the fork server's middle process has
    # exited (set-up overlapped that). READY may go first: if the supervisor died meanwhile,
    # adoption never comes and die_with_parent exits, so nothing is orphaned.
    die_with_parent(spec.supervisor_pid)
    logger.info(f"ready: pid {os.getpid()}, input {spec.input}, outputs {[e.name for e in spec.edges]}")
    code = EXIT_OK
    profile_dir = os.environ.get("STREAMPIPE_PROFILE")   # a folder: each stage writes <stage>.<r>.prof there
    profiler = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        rt.run()
        if rt.finished:
            logger.info(f"stream completed: {rt.records_out} records sent")
            if host is not None and not stop_requested.is_set():
                rt.save_state()
                host.idle(stop_requested)
    except Exception as exc:
        tb = traceback.format_exc()
        logger.opt(exception=True).error(f"stage crashed: {type(exc).__name__}: {exc}")
        print(tb, file=sys.stderr, flush=True)
        rt.tell("error", error=f"{type(exc).__name__}: {exc}", traceback=tb)
        code = EXIT_CRASH
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir or ".") / f"{spec.ident}.prof"))
        try:
            if code == EXIT_OK:
                stage.teardown()
                rt.save_state()
        except Exception as exc:
            logger.opt(exception=True).error(f"teardown failed: {exc}")
            code = EXIT_CRASH
        if rt.finished and rt.eos_confirmed():
            rt.tell("completed", records_out=rt.records_out)
        rt.heartbeat()
        rt.tell("bye", code=code)
        rt.close()
    return code
