"""The loop of one stage replica: :class:`StageRuntime` owns the poller and the sockets (see the
package docstring for the protocol)."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from loguru import logger

from streampipe.stages import network, wire
from streampipe.stages.ackpoints import AckPoints
from streampipe.stages.api import Record, Source, Stage, columnar_source, is_source
from streampipe.stages.columns import Columns
from streampipe.stages.delivery import Delivered
from streampipe.stages.poison import Journal
from streampipe.stages.process import Processor
from streampipe.stages.runtime.counters import Counters, _packable
from streampipe.stages.runtime.cursor import SourceCursor
from streampipe.stages.runtime.ledger import AckLedger
from streampipe.stages.runtime.outputs import Edge, Wiring
from streampipe.stages.runtime.tokens import InToken, stamp_of
from streampipe.stages.runtime.tunables import (
    ACK_FLUSH_EVERY,
    ACK_SAVE_MIN_S,
    EOS_RESEND_S,
    EOS_WAIT_S,
    EXIT_OK,
    HEARTBEAT_INTERVAL_S,
    IDLE_WAIT_MS,
    MAX_MSGS_PER_TICK,
    MAX_SENDERS,
    PROMPT_SAVE_S,
    RECONNECT_IVL_MS,
    RESEND_CHECK_S,
    SOURCE_BATCHES_PER_TICK,
    STATE_SAVE_S,
)
from streampipe.stages.spec import StageSpec
from streampipe.stages.state import DeadLetters, save_state


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
        # a SIGTERM's word (the handler runs between any two bytecodes): the loop takes it at the
        # top of an iteration only, so no step of one iteration sees the stop and another not
        self.stop_asked = False
        # a graceful stop (the supervisor's ``stop``): the senders whose FENCE (nothing more
        # follows) is awaited before the input is complete; None: stop taking input at once
        self.drain_from: set[str] | None = None
        self.fenced_by: set[str] = set()
        # run-stage (no supervisor to tell the senders): each sender's ack endpoint -> the (edge,
        # epoch) it last sent on; a SIGTERM asks each to fence this replica itself (``leave``)
        self.senders: dict[str, tuple[str, int]] = {}
        self.leaving = False
        self.waiting_for = ""                     # what a stage said it waits for (keepalive), this beat
        self.kept_alive_at = 0.0
        self.finished = False                     # a source's stream ended
        self.blocked = False
        self.on_origin = getattr(stage, "on_origin", None)
        committed = getattr(stage, "committed", None)      # a source hears which position is done end to end
        on_commit = committed if self.source and getattr(committed, "__func__", None) is not Source.committed else None
        saved = getattr(stage, "saved", None)              # ... and which position is on disk (it then saves promptly)
        self.on_saved = saved if self.source and getattr(saved, "__func__", None) is not Source.saved else None
        self.last_saved: dict[str, Any] | None = None     # the committed state written last
        # a transform with state saves its snapshot where its acks advance (see stages.ackpoints)
        stateful = not self.source and self.acked and getattr(stage.snapshot, "__func__", None) is not Stage.snapshot
        ackpoints = AckPoints(ACK_SAVE_MIN_S) if stateful else None
        # ... and the ids it has applied, per origin, saved with it: a record sent again by a
        # restarted upstream stage (in a batch of another sender life) is not applied twice
        self.applied_ids = Delivered(repeats=True) if stateful else None
        self.ack_socks: dict[str, zmq.Socket[bytes]] = {}
        self.counters = Counters(DeadLetters(Path(spec.run_dir) / "deadletter" / f"{spec.name}.jsonl", spec.ident,
                                        spec.file_max_bytes, spec.log_retention))
        self.cursor = SourceCursor(spec.name, spec.replica, self.counters, on_commit)
        self.ledger = AckLedger(self.counters, ackpoints)
        # the input batch in hand, noted so that a record that kills the process is isolated
        self.journal = (Journal(self.state_path.with_suffix(".inflight"), spec.last_exit)
                        if self.acked and spec.input and spec.control else None)
        self.processor = Processor(stage)
        # route() is called per record only when a named output is actually consumed
        self.routes = getattr(stage.route, "__func__", None) is not Stage.route and any(e.output != "default" for e in spec.edges)
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

    # what tests read of the counters (and set: last_error); the parts use self.counters
    @property
    def records_in(self) -> int:
        return self.counters.records_in

    @property
    def dead(self) -> int:
        return self.counters.dead

    @property
    def last_error(self) -> str:
        return self.counters.last_error

    @last_error.setter
    def last_error(self, error: str) -> None:
        self.counters.note_error(error)

    # -- set-up ------------------------------------------------------------------------------
    def bind(self) -> None:
        self.ackp = self.ctx.socket(zmq.PULL)
        self.ackp.setsockopt(zmq.LINGER, 0)
        self.ackp.setsockopt(zmq.MAXMSGSIZE, wire.CONTROL_MAX_BYTES)
        self.secure(self.ackp, self.spec.ack)
        self.ackp.bind(self.spec.ack)
        bound_ack = self.ackp.get_string(zmq.LAST_ENDPOINT)     # run-stage may bind port 0
        targets = {e.name: (e.addresses, e.port) for e in self.spec.edges if e.addresses}
        wiring = Wiring(self.spec, self.epoch, self.acked, self.counters, self.ctx, self.curve)
        self.edges = [Edge(wiring, e, immediate=e.name in targets) for e in self.spec.edges]
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
            if self.stop_asked:
                self.stopping = True
            if self.stopping and deadline == float("inf"):
                deadline = now + max(0.5, self.spec.stop_grace - 0.75)
                gen = None
                if self.drain_from is None and not self.spec.control and self.inp is not None and self.acked:
                    self.leave()
            if self.resolver is not None and self.resolver.version != self.resolved_version:
                self.apply_resolved()
            for edge in self.edges:
                if edge.queued:
                    edge.send(now)
            self.blocked = any(e.full() for e in self.edges)
            if self.ledger.ackpoints is not None:
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
            if self.source and self.cursor.committed is not None and (
                    now >= next_save or (self.on_saved is not None and self.cursor.committed is not self.last_saved
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
        if self.drain_from is None:
            return False
        if not self.drain_from <= self.fenced_by:
            return True
        if self.leaving and not self.blocked:
            # run-stage: a batch already queued here may come from a sender not heard from yet
            # (it sent nothing before the SIGTERM): read what is queued once more; a new sender
            # is sent a LEAVE (``handle``) and its FENCE awaited too
            known = len(self.drain_from)
            self.read_input(time.monotonic())
            return len(self.drain_from) > known
        return False

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
            if self.ledger.acks_pending >= ACK_FLUSH_EVERY:
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
            self.senders[header["ack"]] = (header["e"], header["ep"])
            if self.leaving and header["ack"] not in (self.drain_from or ()):
                self.leave_to(header["ack"])    # a sender first heard from while draining
        if records is None:
            if header["k"] == wire.FENCE:
                self.fenced_by.add(header["ack"])
            else:
                self.ledger.on_eos(header)
            return
        token = InToken(header) if header.get("ack") else None
        if token is not None and (self.ledger.copy_of_seen(token, header) or not self.ledger.admit(token)):
            return
        stamp = stamp_of(header)
        if self.on_origin is not None:
            self.on_origin(*stamp)
        new_ids = None
        if self.applied_ids is not None:     # per sending stage: a record may come by two paths, once by each
            self.applied_ids.at(f"{header['src']}|{stamp[0]}", stamp[1])
            records, new_ids = self.applied_ids.take_new(records)
        self.counters.took(len(records))
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
        self.counters.observe_latency((time.perf_counter() - t0) * 1000.0)
        for record, error, tb in outcome.rejected:
            self.counters.reject(record, error, tb)
        if new_ids is not None:
            self.applied_ids.commit_ids(new_ids)    # type: ignore[union-attr]
        if outcome.rejected:
            self.counters.error_log.report(outcome)
        self.emit(outcome.records, token, stamp)
        if token is not None and token.outstanding == 0:
            self.ledger.queue_ack(token)

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
                self.counters.reject(r, f"route() failed: {type(exc).__name__}: {exc}", traceback.format_exc())
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
                self.counters.reject(r, error, tb)
            return {}
        outputs = np.unique(names).tolist()
        if len(outputs) == 1:
            return {str(outputs[0]): batch}
        return {str(name): batch.take(names == name) for name in outputs}

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
            taken = self.cursor.check_ids(taken)
        rejected = self.stage.take_rejected()
        for record, error, tb in rejected:   # lines a replay could not parse
            self.counters.reject(record, error, tb)
        if taken:
            self.counters.observe_latency((time.perf_counter() - t0) * 1000.0)
            self.counters.took(len(taken))
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
                    batch = self.cursor.check_id_column(batch)
                if len(batch):
                    taken.append(batch)
                    rows += len(batch)
        except StopIteration:
            alive = None
        if taken:
            self.counters.observe_latency((time.perf_counter() - t0) * 1000.0)
            self.counters.took(rows)
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

    def cut_source_batches(self) -> None:
        mark = self.cursor.mark(self.stage.snapshot()) if self.source and self.acked else None
        stamp = self.cursor.stamp
        for edge in self.edges:
            edge.flush_pending(mark, stamp)
        if mark is not None:
            self.cursor.advance()   # never past a mark whose batches are still unacknowledged

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
    def flush_acks(self) -> None:
        self.ledger.flush(self.ack_sock, self.spec.ident)

    def ack_sock(self, endpoint: str) -> zmq.Socket[bytes] | None:
        """The PUSH that acks go to ``endpoint`` on (opened on first use); None for a sender
        this replica does not feed from (any more)."""
        sock = self.ack_socks.get(endpoint)
        if sock is None:
            if endpoint not in self.ack_peers:
                return None   # its sender is gone (scaled down) since the input arrived
            sock = self.ack_socks[endpoint] = self.ctx.socket(zmq.PUSH)
            if self.curve is not None and endpoint.startswith("tcp://"):
                self.curve.client(sock)
            sock.setsockopt(zmq.LINGER, 200)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.connect(network.connect_from(endpoint, self.spec.bind_host))
        return sock

    def save_at_ack_points(self, now: float, force: bool = False) -> None:
        self.ledger.save_at_ack_points(now, self.snapshot_with_ids, self.state_path, force)

    @property
    def acks_out(self) -> dict[str, dict[tuple[str, int], list[int]]]:
        return self.ledger.acks_out

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
        sock = self.ack_sock(endpoint)
        if sock is None:
            return            # a sender forgotten (MAX_SENDERS): nothing to wait for
        host = network.advertised_host(self.spec.advertise_host, self.spec.bind_host, [endpoint])
        at = f"tcp://{host}:{self.spec.input.rsplit(':', 1)[-1]}"
        try:
            sock.send(wire.leave_message(edge, epoch, self.spec.ident, at), flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning(f"cannot tell {endpoint} that this replica stops: its FENCE is awaited until stop_grace")
        self.drain_from.add(endpoint)

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
            if msg["k"] == wire.LEAVE:
                if edge.leave(msg["at"], now):
                    logger.info(f"{msg['from'][:80]} stops: nothing more goes to {msg['at'][:120]} until a new process is there")
                else:
                    logger.warning(f"{msg['from'][:80]} stops at {msg['at'][:120]}, which edge {edge.name} does not send to")
                continue
            for seq in msg["s"]:
                ob = edge.acked(seq, now)
                if ob is not None and ob.parent is not None:
                    self.ledger.resolve(ob.parent)
        if self.cursor.marks:
            self.cursor.advance()

    def snapshot_with_ids(self) -> dict[str, Any]:
        """A stateful transform's cut: its snapshot and the ids it has applied, taken together."""
        assert self.applied_ids is not None
        return {"state": self.stage.snapshot(), "ids": self.applied_ids.state()}

    def save_state(self) -> None:
        if self.ledger.ackpoints is not None:    # on a clean stop: whatever is acknowledged by now, and its acks
            self.save_at_ack_points(time.monotonic(), force=True)
            self.flush_acks()
            return
        state = self.cursor.committed if self.source and self.acked else self.stage.snapshot()
        if state is None:
            return
        saved: dict[str, Any] = {"state": state, "completed": self.finished and self.eos_confirmed(),
                                 "generation": self.cursor.generation, "replicas": self.spec.replicas}
        if self.source:
            top, saved["watermark"] = self.cursor.to_save()
        save_state(self.state_path, saved)
        if self.source:
            self.cursor.saved(top)    # only now: it never runs ahead of the position a restart resumes at
            self.last_saved = state
            if self.on_saved is not None:
                self.on_saved(state)

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
        self.ledger.keep_senders(self.ack_peers)

    def unreachable(self) -> list[str]:
        """The edges that have had no connected receiver for ``heartbeat_timeout``."""
        now = time.monotonic()
        for edge in self.edges:
            edge.reach_update(now)
        return [e.name for e in self.edges if e.unreachable(now, self.spec.heartbeat_timeout)]

    def keepalive(self, waiting_for: str) -> None:
        """``StageContext.keepalive``: a heartbeat from inside a stage's long call, throttled."""
        now = time.monotonic()
        if now - self.kept_alive_at < HEARTBEAT_INTERVAL_S:
            return
        self.kept_alive_at = now
        self.waiting_for = waiting_for[:200]
        try:
            self.heartbeat()
        finally:
            self.waiting_for = ""       # the loop's next own heartbeat says it no longer waits

    def heartbeat(self) -> None:
        self.rejects.flush()
        self.tell("hb", **self.counters.report(), unreachable=self.unreachable(), insecure=self.insecure,
                  waiting=self.waiting_for,
                  denied=self.curve.log.denied if self.curve is not None else 0,
                  malformed=self.rejects.total, blocked=self.blocked,
                  queue=sum(e.load for e in self.edges), edges_out={e.name: e.sent for e in self.edges},
                  stats=self.stage_stats(),
                  last_error=self.counters.last_error, finished=self.finished)

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
        if self.cursor.out_of_order:
            stats = {**stats, "ids_out_of_order": self.cursor.out_of_order}
        return stats

    def stats_problem(self, problem: str, stats: dict[str, Any]) -> dict[str, Any]:
        if not self.stats_reported:
            self.stats_reported = True
            self.counters.note_error(problem)
            logger.warning(problem)
        return stats

    def close(self) -> None:
        self.processor.close()
        if self.journal is not None:
            self.journal.close()
        if self.counters.dead_letters is not None:
            self.counters.dead_letters.close()
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
