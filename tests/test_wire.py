"""The wire checks: every malformed message raises ``Malformed`` (never anything else), every
well-formed one passes; a stage's runtime counts what it drops and sends its heartbeat whatever
``stats()`` returns. Seeded, so a failure reproduces."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from loguru import logger

from streampipe.stages import wire
from streampipe.stages.api import Stage
from streampipe.stages.runtime import StageRuntime
from streampipe.stages.spec import EdgeSpec, StageSpec
from streampipe.stages.state import load_state

PEER = "ipc:///run/a.generator.0"
PEERS = frozenset({PEER})
HEADER = {"k": "d", "src": "generator", "r": 0, "e": "default>normalizer", "ep": 7, "seq": 1, "n": 2, "t": 1.5, "ack": PEER}
RECORDS = [{"id": 0, "x": [1.0]}, {"id": 1, "x": [2.0]}]
WRONG = [None, True, 1, 2.5, "s", b"b", [1], {"a": 1}, 2**63]   # one value of each msgpack type


def frames(header: dict[str, Any] = HEADER, records: Any = RECORDS) -> list[bytes]:
    return [msgpack.packb(header), msgpack.packb(records)]


def test_well_formed_messages_pass() -> None:
    header, records = wire.read_message(frames(), PEERS, acked=True)
    assert header == HEADER and records == RECORDS
    eos = {k: v for k, v in HEADER.items() if k not in ("n", "t")} | {"k": "eos"}
    assert wire.read_message([msgpack.packb(eos)], PEERS, acked=True) == (eos, None)
    assert wire.read_message(frames({**HEADER, "ack": None}), PEERS, acked=False)[1] == RECORDS
    assert wire.read_message(frames({**HEADER, "n": 0}, []), PEERS, acked=True)[1] == []
    # without a lowest-unacknowledged mark there is nothing to compare the seq with (a KeyError once)
    assert wire.read_message(frames({**HEADER, "seq": -1}), PEERS, acked=True)[0]["seq"] == -1
    with pytest.raises(wire.Malformed, match="above the batch's own seq"):
        wire.read_message(frames({**HEADER, "lo": 5}), PEERS, acked=True)


@pytest.mark.parametrize("field", ["k", "src", "r", "e", "ep", "seq", "n", "t", "ack"])
def test_every_header_field_is_typed(field: str) -> None:
    with pytest.raises(wire.Malformed):
        wire.read_message(frames({k: v for k, v in HEADER.items() if k != field}), PEERS, acked=True)
    good = {type(HEADER[field])} | ({int} if field == "t" else set())
    for value in WRONG:
        if type(value) in good:
            continue
        with pytest.raises(wire.Malformed):
            wire.read_message(frames({**HEADER, field: value}), PEERS, acked=True)


@pytest.mark.parametrize("case", [
    "not msgpack", "truncated header", "header a list", "payload not msgpack", "payload a map", "records not maps",
    "n too large", "n too small", "three frames", "one frame", "eos with a payload", "unknown ack", "no ack when acked",
    "ack when at-most-once", "huge array claim", "bool as count",
])
def test_malformed_messages_are_refused(case: str) -> None:
    good = frames()
    eos = msgpack.packb({**HEADER, "k": "eos"})
    bad = {
        "not msgpack": [b"\xc1\xc1\xc1", good[1]],
        "truncated header": [good[0][:9], good[1]],
        "header a list": [msgpack.packb([1, 2]), good[1]],
        "payload not msgpack": [good[0], b"\xc1"],
        "payload a map": frames(records={"id": 1}),
        "records not maps": frames(records=[1, 2]),
        "n too large": frames({**HEADER, "n": 10**12}),
        "n too small": frames({**HEADER, "n": 1}),
        "three frames": [*good, b""],
        "one frame": good[:1],
        "eos with a payload": [eos, good[1]],
        "unknown ack": frames({**HEADER, "ack": "ipc:///tmp/elsewhere"}),
        "no ack when acked": frames({**HEADER, "ack": None}),
        "ack when at-most-once": frames(),
        "huge array claim": [good[0], b"\xdd\xff\xff\xff\xff\x01"],
        "bool as count": frames({**HEADER, "n": True}, RECORDS[:1]),
    }[case]
    with pytest.raises(wire.Malformed):
        wire.read_message(bad, PEERS, acked=case != "ack when at-most-once")


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random damage: a cut, flipped bytes, inserted or deleted bytes, or noise."""
    choice = rng.randrange(5)
    if choice == 0 or not data:
        return data[: rng.randrange(len(data) + 1)]
    buf = bytearray(data)
    if choice == 1:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif choice == 2:
        buf[rng.randrange(len(buf) + 1):0] = rng.randbytes(rng.randint(1, 8))
    elif choice == 3:
        del buf[rng.randrange(len(buf))]
    else:
        return rng.randbytes(rng.randint(0, 64))
    return bytes(buf)


