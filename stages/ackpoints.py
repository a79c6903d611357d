"""A stateful transform's snapshot, saved where its acknowledgements advance.

A transform acknowledges an input batch once everything it produced from it is acknowledged
downstream; after a crash, upstream resends every batch that was not acknowledged, and the new
process starts from the last saved ``snapshot()``. So the saved snapshot must hold the effect of
exactly the acknowledged batches: none missing (they are never sent again) and none extra (they
come again and would count twice).

:class:`AckPoints` keeps the input batches (their ack tokens) in the order they were processed.
Now and then it *cuts*: it takes ``snapshot()``, the effect of every batch processed so far, and
attaches it to the batches processed since the previous cut. An ack that becomes due is held; a
cut is ready once its batches and those of every earlier cut are due, and its snapshot is then
exactly the effect of the batches it releases. The runtime saves it atomically, then sends those
acks. A clock only paces the cuts (at most one every ``min_interval`` s, each costs a snapshot
and an fsync); which state is saved is settled by acknowledgements alone.

A crash after the save and before the acks leave (microseconds) would leave batches in the state
that upstream sends again. So every save lists, beside the state, *every* batch the state holds
that its sender may still send again (:meth:`AckPoints.keys`): the batches released by this save
and by earlier ones, and those restored from the file, each dropped from the list only when its
sender says (by its lowest unacknowledged sequence number, :meth:`AckPoints.close_below`) that it
has the ack, never by a later save. The next process acknowledges a listed batch without
processing it (:meth:`AckPoints.applied`), however many crashes come between. A batch resent while
its first copy waits in a cut (its ack held longer than the sender's ack timeout) is dropped
(:meth:`AckPoints.held`): the held ack answers both copies.

A snapshot is copied when it is cut (through msgpack, as it is saved), so a stage may return its
live dicts from ``snapshot()``: what later batches change is not in the cut.

>>> class Token:
...     def __init__(self, seq): self.ack, self.edge, self.ep, self.seq = "a", "e", 1, seq
>>> ap, count = AckPoints(min_interval=0.0), {"n": 0}
>>> t1, t2 = Token(1), Token(2)
>>> for t in (t1, t2):
...     count["n"] += 10; ap.processed(t)
>>> ap.cut(now=0.0, snapshot=lambda: dict(count))
>>> ap.due(t2); ap.ready() is None          # t1's outputs are not acknowledged yet
True
>>> ap.due(t1); state, tokens = ap.ready(); state, [t.seq for t in tokens]
({'n': 20}, [1, 2])
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from streampipe.stages import wire

Key = tuple[Any, ...]
Sender = tuple[Any, ...]       # (ack address, edge, sender epoch)
KEEP_SENDER_EPOCHS = 4         # a sender's last lives whose batches are remembered (each restart is one)


class _Cut:
    __slots__ = ("state", "tokens", "waiting")

    def __init__(self, state: dict[str, Any], tokens: list[Any]) -> None:
        self.state, self.tokens, self.waiting = state, tokens, 0


def key_of(token: Any) -> Key:
    """Who sent a batch and which one: (ack address, edge, sender epoch, sequence number)."""
    return (token.ack, token.edge, token.ep, token.seq)


class AckPoints:
    """Holds a stateful transform's acks until a saved snapshot covers exactly them."""

    def __init__(self, min_interval: float) -> None:
        self.min_interval = min_interval
        self.uncut: list[Any] = []                 # processed since the last cut, in order
        self.due_uncut: set[int] = set()           # ... whose ack is already due (by id)
        self.cuts: deque[_Cut] = deque()
        self.cut_of: dict[int, _Cut] = {}          # token id -> its cut, while its ack is not due
        self.last_cut = float("-inf")
        # batches in the saved state (released or restored) whose senders may send them again:
        # per sender, the seqs; trimmed only by the sender's lowest unacknowledged mark
        self.applied_seqs: dict[Sender, set[int]] = {}
        self.held_keys: set[Key] = set()           # batches processed whose acks are held

    def processed(self, token: Any) -> None:
        """``token``'s batch has just been processed: its effect is in the stage's state."""
        self.uncut.append(token)
        self.held_keys.add(key_of(token))

    def due(self, token: Any) -> None:
        """Everything produced from ``token``'s batch is acknowledged downstream."""
        cut = self.cut_of.pop(id(token), None)
        if cut is not None:
            cut.waiting -= 1
        else:
            self.due_uncut.add(id(token))

    def cut(self, now: float, snapshot: Callable[[], dict[str, Any]], force: bool = False) -> None:
        """Take a snapshot for the batches processed since the last cut (paced by ``min_interval``)."""
        if not self.uncut or (not force and now - self.last_cut < self.min_interval):
            return
        cut = _Cut(wire.unpackb(wire.packb(snapshot())), self.uncut)   # a copy: later batches do not change it
        for token in self.uncut:
            if id(token) in self.due_uncut:
                self.due_uncut.discard(id(token))
            else:
                cut.waiting += 1
                self.cut_of[id(token)] = cut
        self.uncut, self.last_cut = [], now
        self.cuts.append(cut)

    def ready(self) -> tuple[dict[str, Any], list[Any]] | None:
        """The newest snapshot whose batches (and all before them) are due, and their tokens."""
        state: dict[str, Any] | None = None
        tokens: list[Any] = []
        while self.cuts and self.cuts[0].waiting == 0:
            cut = self.cuts.popleft()
            state = cut.state
            tokens.extend(cut.tokens)
            self.held_keys.difference_update(key_of(t) for t in cut.tokens)
        if state is None:
            return None
        for t in tokens:
            self._remember(key_of(t))
        return state, tokens

    def _remember(self, key: Key) -> None:
        ack, edge, ep, seq = key
        sender = (ack, edge, ep)
        if sender not in self.applied_seqs:
            same = [s for s in self.applied_seqs if s[:2] == sender[:2]]
            for old in same[:-KEEP_SENDER_EPOCHS + 1]:     # a sender's earlier lives: it restarted since
                del self.applied_seqs[old]
            self.applied_seqs[sender] = set()
        self.applied_seqs[sender].add(seq)

    def close_below(self, sender: Sender, lo: int) -> None:
        """``sender`` has the acks of every batch below ``lo``: it sends none of them again."""
        seqs = self.applied_seqs.get(sender)
        if seqs:
            seqs.difference_update([s for s in seqs if s < lo])

    def keys(self) -> list[list[Any]]:
        """What to save beside the state: every batch in it that its sender may still send again."""
        return [[*sender, seq] for sender, seqs in self.applied_seqs.items() for seq in sorted(seqs)]

    def restore(self, keys: list[list[Any]]) -> None:
        for k in keys:
            if isinstance(k, list) and len(k) == 4:
                self._remember(tuple(k))

    def applied(self, token: Any) -> bool:
        """Whether ``token``'s batch is in the saved state already (its ack was lost in a crash)."""
        seqs = self.applied_seqs.get((token.ack, token.edge, token.ep))
        return seqs is not None and token.seq in seqs

    def held(self, token: Any) -> bool:
        """Whether ``token``'s batch is a copy of one processed whose ack is still held."""
        return key_of(token) in self.held_keys
