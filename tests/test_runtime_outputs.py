"""The sending side of the stage runtime (stages/runtime/outputs.py) with test doubles: no process,
no socket. A fake :class:`Wiring` hands each link a fake PUSH socket that records what it was sent."""

from __future__ import annotations

from typing import Any

import zmq

from streampipe.stages import network, wire
from streampipe.stages.columns import Columns
from streampipe.stages.runtime.counters import Counters
from streampipe.stages.runtime.outputs import ID_BLOCK, Edge, Wiring, replica_of_id, split_by_id
from streampipe.stages.runtime.tokens import InToken
from streampipe.stages.spec import EdgeSpec, StageSpec


class FakeSock:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sent: list[list[bytes]] = []
        self.full = False                 # True: the next sends raise zmq.Again (HWM reached)

    def send_multipart(self, frames: list[bytes], flags: int = 0, copy: bool = True) -> None:
        if self.full:
            raise zmq.Again()
        self.sent.append(list(frames))

    def close(self, linger: int = 0) -> None:
        pass

    def seqs(self) -> list[int]:
        return [wire.unpackb(f[0])["seq"] for f in self.sent]


class FakeReach(network.Reach):
    """A socket monitor without a socket: ``post`` is the I/O thread posting an event, read at
    the next ``update`` (as a real monitor's are). It starts with one handshake read."""

    def __init__(self) -> None:
        self.up: set[str] = set()
        self.events, self.last_drop, self.last_handshake = 0, -1, -1
        self.posted: list[int] = []
        self.note(zmq.EVENT_HANDSHAKE_SUCCEEDED, "tcp")

    def post(self, kind: int) -> None:
        self.posted.append(kind)

    def update(self, now: float) -> None:
        for kind in self.posted:
            self.note(kind, "tcp")
        self.posted.clear()

    def unreachable(self, now: float, after: float) -> bool:
        return False

    def close(self) -> None:
        pass


class FakeWiring(Wiring):
    def __init__(self, acked: bool = True) -> None:
        spec = StageSpec(name="gen", replica=0, replicas=1, type="t", options={}, run_dir="/nonexistent",
                         config_dir=".", control="", input=None, ack="ipc://ack", ack_timeout=1.0)
        super().__init__(spec, epoch=7, acked=acked, counters=Counters(None))
        self.socks: dict[str, FakeSock] = {}

    def open(self, endpoint: str, immediate: bool) -> tuple[Any, Any]:
        sock = self.socks[endpoint] = FakeSock(endpoint)
        return sock, FakeReach()


def edge(replicas: int = 2, keyed: bool = False) -> tuple[Edge, FakeWiring]:
    wiring = FakeWiring()
    endpoints = [f"ipc://dest.{i}" for i in range(replicas)]
    return Edge(wiring, EdgeSpec("default>dest", "default", "dest", endpoints, keyed=keyed)), wiring


def records(ids: range) -> list[dict[str, Any]]:
    return [{"id": i} for i in ids]


def test_a_new_batch_goes_to_the_least_loaded_link() -> None:
    e, w = edge(replicas=2)
    for n in range(4):
        e.cut(records(range(n * 10, n * 10 + 10)), None)
    e.send(now=0.0)
    a, b = w.socks["ipc://dest.0"], w.socks["ipc://dest.1"]
    assert len(a.sent) == 2 and len(b.sent) == 2, "equally loaded replicas take turns"
    for seq in a.seqs():                 # dest.0 acknowledges its two: it is the less loaded now
        e.acked(seq, now=0.1)
    e.cut(records(range(100, 110)), None)
    e.cut(records(range(110, 120)), None)
    e.send(now=0.2)
    assert len(a.sent) == 4 and len(b.sent) == 2
    assert w.counters.records_out == 60


def test_a_full_link_is_passed_over_for_a_new_batch() -> None:
    e, w = edge(replicas=2)
    w.socks["ipc://dest.0"].full = True
    for n in range(3):
        e.cut(records(range(n, n + 1)), None)
    e.send(now=0.0)
    assert len(w.socks["ipc://dest.1"].sent) == 3 and not w.socks["ipc://dest.0"].sent


def test_a_late_batch_is_resent_to_the_same_link() -> None:
    e, w = edge(replicas=3)
    e.cut(records(range(10)), None)
    e.send(now=0.0)
    (first,) = [s for s in w.socks.values() if s.sent]
    e.resend_late(now=10.0)
    assert w.counters.resent == 1
    e.send(now=10.0)
    assert first.seqs() == [1, 1], "the copy went back to the replica that had it, not to an idle one"
    assert sum(len(s.sent) for s in w.socks.values()) == 2
    assert w.counters.records_out == 10, "a resend is not counted as records out again"


def test_an_ack_of_a_queued_resend_takes_it_off_the_queue() -> None:
    e, w = edge(replicas=1)
    e.cut(records(range(3)), None)
    e.send(now=0.0)
    e.resend_late(now=10.0)             # queued for a resend ...
    ob = e.acked(1, now=10.0)           # ... when the late ack arrives
    assert ob is not None and ob.seq == 1
    e.send(now=10.0)
    assert w.socks["ipc://dest.0"].seqs() == [1] and not e.queued and not e.unacked