def test_random_damage_raises_only_malformed() -> None:
    """20,000 damaged messages of every kind: each either raises Malformed or passes typed."""
    rng = random.Random(11)
    good = frames()
    ack = msgpack.packb({"k": "a", "e": "default>normalizer", "ep": 7, "s": [1, 2], "from": "normalizer.0"})
    hb = wire.control("hb", pid=1, records_in=5, stats={"a": 1}, latency_buckets=[0, 1], blocked=False)
    connect = wire.control("connect", edge="default>consumer", endpoints=["ipc:///x"])
    command = msgpack.packb({"cmd": "status"})
    passed = 0
    for _ in range(20_000):
        try:
            header, records = wire.read_message([mutate(rng, good[0]), mutate(rng, good[1])][: rng.choice((1, 2, 2, 2))],
                                                PEERS, acked=True)
            assert header["ack"] == PEER and all(type(r) is dict for r in records or [])
            passed += 1
        except wire.Malformed:
            pass
        for read, raw in ((wire.read_ack, ack), (wire.read_stage_message, hb), (wire.read_supervisor_message, connect),
                          (wire.read_command, command)):
            try:
                assert type(read(mutate(rng, raw))) is dict
            except wire.Malformed:
                pass
    assert passed < 2_000, "most damage must be caught"


def test_acks_and_control_messages_are_typed() -> None:
    ok = {"k": "a", "e": "x", "ep": 1, "s": [1, 2], "from": "n.0"}
    assert wire.read_ack(msgpack.packb(ok)) == ok
    for bad in ({**ok, "s": ["1"]}, {**ok, "s": 3}, {**ok, "k": "d"}, {**ok, "ep": "1"}, [ok]):
        with pytest.raises(wire.Malformed):
            wire.read_ack(msgpack.packb(bad))
    assert wire.read_stage_message(wire.control("hb", pid=3, records_in=1))["op"] == "hb"
    for bad_msg in ({"op": "hb"}, {"op": "hb", "pid": 3, "records_in": "many"}, {"op": "nope", "pid": 3},
                    {"op": "hb", "pid": 3, "stats": [1]}, {"op": "hb", "pid": 3, "latency_buckets": [0.5]}, {"pid": 3}):
        with pytest.raises(wire.Malformed):
            wire.read_stage_message(msgpack.packb(bad_msg))
    with pytest.raises(wire.Malformed):
        wire.read_supervisor_message(wire.control("connect", edge="e", endpoints=[1]))
    with pytest.raises(wire.Malformed):
        wire.read_command(msgpack.packb({"cmd": 1}))


def test_rejects_count_exactly_and_log_a_bounded_number_of_lines() -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        rejects = wire.Rejects()
        for i in range(5_000):
            rejects.drop("input" if i % 2 else "ack", "bad")
        rejects.flush()
    finally:
        logger.remove(sink)
    assert rejects.total == 5_000 and rejects.counts == {"input": 2_500, "ack": 2_500}
    assert wire.LOG_FIRST <= len(lines) <= wire.LOG_FIRST + 2


# -- the stage runtime: what it does with what it cannot use ------------------------------------

class Odd(Stage):
    """A transform whose stats() returns what its test sets."""

    def __init__(self) -> None:
        self.result: Any = {}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return batch

    def stats(self) -> Any:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def runtime(tmp_path: Path) -> Any:
    ctx = zmq.Context.instance()
    sup = ctx.socket(zmq.ROUTER)
    sup.bind(f"ipc://{tmp_path}/stages")
    spec = StageSpec(name="odd", replica=0, replicas=1, type="x:Odd", options={}, run_dir=str(tmp_path),
                     config_dir=str(tmp_path), control=f"ipc://{tmp_path}/stages", input=f"ipc://{tmp_path}/i",
                     ack=f"ipc://{tmp_path}/a", edges=[EdgeSpec("default>sink", "default", "sink", [f"ipc://{tmp_path}/s"])],
                     ack_peers=[PEER], max_message_bytes=4096)
    rt = StageRuntime(spec, Odd())
    rt.bind()
    sup.setsockopt(zmq.RCVTIMEO, 5000)

    def beat() -> dict[str, Any]:
        rt.heartbeat()
        return wire.read_stage_message(sup.recv_multipart()[1])

    yield rt, beat
    rt.close()
    sup.close(linger=0)


