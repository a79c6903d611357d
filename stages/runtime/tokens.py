"""What the ack ledger counts on: an input batch awaiting its outputs' acks (:class:`InToken`), the
seqs taken from one sender (:class:`Taken`), a source position (:class:`Mark`), a batch's stamp."""

from __future__ import annotations

import hashlib
from typing import Any


class InToken:
    """An input batch awaiting the acks of what it produced before it is acknowledged."""

    __slots__ = ("ack", "edge", "ep", "seq", "outstanding")

    def __init__(self, header: dict[str, Any]) -> None:
        self.ack, self.edge, self.ep, self.seq = header["ack"], header["e"], header["ep"], header["seq"]
        self.outstanding = 0


REPLAY_SENDER = "deadletter"    # the "sender" of a replayed dead letter: no socket, its ack settles the replay


class ReplayToken(InToken):
    """A dead letter replayed into this stage, a batch of one record: settled (``on_settled``)
    where an input batch is acknowledged, i.e. once its outputs are acknowledged end to end (and,
    in a stage with state, once a saved snapshot covers it). Its identity comes from the dead
    letter's key, so a restarted replica that restored it from a snapshot knows it applied it."""

    __slots__ = ("key", "on_settled")

    def __init__(self, key: str, stage: str, on_settled: Any) -> None:
        seq = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)     # the same for the same dead letter, in any process
        super().__init__({"ack": REPLAY_SENDER, "e": f"deadletter>{stage}", "ep": 0, "seq": seq})
        self.key, self.on_settled = key, on_settled


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

