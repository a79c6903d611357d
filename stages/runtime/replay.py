"""The replay of dead letters (``streampipe deadletter replay STAGE``): the supervisor tells one
replica ``replay``; it reads the stage's dead letters not replayed yet and puts each through its
own ``process`` as a batch of one record, as if it came in again.

Each replayed record goes through the normal guarantees, on knowledge, not on time:

- its batch carries the origin ``deadletter:<stage>`` with no watermark, so a sink that holds
  each record once by origin and id (the consumer, :class:`streampipe.Sink`) holds the replayed
  record's outputs once, however often it is replayed (a replay interrupted by a SIGKILL, or run
  twice): as everywhere, that needs an ``id`` on each record (a dead letter never reached the
  sink under it: its first replay that gets through is new there);
- its key is written to ``<stage>.replayed`` (fsynced) only once it is settled: its outputs
  acknowledged end to end, or the record dead-lettered again (the new dead letter names it in
  ``replay_of`` and is itself pending for a later replay). A settled dead letter is not replayed
  again; one in flight when the replica died is replayed by the next ``replay``;
- in a stage with state, its batch identity (the key) is saved with the snapshot that covers it,
  so a restarted replica applies it once (``stages.ackpoints``).

Under ``delivery: at-most-once`` nothing is acknowledged: a dead letter is settled once its record
has been through ``process`` and its outputs handed on, as any record of that pipeline.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from streampipe.stages.runtime.inputs import Inputs
from streampipe.stages.runtime.tokens import REPLAY_SENDER, ReplayToken
from streampipe.stages.spec import StageSpec
from streampipe.stages.state import DeadLetter, ReplayLedger, pending_replays

# dead letters put through process() per loop iteration: one, so that its outputs leave (and input and acks
# are read) before the next is taken; a loop iteration costs ~0.1 ms, dead letters are few
REPLAY_PER_TICK = 1


class Replay:
    """The replica's replay of its stage's dead letters (idle until ``start``)."""

    def __init__(self, spec: StageSpec, inputs: Inputs) -> None:
        self.run_dir, self.stage, self.inputs = Path(spec.run_dir), spec.name, inputs
        self.ledger = ReplayLedger(self.run_dir, spec.name)
        self.queue: list[DeadLetter] = []
        self.inflight: set[str] = set()
        self.settled: list[str] = []

    def start(self) -> None:
        """Queue every pending dead letter that is not queued or in flight here already."""
        known = self.inflight | {d.key for d in self.queue}
        new = [d for d in pending_replays(self.run_dir, self.stage) if d.key not in known]
        self.queue.extend(new)
        logger.info(f"replaying {len(new)} dead letters ({len(self.inflight)} in flight already)")

    @property
    def active(self) -> bool:
        return bool(self.queue or self.settled)

    def step(self, more: bool = True) -> None:
        """Put up to ``REPLAY_PER_TICK`` dead letters through ``process`` (none while an output is
        full, or stopping: ``more`` False), and note the ones settled since."""
        for _ in range(REPLAY_PER_TICK if more else 0):
            if not self.queue or self.inputs.full():
                break
            letter = self.queue.pop(0)
            token = ReplayToken(letter.key, self.stage, self._settled)
            src, _, r = (letter.input or "").rpartition(".")
            header = {"src": src or REPLAY_SENDER, "r": int(r) if r.isdigit() else 0, "e": token.edge, "ep": token.ep,
                      "seq": token.seq, "ack": token.ack, "o": f"deadletter:{self.stage}", "w": None, "dl": letter.key}
            self.inflight.add(letter.key)
            if not self.inputs.ledger.admit(token):    # a stage with state: applied before a restart (acknowledged now)
                continue
            self.inputs.process([letter.record], token, header)
            if not self.inputs.acked:      # at-most-once: nothing is acknowledged; handed on is all it gets
                self._settled(letter.key)
        self.flush()

    def _settled(self, key: str) -> None:
        self.inflight.discard(key)
        self.settled.append(key)

    def flush(self) -> None:
        """Write the keys settled since the last flush (one fsync for them all)."""
        if self.settled:
            self.ledger.mark(self.settled)
            self.settled = []