def test_unpackable_stats_are_sent_as_text_and_reported_once(runtime: Any) -> None:
    rt, beat = runtime
    rt.stage.result = {"fine": 1, "odd": object(), "big": 2**70, (1, 2): "tuple key"}
    msg = beat()
    assert msg["stats"]["fine"] == 1 and msg["stats"]["odd"].startswith("<object") and msg["stats"]["big"] == str(2**70)
    assert "msgpack cannot carry" in msg["last_error"]
    rt.last_error = "a later record error"
    for result in ([1, 2], RuntimeError("boom"), {"huge": "x" * (wire.STATS_MAX_BYTES + 1)}):
        rt.stage.result = result
        msg = beat()
        assert msg["last_error"] == "a later record error", "reported once, not on every beat"
    assert msg["stats"] == {}
    rt.stage.result = RuntimeError("boom")
    assert beat()["stats"] == {"stats_error": "boom"}


def test_malformed_input_is_counted_and_dropped(runtime: Any) -> None:
    rt, beat = runtime
    rt.inputs.handle(frames({**HEADER, "ack": "ipc:///tmp/unknown"}))
    rt.inputs.handle([b"\x00junk"])
    rt.inputs.handle(frames())
    assert rt.rejects.counts == {"input": 2} and rt.records_in == 2
    assert set(rt.acks_out) <= PEERS and not rt.acks.socks
    assert beat()["malformed"] == 2


def test_ack_sockets_only_towards_peers_and_closed_when_they_go(runtime: Any) -> None:
    rt, _ = runtime
    rt.inputs.handle([msgpack.packb({**HEADER, "k": "eos"})])    # an end-of-stream is confirmed ...
    assert not rt.ledger.eos_headers
    rt.end_step(0.0)                                              # ... once it is in the state file
    assert load_state(rt.state_path)["eos"] == [PEER]
    rt.flush_acks()
    assert set(rt.acks.socks) == {PEER}
    rt.set_ack_peers(["ipc:///run/a.generator.1"])
    assert not rt.acks.socks, "the socket towards a sender that is gone is closed"


def test_batches_over_the_size_limit_are_split_and_an_oversized_record_dead_lettered(runtime: Any) -> None:
    rt, _ = runtime
    edge = rt.edges[0]
    records = [{"id": i, "pad": "x" * 300} for i in range(40)]     # ~13 KB, limit 4 KB
    edge.cut(records, None)
    sizes = [len(ob.frames[1]) for ob in edge.outq]
    assert len(sizes) > 1 and max(sizes) <= 4096
    assert [r["id"] for ob in edge.outq for r in msgpack.unpackb(ob.frames[1])] == list(range(40))
    assert [ob.seq for ob in edge.outq] == list(range(1, len(sizes) + 1))
    edge.cut([{"id": 99, "pad": "x" * 5000}], None)
    assert len(edge.outq) == len(sizes) and rt.dead == 1 and "max_message_mb" in rt.last_error


# -- columnar batches: structured mutations of valid headers -------------------------------------

def columnar_message(rng: random.Random, n: int | None = None, ack: str = PEER, ident: int = 0) -> list[bytes]:
    """A valid columnar DATA message of ``n`` records: ids, vectors of a random width, a float32,
    an int32, a bool and a list column (ids from ``ident``)."""
    from streampipe.stages.columns import Columns

    n = rng.randint(1, 40) if n is None else n
    width = rng.randint(1, 9)
    records = [{"id": ident + i, "x": [float(i)] * width, "y": rng.randrange(2), "ok": i % 2 == 0,
                "tag": rng.choice(["a", 1, None, [1, 2]])} for i in range(n)]
    cols = Columns.from_records(records)
    cols = cols.with_column("f", np.arange(n, dtype="<f4")).with_column("k", np.arange(n, dtype="<i4"))
    return wire.data_frames({**HEADER, "n": n, "lo": 1}, cols)


