"""The loop of one stage replica: :class:`StageRuntime` owns the poller, the stop and the end of
the stream, and wires the parts (see the package docstring for the protocol)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from streampipe.stages import network, wire
from streampipe.stages.ackpoints import AckPoints
from streampipe.stages.api import Source, Stage, is_source
from streampipe.stages.keys import hashable
from streampipe.stages.poison import Journal
from streampipe.stages.process import Processor
from streampipe.stages.runtime.acksocks import AckSockets
from streampipe.stages.runtime.control import ControlLink, checked_messages
from streampipe.stages.runtime.counters import Counters, StageStats
from streampipe.stages.runtime.cursor import SourceCursor
from streampipe.stages.runtime.ending import StreamEnd
from streampipe.stages.runtime.inputs import Inputs
from streampipe.stages.runtime.ledger import AckLedger
from streampipe.stages.runtime.outputs import Edge, Wiring
from streampipe.stages.runtime.producer import Producer
from streampipe.stages.runtime.replay import Replay
from streampipe.stages.runtime.router import Router
from streampipe.stages.runtime.tunables import (
    ACK_SAVE_MIN_S,
    EOS_RESEND_S,
    EOS_WAIT_S,
    EXIT_OK,
    HEARTBEAT_INTERVAL_S,
    IDLE_WAIT_MS,
    PROMPT_SAVE_S,
    RESEND_CHECK_S,
    SOURCE_BATCHES_PER_TICK,
    STATE_SAVE_S,
)
from streampipe.stages.spec import StageSpec
from streampipe.stages.state import DeadLetters, save_state


class StageRuntime:
    """Runs one stage replica until it is stopped, its stream ends, or it crashes.

    The loop owns the poller, the stop and the end of the stream; the rest are parts it wires
    together, each owning its state: :class:`ControlLink` (the supervisor), :class:`Inputs` (what
    is taken in, the drain), :class:`Router` and the :class:`Edge` list (what goes out),
    :class:`Producer` with the :class:`SourceCursor` (a source), :class:`AckLedger` with
    :class:`AckSockets` (what is owed upstream), :class:`Counters` (what is reported).
    """

    def __init__(self, spec: StageSpec, stage: Stage) -> None:
        self.spec, self.stage = spec, stage
        self.acked = spec.delivery == "at-least-once"
        self.epoch = int.from_bytes(os.urandom(4), "little")
        self.source = is_source(stage)
        self.ctx = zmq.Context()
        self.stopping = False
        # a SIGTERM's word (the handler runs between any two bytecodes): the loop takes it at the
        # top of an iteration only, so no step of one iteration sees the stop and another not
        self.stop_asked = False
        self.waiting_for = ""                     # what a stage said it waits for (keepalive), this beat
        self.kept_alive_at = 0.0
        self.finished = False                     # a source's stream ended
        self.blocked = False                      # an output edge is full: nothing is taken or pulled
        committed = getattr(stage, "committed", None)      # a source hears which position is done end to end
        on_commit = committed if self.source and getattr(committed, "__func__", None) is not Source.committed else None
        saved = getattr(stage, "saved", None)              # ... and which position is on disk (it then saves promptly)
        self.on_saved = saved if self.source and getattr(saved, "__func__", None) is not Source.saved else None
        self.last_saved: dict[str, Any] | None = None     # the committed state written last
        # a transform with state saves its snapshot where its acks advance (see stages.ackpoints)
        self.keyed_state = not self.source and bool(getattr(stage, "keyed_state", False))   # context.state is saved
        stateful = not self.source and self.acked and (self.keyed_state or getattr(stage.snapshot, "__func__", None) is not Stage.snapshot)
        self.counters = Counters(DeadLetters(Path(spec.run_dir) / "deadletter" / f"{spec.name}.jsonl", spec.ident,
                                        spec.file_max_bytes, spec.log_retention))
        self.stats = StageStats(stage, self.counters)
        self.rejects = wire.Rejects()             # malformed messages dropped, by socket
        self.cursor = SourceCursor(spec.name, spec.replica, self.counters, on_commit)
        self.ledger = AckLedger(self.counters, AckPoints(ACK_SAVE_MIN_S) if stateful else None)
        self.ledger.layout["replicas"] = spec.replicas
        self.curve = network.Curve(Path(spec.curve_keys)) if spec.curve_keys else None
        if self.curve is not None:
            self.curve.start_authenticator(self.ctx)
        self.insecure = ""                        # why a tcp bind is open to the network, if it is
        self.resolver: network.Resolver | None = None
        self.resolved_version = 0
        self.control = ControlLink(self.ctx, spec.control, spec.ident, self.rejects)
        self.acks = AckSockets(self.ctx, spec.ack_peers, not spec.control, spec.bind_host, self.curve)
        self.ackp: zmq.Socket[bytes] | None = None
        self.edges: list[Edge] = []               # filled by bind(); the parts below read this list
        self.processor = Processor(stage)
        self.router = Router(spec, stage, self.counters, self.edges)
        # the input batch in hand, noted so that a record that kills the process is isolated
        journal = (Journal(self.state_path.with_suffix(".inflight"), spec.last_exit)
                   if self.acked and spec.input and spec.control else None)
        self.inputs = Inputs(spec, self.acked, stateful, self.counters, self.ledger, self.acks, self.rejects,
                             self.processor, journal, self.router, self.edges, getattr(stage, "on_origin", None))
        self.replay = Replay(spec, self.inputs)   # `streampipe deadletter replay`: idle until told
        # a transform or sink under a supervisor (who its senders are is known): the end of its input
        self.end = StreamEnd() if spec.input and spec.control else None
        self.inputs.end = self.end
        self.producer = (Producer(spec, stage, self.acked, self.cursor, self.counters, self.router, self.edges)  # type: ignore[arg-type]
                         if self.source else None)

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
    def restore(self, saved: dict[str, Any]) -> None:
        """A restarted replica's saved state: the stage's own, and the runtime's share of it."""
        self.stage.restore(saved.get("state") or {})
        if self.end is not None:
            self.end.restore(saved)
        if self.source:
            self.cursor.restore(saved)
            return
        self.cursor.generation = self.ledger.layout["generation"] = int(saved.get("generation") or 0)
        if self.ledger.ackpoints is not None:
            self.ledger.ackpoints.restore(saved.get("acked") or [])
            self.inputs.restore_applied(saved.get("ids") or {})
        if self.keyed_state:
            self.stage.context.state = {hashable(k): v for k, v in saved.get("keyed") or []}

    def bind(self) -> None:
        self.ackp = self.ctx.socket(zmq.PULL)
        self.ackp.setsockopt(zmq.LINGER, 0)
        self.ackp.setsockopt(zmq.MAXMSGSIZE, wire.CONTROL_MAX_BYTES)
        self.secure(self.ackp, self.spec.ack)
        self.ackp.bind(self.spec.ack)
        bound_ack = self.ackp.get_string(zmq.LAST_ENDPOINT)     # run-stage may bind port 0
        targets = {e.name: (e.addresses, e.port) for e in self.spec.edges if e.addresses}
        wiring = Wiring(self.spec, self.epoch, self.acked, self.counters, self.ctx, self.curve)
        self.edges.extend(Edge(wiring, e, immediate=e.name in targets) for e in self.spec.edges)
        self.edges_by_name = {e.name: e for e in self.edges}
        if targets:
            self.ack_port = int(bound_ack.rsplit(":", 1)[1])
            self.resolver = network.Resolver(targets, self.spec.resolve_interval)
            self.apply_resolved()
        if self.spec.input:
            self.inputs.bind(self.ctx, self.secure)

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
        self.control.tell(op, **fields)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        poller = zmq.Poller()
        assert self.ackp is not None
        poller.register(self.ackp, zmq.POLLIN)
        ctl = self.control.sock
        if ctl is not None:
            poller.register(ctl, zmq.POLLIN)
        if self.inputs.inp is not None:
            poller.register(self.inputs.inp, zmq.POLLIN)
        gen: Iterator[Any] | None = None
        if self.producer is not None and not self.finished:
            gen = self.producer.start()
        next_hb = next_resend = next_save = 0.0
        taking = self.inputs.inp is not None      # the input is registered with the poller
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
                if self.inputs.drain_from is None and not self.spec.control and self.inputs.inp is not None and self.acked:
                    self.inputs.leave()
            if self.resolver is not None and self.resolver.version != self.resolved_version:
                self.apply_resolved()
            for edge in self.edges:
                if edge.queued:
                    edge.send(now)
            self.blocked = any(e.full() for e in self.edges)
            if self.replay.active:
                self.replay.step(more=not self.stopping)
            if self.ledger.ackpoints is not None:
                self.save_at_ack_points(now)
            if self.end is not None:
                self.end_step(now)
            self.flush_acks()

            # end of the stream or stop: decide whether we are done
            if taking and not self.inputs.taking(self.stopping):
                poller.unregister(self.inputs.inp)       # what is still queued there was never taken: it is resent
                taking = False
            if (self.finished or self.stopping) and gen is None:
                if not taking:
                    if self.producer is not None and any(e.pending_n for e in self.edges):
                        self.producer.cut()
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
                produced, gen = self.producer.pull(gen, now)   # type: ignore[union-attr]
                idle = not produced
                if gen is None and not self.stopping:
                    self.finished = True
                for edge in self.edges:
                    if edge.outq:
                        edge.send(now)
                self.blocked = any(e.full() for e in self.edges)
                if idle:
                    break
            if self.producer is not None:
                self.producer.flush_lingering(now)
            for edge in self.edges:
                if edge.queued:
                    edge.send(now)   # a batch the linger timer just cut leaves now, not at the next wake-up

            timeout_ms = 0 if self.replay.queue and not self.blocked else self.poll_timeout(now, idle and gen is not None, next_hb)
            writable_wait = [sock for e in self.edges if e.queued for sock in e.waiting_socks()] if self.blocked else []
            for sock in writable_wait:      # blocked by a full socket: wake when it drains
                poller.register(sock, zmq.POLLOUT)
            events = dict(poller.poll(timeout_ms))
            for sock in writable_wait:
                poller.unregister(sock)
            if ctl is not None and ctl in events:
                self.read_control()
            if self.ackp in events:
                self.read_acks()
            now = time.monotonic()
            if taking and self.inputs.inp in events and not self.blocked:
                self.inputs.read(now)
        return EXIT_OK

    def undrained(self) -> None:
        """The stop deadline passed before the replica drained: say what is left (it is resent)."""
        unacked = sum(len(e.unacked) + len(e.outq) for e in self.edges)
        missing = self.inputs.unfenced()
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

    # -- end of stream -----------------------------------------------------------------------
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

    def end_step(self, now: float) -> None:
        """A transform's or sink's end of stream (:mod:`stages.runtime.ending`): the EOS received
        saved, then confirmed; ``finish()`` once every sender's is in and nothing taken is owed;
        its own EOS once everything it sent is acknowledged; ended once every receiver confirmed."""
        end = self.end
        assert end is not None
        if end.unsaved and not end.saves_held:
            self.save_end()
            self.flush_acks()      # confirmed now: not after a finish() that takes its time
        if end.input_ended(self.acks.peers) and not self.ledger.in_progress:
            self.finish_input()
        if (end.finishing or end.ended) and all(not e.queued and not e.unacked for e in self.edges):
            if self.eos_confirmed():
                if not end.ended:
                    end.ended = True
                    self.save_end()
                    logger.info(f"stream ended: every receiver confirmed the end of stream ({self.counters.records_out} records sent)")
            elif now - end.eos_sent_at > EOS_RESEND_S:
                self.send_eos()
                end.eos_sent_at = now

    def finish_input(self) -> None:
        """The input ended: the stage's ``finish()``, its records out as any output's (an
        ``own_ids`` stage's under its own origin), acknowledged before the EOS goes on."""
        assert self.end is not None
        logger.info("input ended (every sender's end of stream is in): finish()")
        outcome = self.processor.finish()
        for record, error, tb in outcome.rejected:
            self.counters.reject(record, error, tb)
        for exc in outcome.exceptions:     # its records are lost with it: loud, and in status
            self.counters.note_error(f"finish() failed: {type(exc).__name__}: {exc}")
            logger.opt(exception=exc).error(f"finish() failed: {type(exc).__name__}: {exc}; the end of stream goes on without its records")
        self.router.emit(outcome.records, None, self.inputs.own_stamp or (None, None))
        self.end.finishing = True
        logger.info(f"finish() made {len(outcome.records)} records")

    def save_end(self) -> None:
        """Save the state now with the end of stream's fields and confirm the EOS it holds; a
        stateful transform only while its state is the saved one (else its next save at an ack
        point carries them)."""
        assert self.end is not None
        if self.ledger.ackpoints is None:
            self.save_state()
        elif self.ledger.at_rest():
            self.ledger.save_now(self.snapshot_with_ids, self.state_path, self.end.fields())
            self.confirm_saved()

    def confirm_saved(self) -> None:
        """The state file holds every EOS received: confirm them to their senders."""
        assert self.end is not None
        for header in self.end.saved():
            self.ledger.on_eos(header, note=False)

    # -- acks --------------------------------------------------------------------------------
    def flush_acks(self) -> None:
        self.ledger.flush(self.acks.sock, self.spec.ident)

    def set_ack_peers(self, endpoints: list[str]) -> None:
        """The replicas feeding this one changed (a scale upstream): acks go only to these."""
        self.acks.set_peers(endpoints)
        self.ledger.keep_senders(self.acks.peers)

    def save_at_ack_points(self, now: float, force: bool = False) -> None:
        if self.end is None:
            self.ledger.save_at_ack_points(now, self.snapshot_with_ids, self.state_path, force)
        elif not self.end.saves_held and self.ledger.save_at_ack_points(now, self.snapshot_with_ids, self.state_path,
                                                                        force, self.end.fields()):
            self.confirm_saved()

    @property
    def acks_out(self) -> dict[str, dict[tuple[str, int], list[int]]]:
        return self.ledger.acks_out

    def read_acks(self) -> None:
        assert self.ackp is not None
        now = time.monotonic()
        for msg in checked_messages(self.ackp, self.rejects, "ack", self._read_ack):
            edge = self.edges_by_name[msg["e"]]
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

    def _read_ack(self, frames: list[bytes]) -> dict[str, Any]:
        msg = wire.read_ack(wire.single(frames))
        if msg["e"] not in self.edges_by_name:
            raise wire.Malformed(f"ack for an unknown edge {msg['e'][:80]!r}")
        return msg

    # -- state -------------------------------------------------------------------------------
    def snapshot_with_ids(self) -> dict[str, Any]:
        """A stateful transform's cut: its snapshot and the ids it has applied, taken together."""
        assert self.inputs.applied_ids is not None
        cut: dict[str, Any] = {"state": self.stage.snapshot(), "ids": self.inputs.applied_ids.state()}
        if self.keyed_state:
            cut["keyed"] = [[k, v] for k, v in self.stage.context.state.items()]
        return cut

    def save_state(self) -> None:
        if self.ledger.ackpoints is not None:    # on a clean stop: whatever is acknowledged by now, and its acks
            self.save_at_ack_points(time.monotonic(), force=True)
            self.flush_acks()
            return
        if self.end is not None and self.end.saves_held:
            return
        state = self.cursor.committed if self.source and self.acked else self.stage.snapshot()
        if state is None and self.end is not None:
            state = {}            # a transform's file holds its end of stream even without a state
        if state is None:
            return
        saved: dict[str, Any] = {"state": state, "completed": self.finished and self.eos_confirmed(),
                                 "generation": self.cursor.generation, "replicas": self.spec.replicas}
        if self.source:
            top, saved["watermark"] = self.cursor.to_save()
        if self.end is not None:
            saved.update(self.end.fields())
        save_state(self.state_path, saved)
        if self.end is not None:
            self.confirm_saved()
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
        for msg in self.control.read():
            op = msg["op"]
            if op == "stop":
                self.stopping = True
                self.inputs.drain(msg.get("senders"))
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
            elif op == "replay" and self.spec.input and not self.stopping:
                self.replay.start()

    # -- reporting ---------------------------------------------------------------------------
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
        stats = self.stats.read()
        if self.cursor.out_of_order:
            stats = {**stats, "ids_out_of_order": self.cursor.out_of_order}
        self.tell("hb", **self.counters.report(), unreachable=self.unreachable(), insecure=self.insecure,
                  waiting=self.waiting_for,
                  denied=self.curve.log.denied if self.curve is not None else 0,
                  malformed=self.rejects.total, blocked=self.blocked,
                  queue=sum(e.load for e in self.edges), edges_out={e.name: e.sent for e in self.edges},
                  stats=stats, last_error=self.counters.last_error,
                  finished=self.finished or (self.end is not None and self.end.ended))

    def close(self) -> None:
        self.processor.close()
        self.inputs.close()
        if self.counters.dead_letters is not None:
            self.counters.dead_letters.close()
        if self.resolver is not None:
            self.resolver.stop()
        linger = 0 if self.acked else 1000
        for edge in self.edges:
            edge.close(linger)
        self.acks.close()
        if self.ackp is not None:
            self.ackp.close(linger=0)
        self.control.close()
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
