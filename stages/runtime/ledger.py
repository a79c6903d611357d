"""The ack ledger: what this replica owes upstream (input batches taken, not yet acknowledged),
the copies it drops, the end-of-stream messages it confirms, and (a stateful transform) the acks
held until a saved snapshot covers them (:class:`streampipe.stages.ackpoints.AckPoints`).

An input batch is acknowledged only once every batch cut from it is acknowledged downstream
(:meth:`AckLedger.resolve` counts them down), so an ack at the source means the record reached the sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from streampipe.stages import wire
from streampipe.stages.ackpoints import KEEP_SENDER_EPOCHS, AckPoints
from streampipe.stages.runtime.counters import Counters
from streampipe.stages.runtime.tokens import InToken, Mark, ReplayToken, Taken
from streampipe.stages.runtime.tunables import ACK_SAVE_MIN_S, ACK_SAVE_SHARE
from streampipe.stages.state import save_state


class AckLedger:
    """The acks one replica owes its senders; written only through these methods."""

    def __init__(self, counters: Counters, ackpoints: AckPoints | None = None) -> None:
        self.counters = counters
        self.ackpoints = ackpoints
        self.seen_batches: dict[tuple[str, str, int], Taken] = {}     # per sender: seqs taken
        self.in_progress: set[tuple[str, str, int, int]] = set()      # taken, not acknowledged yet
        self.acks_out: dict[str, dict[tuple[str, int], list[int]]] = {}
        self.acks_pending = 0
        self.eos_headers: list[dict[str, Any]] = []   # end-of-stream messages to confirm to their senders
        # saved with a stateful transform's state: the layout it belongs to (stages/state.py), so a
        # rescale's re-dealt state (a newer generation) is read once, then this replica's own saves
        self.layout: dict[str, int] = {"generation": 0, "replicas": 1}

    def admit(self, token: InToken) -> bool:
        """Whether a stateful transform processes this batch (not in its restored state already,
        acknowledged again; not a resent copy whose first copy's held ack answers both)."""
        if self.ackpoints is None:
            return True
        if self.ackpoints.applied(token):
            self.ack_token(token)    # in the restored state already: acknowledge, do not count it twice
            return False
        if self.ackpoints.held(token):
            return False             # a resent copy: the held ack of the first one answers both
        self.ackpoints.processed(token)
        return True

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
            self.counters.copy_dropped()
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
        if isinstance(token, ReplayToken):
            token.on_settled(token.key)      # no sender to ack: the replay notes it settled
            return
        self.acks_out.setdefault(token.ack, {}).setdefault((token.edge, token.ep), []).append(token.seq)
        self.acks_pending += 1

    def resolve(self, parent: InToken | Mark) -> None:
        parent.outstanding -= 1
        if parent.outstanding == 0 and isinstance(parent, InToken):
            self.queue_ack(parent)

    def on_eos(self, header: dict[str, Any], note: bool = True) -> None:
        """Confirm an end of stream to its sender (with the next acks)."""
        self.acks_out.setdefault(header["ack"], {}).setdefault(("eos", 0), []).append(0)
        self.eos_headers.append(header)
        if note:
            logger.info(f"end of stream from {header['src']}.{header['r']}")

    def save_at_ack_points(self, now: float, snapshot: Callable[[], dict[str, Any]], path: Path,
                           force: bool = False, more: dict[str, Any] | None = None) -> bool:
        """Save the snapshot that covers exactly the batches whose acks are due (with ``more``:
        the end of stream's fields), then release those acks; whether it saved."""
        assert self.ackpoints is not None
        self.ackpoints.cut(now, snapshot, force)
        ready = self.ackpoints.ready()
        if ready is None:
            return False
        state, tokens = ready
        t0 = time.monotonic()
        self._write(path, state, more)
        self.ackpoints.min_interval = max(ACK_SAVE_MIN_S, (time.monotonic() - t0) / ACK_SAVE_SHARE)
        for token in tokens:
            self.ack_token(token)
        return True

    def at_rest(self) -> bool:
        """Whether every batch processed is in the saved state (no cut waits, none is due): the
        stage's state now is the saved one, and may be saved again as it is (:meth:`save_now`)."""
        assert self.ackpoints is not None
        return not self.ackpoints.uncut and not self.ackpoints.cuts

    def save_now(self, snapshot: Callable[[], dict[str, Any]], path: Path, more: dict[str, Any]) -> None:
        """Save the state as it is now (only :meth:`at_rest`, or after ``finish``: no batch is in
        it that is not acknowledged) with ``more``."""
        self._write(path, snapshot(), more)

    def _write(self, path: Path, state: dict[str, Any], more: dict[str, Any] | None) -> None:
        assert self.ackpoints is not None
        save_state(path, {**state, "completed": False, "acked": self.ackpoints.keys(), **self.layout, **(more or {})})

    def flush(self, sock_for: Callable[[str], Any], ident: str) -> None:
        """Send every ack owed, one message per (sender, edge, epoch), on ``sock_for(endpoint)``
        (None: that sender is gone, its acks are dropped); end-of-stream confirmations with them."""
        if not self.acks_out:
            return
        for endpoint, groups in self.acks_out.items():
            sock = sock_for(endpoint)
            if sock is None:
                continue   # its sender is gone (scaled down) since the input arrived
            for (edge, ep), seqs in groups.items():
                if edge == "eos":
                    for header in self.eos_headers:
                        if header["ack"] == endpoint:
                            msg = wire.ack_message(wire.EOS_ACK, header["e"], header["ep"], [header["seq"]], ident)
                            self._send_ack(sock, msg)
                    self.eos_headers = [h for h in self.eos_headers if h["ack"] != endpoint]
                    continue
                self._send_ack(sock, wire.ack_message(wire.ACK, edge, ep, seqs, ident))
        self.acks_out.clear()
        self.acks_pending = 0

    @staticmethod
    def _send_ack(sock: Any, msg: bytes) -> None:
        try:
            sock.send(msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the sender is gone or swamped: it will resend and we will ack again

    def keep_senders(self, senders: Container[str]) -> None:
        """Only these senders are confirmed an end-of-stream (the others are gone)."""
        self.eos_headers = [h for h in self.eos_headers if h["ack"] in senders]
