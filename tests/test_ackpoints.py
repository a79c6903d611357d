"""AckPoints without processes: the saved snapshot always covers exactly the acks it releases."""

from __future__ import annotations

import random

from streampipe.stages.ackpoints import AckPoints


class Token:
    def __init__(self, seq: int, ep: int = 1) -> None:
        self.ack, self.edge, self.ep, self.seq = "ipc://a", "default>next", ep, seq


def test_random_order_of_acks_never_releases_an_ack_outside_the_saved_state() -> None:
    rng = random.Random(11)
    ap = AckPoints(min_interval=0.05)
    applied: list[int] = []          # the stage's state: the batches it processed, in order
    waiting: list[Token] = []        # processed, outputs not acknowledged downstream yet
    released: list[int] = []
    saved: list[int] = []
    now = 0.0
    for seq in range(5000):
        now += rng.random() * 0.01
        token = Token(seq)
        applied.append(seq)
        ap.processed(token)
        waiting.append(token)
        rng.shuffle(waiting)
        for _ in range(rng.randint(0, 2)):          # downstream acks arrive in any order
            if waiting:
                ap.due(waiting.pop())
        ap.cut(now, lambda: {"applied": list(applied)})
        ready = ap.ready()
        if ready is not None:
            state, tokens = ready
            released += [t.seq for t in tokens]
            saved = state["applied"]
            assert sorted(released) == saved          # exactly what is acknowledged: no more, no less
    for token in waiting:
        ap.due(token)
    ap.cut(now, lambda: {"applied": list(applied)}, force=True)
    state, tokens = ap.ready()
    released += [t.seq for t in tokens]
    assert sorted(released) == state["applied"] == list(range(5000))
    assert not ap.held_keys and not ap.cuts and not ap.cut_of


def test_cuts_are_paced_and_a_due_batch_waits_for_the_ones_before_it() -> None:
    ap = AckPoints(min_interval=1.0)
    a, b, c = Token(1), Token(2), Token(3)
    ap.processed(a)
    ap.cut(0.0, lambda: {"n": 1})
    ap.processed(b)
    ap.cut(0.5, lambda: {"n": 2})     # too soon: b waits for the next cut
    assert len(ap.cuts) == 1 and ap.uncut == [b]
    ap.due(b)
    ap.cut(1.0, lambda: {"n": 2})
    assert ap.ready() is None          # b's cut is ready, a's is not: nothing may be saved yet
    ap.processed(c)
    ap.due(a)
    state, tokens = ap.ready()
    assert state == {"n": 2} and tokens == [a, b]
    assert ap.held(c) and not ap.held(a)


def test_restored_batches_are_recognised_and_other_senders_are_not() -> None:
    ap = AckPoints(min_interval=0.0)
    t = Token(7)
    ap.processed(t)
    ap.due(t)
    ap.cut(0.0, lambda: {})
    _, tokens = ap.ready()
    after_crash = AckPoints(min_interval=0.0)
    after_crash.restore(ap.keys())
    assert after_crash.applied(Token(7)) and not after_crash.applied(Token(8)) and not after_crash.applied(Token(7, ep=2))


def test_the_saved_batches_survive_later_saves_and_crashes_until_their_sender_has_the_acks() -> None:
    """The defect this replaced: a restarted process knew the restored batches in memory only, its
    next save listed only its own, and a resend after the next crash was counted again."""
    first = AckPoints(min_interval=0.0)
    t7 = Token(7)
    first.processed(t7)
    first.due(t7)
    first.cut(0.0, lambda: {"n": 1})
    first.ready()
    second = AckPoints(min_interval=0.0)           # crashed before t7's ack left
    second.restore(first.keys())
    t8 = Token(8)
    second.processed(t8)
    second.due(t8)
    second.cut(0.0, lambda: {"n": 2})
    second.ready()
    third = AckPoints(min_interval=0.0)            # crashed again: both are still known
    third.restore(second.keys())
    assert third.applied(Token(7)) and third.applied(Token(8)) and not third.applied(Token(9))
    third.close_below(("ipc://a", "default>next", 1), 8)     # the sender has the ack of 7
    assert not third.applied(Token(7)) and third.applied(Token(8))
    assert third.keys() == [["ipc://a", "default>next", 1, 8]]


def test_a_snapshot_is_copied_when_it_is_cut() -> None:
    ap = AckPoints(min_interval=0.0)
    counts = {"a": 1}
    t = Token(1)
    ap.processed(t)
    ap.cut(0.0, lambda: {"counts": counts})       # a stage returning its live dict
    counts["a"] = 99                              # a later batch, not acknowledged yet
    ap.due(t)
    state, _ = ap.ready()
    assert state == {"counts": {"a": 1}}
