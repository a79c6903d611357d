"""The ack ledger (stages/runtime/ledger.py) with test doubles: a transform acknowledges an input
batch upstream only once every batch it cut from it is acknowledged downstream; copies; end of
stream. The outputs are a real Edge on fake sockets (tests/test_runtime_outputs.py)."""

from __future__ import annotations

from typing import Any

from streampipe.stages import wire
from streampipe.stages.runtime.counters import Counters
from streampipe.stages.runtime.ledger import AckLedger
from streampipe.stages.runtime.tokens import InToken
from tests.test_runtime_outputs import edge

UP = "ipc://upstream-ack"


class AckSock:
    def __init__(self) -> None:
        self.msgs: list[dict[str, Any]] = []

    def send(self, msg: bytes, flags: int = 0) -> None:
        self.msgs.append(wire.read_ack(msg))


def header(seq: int, **more: Any) -> dict[str, Any]:
    return {"k": "d", "src": "up", "r": 0, "e": "default>t", "ep": 3, "seq": seq, "ack": UP, **more}


def acked_seqs(sock: AckSock) -> list[int]:
    return [s for m in sock.msgs if m["k"] == wire.ACK for s in m["s"]]


def test_a_transform_acks_upstream_only_what_its_outputs_had_acked() -> None:
    ledger, sock = AckLedger(Counters(None)), AckSock()
    out, _ = edge(replicas=2)
    token = InToken(header(1))
    assert not ledger.copy_of_seen(token, header(1))
    out.cut([{"id": i} for i in range(4)], token)
    out.cut([{"id": i} for i in range(4, 8)], token)     # two output batches from one input batch
    out.send(now=0.0)
    assert token.outstanding == 2
    ledger.flush(lambda ep: sock, "t.0")
    assert acked_seqs(sock) == [], "nothing is owed while its outputs are in flight"
    first, second = sorted(out.unacked)
    ob = out.acked(first, now=0.1)
    assert ob is not None and ob.parent is token
    ledger.resolve(ob.parent)
    ledger.flush(lambda ep: sock, "t.0")
    assert acked_seqs(sock) == [], "one of two outputs acknowledged: still nothing"
    ob = out.acked(second, now=0.2)
    assert ob is not None and ob.parent is not None
    ledger.resolve(ob.parent)
    ledger.flush(lambda ep: sock, "t.0")
    assert acked_seqs(sock) == [1] and sock.msgs[0]["from"] == "t.0" and sock.msgs[0]["ep"] == 3


def test_a_resent_copy_is_dropped_and_acked_again_only_once_the_first_is() -> None:
    counters = Counters(None)
    ledger, sock = AckLedger(counters), AckSock()
    token = InToken(header(5))
    assert not ledger.copy_of_seen(token, header(5))
    token.outstanding = 1
    assert ledger.copy_of_seen(InToken(header(5)), header(5)), "a copy while the first is in progress"
    ledger.flush(lambda ep: sock, "t.0")
    assert acked_seqs(sock) == [] and counters.copies_dropped == 1
    ledger.resolve(token)
    assert ledger.copy_of_seen(InToken(header(5)), header(5))
    ledger.flush(lambda ep: sock, "t.0")
    assert acked_seqs(sock) == [5, 5], "the first's ack, then the copy's (its ack may have been lost)"


def test_the_senders_lo_forgets_what_is_below_it() -> None:
    ledger = AckLedger(Counters(None))
    for seq in range(1, 4):
        token = InToken(header(seq))
        assert not ledger.copy_of_seen(token, header(seq))
        ledger.ack_token(token)
    assert not ledger.copy_of_seen(InToken(header(9)), header(9, lo=4))
    (taken,) = ledger.seen_batches.values()
    assert taken.above == {9} and 2 in taken, "below lo: known as taken without a set of its seqs"


def test_end_of_stream_is_confirmed_to_its_sender_and_not_to_a_sender_that_is_gone() -> None:
    ledger, sock = AckLedger(Counters(None)), AckSock()
    ledger.on_eos(header(7, k="eos"))
    ledger.on_eos({**header(4, k="eos"), "ack": "ipc://gone"})
    ledger.keep_senders({UP})
    ledger.flush(lambda ep: sock if ep == UP else None, "t.0")
    assert [(m["k"], m["e"], m["s"]) for m in sock.msgs] == [(wire.EOS_ACK, "default>t", [7])]
    assert ledger.acks_pending == 0 and not ledger.acks_out and not ledger.eos_headers