def mutate_columnar(rng: random.Random, good: list[bytes]) -> list[bytes]:
    """One structured mutation of a valid columnar message: its header's row count, column list,
    kinds, widths or marks changed, or its frames dropped, added, swapped or resized, so that the
    header and the frames disagree (or, rarely, still agree)."""
    header = msgpack.unpackb(good[0])
    desc, cols, n = header["c"], list(good[1:]), header["n"]
    how = rng.randrange(12)
    if how == 0:      # the row count, against unchanged columns
        header["n"] = rng.choice([0, 1, n - 1, n + 1, 2 * n, 10**9, 2**31, 2**62, -1])
    elif how == 1:    # no columns at all, any count (issue 21: the 145-byte frame)
        header["c"], cols = [], []
        header["n"] = rng.choice([1, 1000, 10**9, 2**62])
    elif how == 2:    # a column descriptor dropped, its frame kept or not
        i = rng.randrange(len(desc))
        del desc[i]
        if rng.random() < 0.5:
            del cols[i]
    elif how == 3:    # descriptors swapped (each now describes the other's frame)
        i, j = rng.sample(range(len(desc)), 2)
        desc[i], desc[j] = desc[j], desc[i]
    elif how == 4:    # a kind changed to another wire kind
        d = rng.choice(desc)
        d[1] = rng.choice([*WIRE_DTYPES_ALL, "msgpack"])
    elif how == 5:    # a width changed
        d = rng.choice(desc)
        d[2] = rng.choice([[], [0], [1], [2], [d[2][0] + 1] if d[2] else [3], [2**30], [1, 1], [-1]])
    elif how == 6:    # a frame cut, grown or emptied
        i = rng.randrange(len(cols))
        cols[i] = rng.choice([cols[i][: rng.randrange(len(cols[i]) + 1)], cols[i] + rng.randbytes(rng.randint(1, 16)), b""])
    elif how == 7:    # frames swapped
        i, j = rng.sample(range(len(cols)), 2)
        cols[i], cols[j] = cols[j], cols[i]
    elif how == 8:    # a descriptor added without a frame, or with one
        desc.append([f"extra{rng.randrange(9)}", rng.choice(WIRE_DTYPES_ALL), rng.choice([[], [4]])])
        if rng.random() < 0.5:
            cols.append(rng.randbytes(rng.choice([0, 8 * n, 32 * n])))
    elif how == 9:    # the marks: lowest unacknowledged above the batch's seq
        header["lo"] = header["seq"] + rng.randint(1, 2**40)
    elif how == 10:   # a descriptor duplicated, with its frame
        i = rng.randrange(len(desc))
        desc.append(list(desc[i]))
        cols.append(cols[i])
    else:             # the count and one frame changed together, consistently or not
        header["n"] = n2 = rng.choice([n + 1, 2 * n, 0])
        i = next((k for k, d in enumerate(desc) if d[1] == "<i8"), 0)
        cols[i] = np.arange(n2, dtype="<i8").tobytes()
    return [msgpack.packb(header), *cols]


WIRE_DTYPES_ALL = ["<i8", "<f8", "<f4", "<i4", "|b1"]


def test_a_columnar_header_with_no_columns_and_a_huge_count_is_refused() -> None:
    """Issue 21: 145 bytes (no column, n = 10**9) made the normalizer build a list of 10**9 records."""
    frame = msgpack.packb({**HEADER, "n": 10**9, "c": [], "lo": 1, "o": "generator.0/0", "w": 12})
    with pytest.raises(wire.Malformed, match="10+ records in 0 columns of 0 bytes"):
        wire.read_message([frame], PEERS, acked=True)
    zero_width = [msgpack.packb({**HEADER, "n": 10**9, "c": [["x", "<f8", [0]]]}), b""]
    with pytest.raises(wire.Malformed):
        wire.read_message(zero_width, PEERS, acked=True)


def test_columnar_edge_cases_still_cross_the_wire() -> None:
    """What a sender may legitimately send still passes: fields-less records, empty vectors."""
    from streampipe.stages.columns import Columns

    for cols in (Columns({}, 3), Columns({"x": np.zeros((3, 0))}, 3), Columns({}, 0)):
        _, got = wire.read_message(wire.data_frames({**HEADER, "n": len(cols)}, cols), PEERS, acked=True)
        assert got is not None and len(got) == len(cols)
        assert (got.to_records() if isinstance(got, Columns) else got) == cols.to_records()


COLUMNAR_CASES = 3000     # CI; `STREAMPIPE_FUZZ_CASES=1000000 pytest -k structured` for a long run by hand


def test_structured_mutations_of_columnar_headers_are_refused_or_consistent() -> None:
    """Each mutated message raises Malformed, or passes with every column exactly ``n`` long and
    nothing bigger than its frames: never an allocation the frames do not pay for."""
    import os
    import tracemalloc

    from streampipe.stages.columns import Columns

    rng = random.Random(21)
    cases = int(os.environ.get("STREAMPIPE_FUZZ_CASES", COLUMNAR_CASES))
    refused = 0
    tracemalloc.start()
    try:
        for _ in range(cases):
            msg = mutate_columnar(rng, columnar_message(rng))
            size = sum(len(f) for f in msg)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                header, cols = wire.read_message(msg, PEERS, acked=True)
            except wire.Malformed:
                refused += 1
                continue
            assert isinstance(cols, Columns) and header["n"] == len(cols) <= size
            assert header.get("lo", 0) <= header["seq"]
            for col in cols.data.values():
                assert len(col) == len(cols)
            records = cols.to_records()
            assert len(records) == header["n"]
            peak = tracemalloc.get_traced_memory()[1] - base
            assert peak < 2_000 * size + (1 << 20), f"{peak} bytes allocated for a {size}-byte message"
    finally:
        tracemalloc.stop()
    assert refused > cases * 0.6, f"only {refused} of {cases} mutations refused"
