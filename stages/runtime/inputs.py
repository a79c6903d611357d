"""The inputs: a transform or sink replica's PULL socket, what it takes from it and what it
drops (malformed messages, copies of batches taken already, records a stateful transform has
applied), the stage's ``process`` on each batch (isolating a record that kills the process), and
the drain on a graceful stop (input is taken until every sender's FENCE is in)."""

from __future__ import annotations

import time
from collections.abc import Container
from typing import Any

import zmq
from loguru import logger

from streampipe.stages import network, wire
from streampipe.stages.api import Record
from streampipe.stages.columns import Columns
from streampipe.stages.delivery import Delivered
from streampipe.stages.poison import Journal
from streampipe.stages.process import Processor
from streampipe.stages.runtime.acksocks import AckSockets
from streampipe.stages.runtime.counters import Counters
from streampipe.stages.runtime.ending import StreamEnd
from streampipe.stages.runtime.ledger import AckLedger
from streampipe.stages.runtime.outputs import Edge
from streampipe.stages.runtime.router import Router
from streampipe.stages.runtime.tokens import REPLAY_SENDER, InToken, stamp_of
from streampipe.stages.runtime.tunables import ACK_FLUSH_EVERY, MAX_MSGS_PER_TICK
from streampipe.stages.seen import SeenByOrigin
from streampipe.stages.spec import StageSpec