def test_an_output_batch_holds_its_input_until_acknowledged() -> None:
    e, _ = edge(replicas=2, keyed=True)
    token = InToken({"ack": "ipc://up", "e": "x", "ep": 1, "seq": 5})
    ids = [0, ID_BLOCK * 1, ID_BLOCK * 2, ID_BLOCK * 3, ID_BLOCK * 5]
    e.cut([{"id": i} for i in ids], token)
    parts = len(e.outq) + sum(len(link.outq) for link in e.links.values())
    assert token.outstanding == parts
    e.send(now=0.0)
    for seq in list(e.unacked):
        ob = e.acked(seq, now=0.0)
        assert ob is not None and ob.parent is token
        token.outstanding -= 1
    assert token.outstanding == 0


def test_a_keyed_edge_sends_each_id_block_to_its_replica() -> None:
    e, w = edge(replicas=3, keyed=True)
    ids = list(range(0, 8 * ID_BLOCK, ID_BLOCK // 2))
    e.cut([{"id": i} for i in ids], None)
    e.send(now=0.0)
    by_endpoint = sorted(w.socks)
    for k, endpoint in enumerate(by_endpoint):
        for frames in w.socks[endpoint].sent:
            got = [r["id"] for r in wire.unpackb(frames[1])]
            assert all(replica_of_id(i, 3) == k for i in got)
    sent = sorted(r["id"] for s in w.socks.values() for f in s.sent for r in wire.unpackb(f[1]))
    assert sent == ids


def test_split_by_id_keeps_blocks_together_and_ids_without_an_int_apart() -> None:
    recs = [{"id": 1}, {"id": 2}, {"id": ID_BLOCK + 1}, {"id": "x"}, {"name": "no id"}]
    parts = dict(split_by_id(recs, 4))
    assert parts[None] == [{"id": "x"}, {"name": "no id"}]
    assert [{"id": 1}, {"id": 2}] in parts.values()
    cols = Columns.from_records([{"id": i} for i in range(10)])
    ((k, part),) = split_by_id(cols, 4)
    assert k == replica_of_id(0, 4) and part is cols, "one block: the batch as it is, no per-id hash"


def test_a_fenced_link_gets_a_fence_and_no_new_batch() -> None:
    e, w = edge(replicas=2)
    e.fence("ipc://dest.0", True)
    e.cut(records(range(2)), None)
    e.cut(records(range(2, 4)), None)
    e.send(now=0.0)
    a, b = w.socks["ipc://dest.0"], w.socks["ipc://dest.1"]
    assert len(b.sent) == 2
    assert len(a.sent) == 1 and wire.unpackb(a.sent[0][0])["k"] == wire.FENCE


def test_a_replica_that_leaves_is_fenced_until_a_new_process_connects_there() -> None:
    """Run-stage: a SIGTERMed replica's LEAVE fences its link (a FENCE behind the last batch sent
    to it, nothing more after, resends included) until its address completes a new handshake."""
    wiring = FakeWiring()
    e = Edge(wiring, EdgeSpec("default>dest", "default", "dest", ["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"]))
    leaving, staying = wiring.socks["tcp://10.0.0.2:5555"], wiring.socks["tcp://10.0.0.1:5555"]
    reach = e.links["tcp://10.0.0.2:5555"].reach
    reach.post(zmq.EVENT_HANDSHAKE_SUCCEEDED)     # its first connection's event, posted before the LEAVE, not read yet
    assert not e.leave("tcp://10.0.0.9:5555", now=0.0), "a port two links share names neither of them"
    assert e.leave("tcp://10.0.0.2:5555", now=0.0)
    for n in range(3):
        e.cut(records(range(n * 10, n * 10 + 10)), None)
    e.send(now=0.0)
    assert [wire.unpackb(f[0])["k"] for f in leaving.sent] == [wire.FENCE]
    assert len(staying.sent) == 3
    e.resend_late(now=10.0)
    e.send(now=10.0)
    assert len(leaving.sent) == 1 and len(staying.sent) == 6, "resends go back to the replica still there"
    e.reach_update(now=11.0)
    assert e.links["tcp://10.0.0.2:5555"].fenced, "no new process there yet (the old connection's handshake is not one)"
    reach.post(zmq.EVENT_HANDSHAKE_SUCCEEDED)     # the old process's connection again, without a drop: still the one that left
    e.reach_update(now=11.5)
    assert e.links["tcp://10.0.0.2:5555"].fenced
    reach.post(zmq.EVENT_DISCONNECTED)          # it exits
    e.reach_update(now=11.7)
    assert e.links["tcp://10.0.0.2:5555"].fenced
    reach.post(zmq.EVENT_HANDSHAKE_SUCCEEDED)     # a new process at the address connects
    e.reach_update(now=12.0)
    assert not e.links["tcp://10.0.0.2:5555"].fenced


def test_a_replica_bound_to_every_interface_is_matched_by_its_port() -> None:
    wiring = FakeWiring()
    e = Edge(wiring, EdgeSpec("default>dest", "default", "dest", ["tcp://10.0.0.1:5555", "tcp://10.0.0.2:6666"]))
    assert e.leave("tcp://192.168.1.7:6666", now=0.0) and e.links["tcp://10.0.0.2:6666"].fenced
    assert not e.links["tcp://10.0.0.1:5555"].fenced
