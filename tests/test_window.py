"""window: tumbling, sliding and session windows per key, against a brute-force reference.

The reference windows the same records after the fact, in plain Python: every window of every key,
closed when the final watermark (the greatest event time less ``lateness``) reached its end. The
stage must emit exactly those, each once, with the same aggregates, whatever the batches, the
disorder (within ``lateness``), the form of the batch (records or columns), snapshot/restore in the
middle, or, in a pipeline, two replicas partitioned by key SIGKILLed again and again.
"""

from __future__ import annotations

import math
import os
import random
import signal
import textwrap
from collections import Counter, defaultdict
from typing import Any

import msgpack
import pytest

from streampipe.stages.api import StageContext
from streampipe.stages.builtins.window import Window
from streampipe.stages.columns import Columns
from streampipe.stages.keys import replica_of_key, window_id
from tests.conftest import PACED_SOURCE, wait_for

AGG = {"n": "count", "spent": "sum:amount", "avg": "mean:amount", "low": "min:amount", "high": "max:amount"}


def reference(records: list[dict[str, Any]], kind: str, size: float = 0, slide: float = 0, gap: float = 0,
              lateness: float = 0, key: str = "user", time: str = "t", ended: bool = False) -> dict[int, dict[str, Any]]:
    """Every window the final watermark closed, by id: what the stage must have emitted; with
    ``ended`` (the stream ended, so ``finish`` closed the rest) every window."""
    by_key: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_key[r[key]].append(r)
    watermark = math.inf if ended else max(r[time] for r in records) - lateness
    out: dict[int, dict[str, Any]] = {}

    def emit(k: Any, start: float, end: float, members: list[dict[str, Any]]) -> None:
        amounts = [m["amount"] for m in members]
        out[window_id(k, start)] = {"id": window_id(k, start), key: k, "window_start": start, "window_end": end,
                                    "n": len(members), "spent": float(sum(amounts)), "avg": sum(amounts) / len(amounts),
                                    "low": min(amounts), "high": max(amounts)}

    for k, rs in by_key.items():
        if kind == "session":
            rs = sorted(rs, key=lambda r: r[time])
            chain = [rs[0]]
            for r in rs[1:] + [None]:
                if r is not None and r[time] - chain[-1][time] <= gap:
                    chain.append(r)
                    continue
                end = chain[-1][time] + gap
                if end < watermark:
                    emit(k, chain[0][time], end, chain)
                if r is not None:
                    chain = [r]
            continue
        slide = slide or size
        windows: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for r in rs:
            t = r[time]
            for j in range(math.floor((t - size) / slide) + 1, math.floor(t / slide) + 1):
                windows[j * slide].append(r)
        for start, members in windows.items():
            if start + size <= watermark:
                emit(k, start, start + size, members)
    return out


def stream(rng: random.Random, n: int, keys: int, disorder: float, late_every: int = 0) -> list[dict[str, Any]]:
    """Records at about 1 per time unit, arriving out of order by up to ``disorder``; with
    ``late_every``, every such record is 60 units older than its neighbours (later than any lateness here)."""
    records = []
    for i in range(n):
        t = i * 0.5 + rng.choice([0, 0, 0, 1.5, 7.25])                       # some ties, some gaps
        records.append({"id": i, "user": f"u{rng.randrange(keys)}", "t": t, "amount": rng.randrange(1, 100)})
    arrived = [r for _, r in sorted(((r["t"] + rng.uniform(0, disorder), r) for r in records), key=lambda x: x[0])]
    if late_every:
        for j in range(late_every, len(arrived), late_every):
            arrived[j] = {**arrived[j], "t": arrived[j]["t"] - 60, "late": True}
    return arrived


def run_in_process(make: Any, records: list[dict[str, Any]], rng: random.Random, columnar: bool = False,
                   restores: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[Any, str]]]:
    """Feed ``records`` in random batches (as columns when asked), restoring a fresh instance from a
    msgpack'd snapshot now and then; returns (results, late records, dead letters)."""
    w = make()
    w.context = StageContext(outputs=("default", "late"))
    results, late, dead = [], [], []
    at = 0
    while at < len(records):
        size = rng.randint(1, 200)
        part = records[at:at + size]
        at += size
        out = w.process(Columns.from_records(part) if columnar else part)
        for r in out:
            (late if w.route(r) == "late" else results).append(r)
        dead += [(r, why) for r, why, _ in w.take_rejected()]
        if restores and rng.random() < 0.15:
            state = msgpack.unpackb(msgpack.packb(w.snapshot()), strict_map_key=False)
            w = make()
            w.context = StageContext(outputs=("default", "late"))
            w.restore(state)
    return results, late, dead