class Inputs:
    """What one replica takes in; ``edges`` is the runtime's list (read: a full edge stops the taking)."""

    def __init__(self, spec: StageSpec, acked: bool, stateful: bool, counters: Counters, ledger: AckLedger,
                 acks: AckSockets, rejects: wire.Rejects, processor: Processor, journal: Journal | None,
                 router: Router, edges: list[Edge], on_origin: Any) -> None:
        self.spec, self.acked, self.counters, self.ledger, self.acks = spec, acked, counters, ledger, acks
        self.rejects, self.processor, self.journal, self.router, self.edges = rejects, processor, journal, router, edges
        self.on_origin = on_origin
        # a stage that makes its output ids itself (``own_ids``: a window's, from its key and start)
        # sends them under an origin of its own and no watermark: a result made again after a crash,
        # whichever input batch closed it this time, is the same (origin, id) to a deduplicating sink
        self.own_stamp = (f"{spec.name}.ids/0", None) if getattr(router.stage, "own_ids", False) else None
        # a stateful transform keeps the ids it has applied, per origin, saved with its snapshot:
        # a record sent again by a restarted upstream stage (in a batch of another sender life) is not applied twice
        self.applied_ids = Delivered(repeats=True) if stateful else None
        self.standalone = not spec.control        # run-stage: each connection's peer address checks its sender
        self.inp: zmq.Socket[bytes] | None = None
        # a graceful stop (the supervisor's ``stop``): the senders whose FENCE (nothing more
        # follows) is awaited before the input is complete; None: stop taking input at once
        self.drain_from: set[str] | None = None
        self.fenced_by: set[str] = set()
        # run-stage (no supervisor to tell the senders): each sender's ack endpoint -> the (edge,
        # epoch) it last sent on; a SIGTERM asks each to fence this replica itself (``leave``)
        self.senders: dict[str, tuple[str, int]] = {}
        self.leaving = False
        self.end: StreamEnd | None = None         # under a supervisor: whose end of stream is in (the loop sets it)

    def restore_applied(self, ids: dict[str, Any]) -> None:
        self.applied_ids = Delivered(seen=SeenByOrigin.from_state(ids), repeats=True)

    def bind(self, ctx: zmq.Context[zmq.Socket[bytes]], secure: Any) -> None:
        assert self.spec.input is not None
        self.inp = ctx.socket(zmq.PULL)
        self.inp.setsockopt(zmq.RCVHWM, self.spec.hwm)
        self.inp.setsockopt(zmq.LINGER, 0)
        self.inp.setsockopt(zmq.MAXMSGSIZE, self.spec.max_message_bytes)   # libzmq drops bigger frames unallocated
        secure(self.inp, self.spec.input)
        self.inp.bind(self.spec.input)

    def full(self) -> bool:
        return any(e.full() for e in self.edges)

    # -- the drain ---------------------------------------------------------------------------
    def drain(self, senders: list[str] | None) -> None:
        """The supervisor's ``stop``: take input until each of ``senders`` has fenced this replica."""
        if senders is not None:
            self.drain_from = set(senders)

    def taking(self, stopping: bool) -> bool:
        """Whether input batches are still taken: until the stop, and while stopping until every
        sender named by the supervisor has sent its FENCE (nothing more follows it). Knowledge,
        not quiet: a steady stream is never idle, and every batch taken is finished and
        acknowledged before the replica exits, so upstream resends nothing it had."""
        if self.inp is None:
            return False
        if not stopping:
            return True
        if self.drain_from is None:
            return False
        if not self.drain_from <= self.fenced_by:
            return True
        if self.leaving and not self.full():
            # run-stage: a batch already queued here may come from a sender not heard from yet
            # (it sent nothing before the SIGTERM): read what is queued once more; a new sender
            # is sent a LEAVE (``handle``) and its FENCE awaited too
            known = len(self.drain_from)
            self.read(time.monotonic())
            return len(self.drain_from) > known
        return False

    def unfenced(self) -> list[str]:
        return sorted((self.drain_from or set()) - self.fenced_by)

    def leave(self) -> None:
        """A SIGTERM without a supervisor: ask every sender heard from to send this replica nothing
        more and a FENCE behind its last batch; the drain ends once every FENCE is in (as the
        supervisor's drain does), so upstream resends nothing to an address that may not come back."""
        self.leaving, self.drain_from = True, set()
        for endpoint in list(self.senders):
            self.leave_to(endpoint)

    def leave_to(self, endpoint: str) -> None:
        assert self.drain_from is not None and self.spec.input is not None
        edge, epoch = self.senders[endpoint]
        sock = self.acks.sock(endpoint)
        if sock is None:
            return            # a sender forgotten (MAX_SENDERS): nothing to wait for
        host = network.advertised_host(self.spec.advertise_host, self.spec.bind_host, [endpoint])
        at = f"tcp://{host}:{self.spec.input.rsplit(':', 1)[-1]}"
        try:
            sock.send(wire.leave_message(edge, epoch, self.spec.ident, at), flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning(f"cannot tell {endpoint} that this replica stops: its FENCE is awaited until stop_grace")
        self.drain_from.add(endpoint)

    # -- taking batches ----------------------------------------------------------------------
    def read(self, now: float) -> None:
        """Take what is queued on the input (``MAX_MSGS_PER_TICK`` at most), until an edge is full."""
        assert self.inp is not None
        for _ in range(MAX_MSGS_PER_TICK):
            if self.full():
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
            if self.ledger.acks_pending >= ACK_FLUSH_EVERY:
                self.ledger.flush(self.acks.sock, self.spec.ident)   # upstream's window refills while we work through ours

    @staticmethod
    def peer_address(frame: zmq.Frame) -> str | None:
        try:
            return str(frame.get("Peer-Address"))
        except zmq.ZMQError:
            return None     # not a tcp connection

    def handle(self, frames: list[bytes], peers: Container[str] | None = None) -> None:
        """One message off the input: checked, then a batch processed, a FENCE or an end of stream noted."""
        try:
            header, records = wire.read_message(frames, self.acks.peers if peers is None else peers, self.acked)
        except wire.Malformed as exc:
            self.rejects.drop("input", str(exc))
            return
        if peers is not None and header.get("ack"):
            self.acks.learn(header["ack"])
            self.senders[header["ack"]] = (header["e"], header["ep"])
            if self.leaving and header["ack"] not in (self.drain_from or ()):
                self.leave_to(header["ack"])    # a sender first heard from while draining
        if records is None:
            if header["k"] == wire.FENCE:
                self.fenced_by.add(header["ack"])
            elif self.end is None:
                self.ledger.on_eos(header)          # run-stage: confirmed at once, not passed on
            elif (known := self.end.received(header)) is not None:
                self.ledger.on_eos(known, note=False)
            return
        token = InToken(header) if header.get("ack") else None
        if token is not None and (self.ledger.copy_of_seen(token, header) or not self.ledger.admit(token)):
            return
        self.process(records, token, header)

    def process(self, records: list[Record] | Columns, token: InToken | None, header: dict[str, Any]) -> None:
        """The stage's ``process`` on one batch; its output to the edges, its ack queued once nothing is owed for it."""
        stamp = stamp_of(header)
        if self.on_origin is not None:
            self.on_origin(*stamp)
        new_ids = None
        if self.applied_ids is not None:     # per sending stage: a record may come by two paths, once by each
            self.applied_ids.at(f"{header['src']}|{stamp[0]}", stamp[1])
            records, new_ids = self.applied_ids.take_new(records)
        self.counters.took(len(records))
        context = getattr(self.router.stage, "context", None)    # set by bootstrap; a bare object in a test has none
        if context is not None:
            context.input = input_of(header)
        t0 = time.perf_counter()
        if token is None or self.journal is None:
            outcome = self.processor.run(records)
        else:                  # noted first: a record that kills the process is found (stages.poison)
            journal = self.journal
            key = (token.ack, token.edge, token.ep, token.seq)
            if journal.is_suspect(key):
                outcome = self.processor.run_alone(records, lambda i: journal.culprit(key, i), lambda i: journal.begin(key, i))
            else:
                journal.begin(key)
                outcome = self.processor.run(records)
            journal.end(key)
        self.counters.observe_latency((time.perf_counter() - t0) * 1000.0)
        source = f"{header['src']}.{header['r']}" if "src" in header and "r" in header else None
        for record, error, tb in outcome.rejected:
            self.counters.reject(record, error, tb, source, header.get("dl"))
        if new_ids is not None:
            self.applied_ids.commit_ids(new_ids)    # type: ignore[union-attr]
        if outcome.rejected:
            self.counters.error_log.report(outcome)
        self.router.emit(outcome.records, token, self.own_stamp or stamp)
        if token is not None and token.outstanding == 0:
            self.ledger.queue_ack(token)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.inp is not None:
            self.inp.close(linger=0)


def input_of(header: dict[str, Any]) -> str | None:
    """The input a batch came by, as ``inputs:`` names it (``StageContext.input``): the sending
    stage, and ``.<output>`` when that is a named output (the edge is ``<output>><dest>``); a
    replayed dead letter, the stage that had sent it.

    >>> input_of({"src": "clicks", "e": "default>join"}), input_of({"src": "normalizer", "e": "holdout>join"})
    ('clicks', 'normalizer.holdout')
    """
    src, output = header.get("src"), str(header.get("e", "")).partition(">")[0]
    if not isinstance(src, str):
        return None
    return src if output in ("default", REPLAY_SENDER) else f"{src}.{output}"