CASES = [
    ("tumbling", {"size": 10.0}),
    ("sliding", {"size": 10.0, "slide": 2.5}),
    ("session", {"gap": 3.0}),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind,shape", CASES, ids=[c[0] for c in CASES])
def test_windows_equal_the_brute_force_reference_whatever_the_batches_and_restores(kind: str, shape: dict[str, float],
                                                                                   seed: int) -> None:
    rng = random.Random(seed)
    records = stream(rng, 4000, keys=25, disorder=4.0, late_every=397)
    on_time = [r for r in records if not r.get("late")]
    results, late, dead = run_in_process(lambda: Window(time="t", key="user", kind=kind, lateness=5.0, aggregate=AGG, **shape),
                                         records, rng)
    assert not dead
    ids = Counter(r["id"] for r in results)
    assert not [i for i, c in ids.items() if c > 1], "a window emitted twice"
    expected = reference(on_time, kind, lateness=5.0, **shape)
    assert {r["id"]: r for r in results} == expected
    assert len(expected) > 100
    assert sorted(r["id"] for r in late) == sorted(r["id"] for r in records if r.get("late"))   # each late one, on `late`


@pytest.mark.parametrize("kind,shape", CASES, ids=[c[0] for c in CASES])
def test_finish_closes_every_open_window_at_the_end_of_the_stream_the_same_after_a_restore(kind: str,
                                                                                         shape: dict[str, float]) -> None:
    rng = random.Random(11)
    records = stream(rng, 3000, keys=20, disorder=4.0)
    make = lambda: Window(time="t", key="user", kind=kind, lateness=5.0, aggregate=AGG, **shape)   # noqa: E731
    w = make()
    w.context = StageContext(outputs=("default", "late"))
    results = []
    for at in range(0, len(records), 100):
        results += w.process(records[at:at + 100])
    before = msgpack.unpackb(msgpack.packb(w.snapshot()), strict_map_key=False)
    last = list(w.finish())
    assert last and all(w.route(r) == "default" for r in last)
    expected = reference(records, kind, lateness=5.0, ended=True, **shape)
    assert len(results) + len(last) == len(expected) and {r["id"]: r for r in results + last} == expected
    assert len(expected) > len(reference(records, kind, lateness=5.0, **shape)), "the last windows were open"
    again = make()          # a replica killed before its end runs finish again, on the snapshot taken before it
    again.restore(before)
    remade = list(again.finish())
    assert len(remade) == len(last) and {r["id"]: r for r in remade} == {r["id"]: r for r in last}
    assert list(w.finish()) == [] and w.stats()["open"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_a_columnar_batch_aggregates_with_numpy_to_the_same_results(seed: int) -> None:
    rng = random.Random(seed)
    records = stream(rng, 5000, keys=40, disorder=2.0, late_every=501)
    make = lambda: Window(time="t", key="user", size=10.0, lateness=3.0, aggregate=AGG)   # noqa: E731
    by_records = run_in_process(make, records, random.Random(seed), columnar=False)
    by_columns = run_in_process(make, records, random.Random(seed), columnar=True)
    assert by_columns[0] == by_records[0] and len(by_columns[0]) > 100
    assert sorted(r["id"] for r in by_columns[1]) == sorted(r["id"] for r in by_records[1]) != []


def test_bad_records_and_options_are_refused_with_the_reason() -> None:
    w = Window(time="t", key="user", size=5, aggregate={"s": "sum:amount"})
    w.context = StageContext(outputs=("default",))       # nothing reads window.late: late records are dead letters
    w.process([{"user": "a", "t": 100, "amount": 1}, {"user": "a", "t": "soon", "amount": 1}, {"t": 3, "amount": 1},
               {"user": "a", "t": 101, "amount": "x"}, {"user": "a", "t": 2, "amount": 1}])
    reasons = [why for _, why, _ in w.take_rejected()]
    assert reasons == ["no event time: field 't' must be a finite number", "no key: field 'user' is missing",
                       "field 'amount' must be a finite number (it is aggregated)",
                       "late: event time 2 behind the watermark 100: its window [0, 5) closed"]
    for kwargs, needle in [({"kind": "session", "size": 3}, "session window takes gap"),
                           ({"kind": "sliding", "size": 10}, "sliding window takes slide"),
                           ({"size": 10, "aggregate": {"x": "median:amount"}}, "not one of count, sum"),
                           ({"size": 10, "aggregate": {"x": "sum"}}, "sum needs a field"),
                           ({"size": 10, "lateness": -1}, "lateness must be >= 0")]:
        with pytest.raises(ValueError, match=needle):
            Window(time="t", **kwargs)


MODULE = '''
from paced import Paced


class Clicks(Paced):
    """A user out of 40, an event time that follows the record id with a bounded disorder (a
    deterministic shuffle within blocks of 8)."""

    def record(self, i):
        block, j = divmod(i, 8)
        n = block * 8 + (j * 5) % 8                 # within a block of 8, a fixed permutation
        # event time in seconds at 4,000 a second, and a pause of half a second every 5,000 (sessions end there)
        return {"id": i, "user": f"u{(i * 7919) % 40}", "t": n / 4000 + (i // 5000) * 0.5, "amount": (i * 31) % 97 + 1}
'''

PIPELINE = """
pipeline: windows
defaults: {heartbeat_timeout: 60, ack_timeout: 0.5}
stages:
  clicks: {type: "clickstream:Clicks", options: {count: COUNT, rate: 4000}}
  tag:
    type: "clickstream:tag"
    inputs: [clicks]
    replicas: 2
  per_user:
    type: window
    inputs: [tag]
    replicas: 2
    partition: key
    key: user
    options: {key: user, time: t, kind: KIND, SHAPE, lateness: 3,
              aggregate: {n: count, spent: "sum:amount", avg: "mean:amount", low: "min:amount", high: "max:amount"}}
  results: {type: consumer, inputs: [per_user], options: {output: output/windows.jsonl}}
  seen: {type: consumer, inputs: [tag], options: {output: output/records.jsonl}}
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,shape", [("tumbling", "size: 0.25"), ("session", "gap: 0.2")], ids=["tumbling", "session"])
def test_two_replicas_partitioned_by_key_emit_each_window_once_exactly_through_sigkills(pipeline, kind: str,
                                                                                        shape: str) -> None:
    count = 40000
    p = pipeline(PIPELINE.replace("COUNT", str(count)).replace("KIND", kind).replace("SHAPE", shape))
    (p.folder / "paced.py").write_text(PACED_SOURCE)
    (p.folder / "clickstream.py").write_text(MODULE + textwrap.dedent('''
        def tag(record):                     # a stateless hop with 2 replicas: the window's input interleaves
            return {**record, "hop": 1}
    '''))
    p.up()
    kills = 0
    for target in (0, 1, 0, 1):
        wait_for(lambda target=target, k=kills: p.row("per_user", target)["stats"].get("emitted", 0) > 20 * (k + 1),
                 timeout=90, what="windows emitted")
        os.kill(p.row("per_user", target)["pid"], signal.SIGKILL)
        kills += 1
        wait_for(lambda target=target, k=kills: p.row("per_user", target)["state"] == "running"
                 and p.row("per_user", target)["restarts"] >= (k + 1) // 2, timeout=60, what="the replica restarted")
    wait_for(lambda: p.row("clicks")["state"] == "completed", timeout=120, what="the source completed")
    wait_for(lambda: len(p.output_records("output/records.jsonl")) == count, timeout=120, what="every record seen")

    expected = expected_windows(p, kind, replicas=2)
    restarts = sum(p.row("per_user", i)["restarts"] for i in (0, 1))
    late = sum(p.row("per_user", i)["stats"].get("late", 0) for i in (0, 1))
    p.down()
    assert_each_window_once(p.output_records("output/windows.jsonl"), expected, late)
    assert restarts >= 4


def expected_windows(p: Any, kind: str, replicas: int) -> dict[int, dict[str, Any]]:
    """The reference windows of what the sink ``seen`` holds, once the window's sink has as many.
    What each replica was given decides its watermark: each replica's keys are windowed apart; the
    stream is finite, so its end closed the last windows too."""
    records = [r for r in p.output_records("output/records.jsonl") if not r.get("too_late")]   # late by design
    expected: dict[int, dict[str, Any]] = {}
    for replica in range(replicas):
        mine = [r for r in records if replica_of_key(r["user"], replicas) == replica]
        shape = {"tumbling": {"size": 0.25}, "sliding": {"size": 0.5, "slide": 0.25}, "session": {"gap": 0.2}}[kind]
        expected.update(reference(mine, kind, lateness=3.0, ended=True, **shape))
    wait_for(lambda: len(p.output_records("output/windows.jsonl")) >= len(expected), timeout=120,
             what=f"{len(expected)} windows at the sink")
    return expected


def assert_each_window_once(results: list[dict[str, Any]], expected: dict[int, dict[str, Any]], late: int) -> None:
    ids = Counter(r["id"] for r in results)
    assert not [i for i, c in ids.items() if c > 1], "a window written twice"
    got = {r["id"]: {k: v for k, v in r.items() if k in ("id", "user", "window_start", "window_end", *AGG)} for r in results}
    assert late == 0, f"{late} records later than the lateness"
    assert got == expected
    assert len(expected) > 200
