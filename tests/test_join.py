"""join and enrich: two inputs joined by key in event time, against brute-force references.

The references join the same records after the fact, in plain Python, by the rule the stages
state. join: every pair of records (not late) of one key whose times are at most ``within``
apart; with ``how: left``, every left record without a partner whose time plus ``within`` the
right input's final watermark (its greatest time less ``lateness``) passed. enrich: every stream
record the table's final watermark passed, with its key's row of the greatest time at or below
its own. The stages must give exactly those, each once, whatever the batches, the interleaving
of the two inputs, snapshot/restore in the middle, a rescale 2 -> 3 through ``rescale``, or, in a
pipeline, two replicas partitioned by key SIGKILLed again and again.
"""

from __future__ import annotations

import bisect
import os
import random
import signal
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from streampipe.launcher.config import load_config
from streampipe.launcher.errors import ConfigError
from streampipe.stages.api import StageContext
from streampipe.stages.builtins.join import Enrich, Join, pair_id
from streampipe.stages.keys import replica_of_key
from tests.conftest import PACED_SOURCE, wait_for
from tests.test_keyed_rescale import kill, scale

Records = list[dict[str, Any]]
LATENESS, WITHIN = 5.0, 3.0


def arrival(rng: random.Random, records: Records, disorder: float, late_every: int = 0) -> Records:
    """``records`` out of their time order by up to ``disorder``; with ``late_every``, every such
    one 60 units older than its neighbours (later than the lateness allows) and marked ``late``."""
    out = [r for _, r in sorted(((r["t"] + rng.uniform(0, disorder), r) for r in records), key=lambda x: x[0])]
    for j in range(late_every, len(out), late_every or len(out) + 1):
        out[j] = {**out[j], "t": out[j]["t"] - 60, "late": True}
    return out


def two_streams(rng: random.Random, n: int, keys: int) -> tuple[Records, Records]:
    """Left and right records at about 2 per time unit each over ``keys`` keys, some keys only on one
    side, arriving out of order within the lateness, a few later than it."""
    left = [{"id": i, "ad": f"a{rng.randrange(keys)}", "t": i * 0.5 + rng.choice([0, 0, 1.5, 4.25]), "click": i % 7}
            for i in range(n)]
    right = [{"id": 100_000 + j, "ad": f"a{rng.randrange(keys + 3)}", "t": j * 0.5 + rng.choice([0, 0.5, 2.0]),
              "slot": j % 5} for j in range(n)]
    return arrival(rng, left, 4.0, late_every=397), arrival(rng, right, 4.0, late_every=431)


def batches(rng: random.Random, sides: dict[str, Records]) -> list[tuple[str, Records]]:
    """The two inputs' records in random batches, the batches of the two interleaved at random."""
    at = dict.fromkeys(sides, 0)
    out = []
    while any(at[s] < len(sides[s]) for s in sides):
        open_ = [s for s in sides if at[s] < len(sides[s])]       # by what is left: both sides go on in step
        side = rng.choices(open_, weights=[len(sides[s]) - at[s] for s in open_])[0]
        size = rng.randint(1, 60)
        out.append((side, sides[side][at[side]:at[side] + size]))
        at[side] += size
    return out


def pair_row(left: dict[str, Any], right: dict[str, Any] | None, right_fields: tuple[str, ...] = ("id", "ad", "t")) -> dict[str, Any]:
    row = dict(left)
    for k, v in (right.items() if right is not None else dict.fromkeys(right_fields).items()):
        row[f"right_{k}" if k in left else k] = v
    row["left_id"], row["id"] = left["id"], pair_id(left["id"], None if right is None else right["id"])
    return row


def join_reference(left: Records, right: Records, how: str, watermark_right: Callable[[str], float],
                   within: float = WITHIN) -> dict[int, Any]:
    """Every pair (and with ``how: left``, every settled left record without one), by id.
    ``watermark_right(key)``: the final right watermark of the replica that holds ``key``."""
    left, right = [r for r in left if not r.get("late")], [r for r in right if not r.get("late")]
    by_key: dict[str, Records] = {}
    for r in sorted(right, key=lambda r: r["t"]):
        by_key.setdefault(r["ad"], []).append(r)
    times = {k: [r["t"] for r in rs] for k, rs in by_key.items()}
    out = {}
    for lt in left:
        ts, rs = times.get(lt["ad"], []), by_key.get(lt["ad"], [])
        near = rs[bisect.bisect_left(ts, lt["t"] - within - 1):bisect.bisect_right(ts, lt["t"] + within + 1)]
        partners = [r for r in near if abs(r["t"] - lt["t"]) <= within]
        for r in partners:
            row = pair_row(lt, r)
            out[row["id"]] = row
        if not partners and how == "left" and watermark_right(lt["ad"]) > lt["t"] + within:
            row = pair_row(lt, None)
            out[row["id"]] = row
    return out


class Replicas:
    """The replicas of one stage in-process: a batch goes to each by its records' keys, as
    ``partition: key`` sends them; ``rescale`` changes their count through the stage's own."""

    def __init__(self, make: Callable[[], Any], n: int, rng: random.Random, names: dict[str, str]) -> None:
        self.make, self.rng, self.names = make, rng, names
        self.stages = [self.fresh() for _ in range(n)]
        self.results: Records = []
        self.late: Records = []
        self.dead: list[tuple[dict[str, Any], str]] = []

    def fresh(self, state: dict[str, Any] | None = None) -> Any:
        stage = self.make()
        stage.context = StageContext(outputs=("default", "late"))
        if state is not None:
            stage.restore(msgpack.unpackb(msgpack.packb(state), strict_map_key=False))
        return stage

    def feed(self, side: str, batch: Records, key: str = "ad") -> None:
        n = len(self.stages)
        for i, stage in enumerate(self.stages):
            part = [r for r in batch if replica_of_key(r[key], n) == i]
            stage.context.input = self.names[side]
            for r in stage.process(part):
                (self.late if stage.route(r) == "late" else self.results).append(r)
            self.dead += [(r, why) for r, why, _ in stage.take_rejected()]
            if self.rng.random() < 0.05:            # a restart: a fresh instance from the msgpack'd snapshot
                self.stages[i] = self.fresh(stage.snapshot())

    def rescale(self, n: int) -> None:
        states = type(self.stages[0]).rescale([s.snapshot() for s in self.stages], n)
        assert len(states) == n
        self.stages = [self.fresh(state) for state in states]


def run(make: Callable[[], Any], names: dict[str, str], feed: list[tuple[str, Records]], rng: random.Random,
        rescale_at: int | None) -> Replicas:
    """Feed the batches to 2 replicas, rescaled to 3 at batch ``rescale_at`` (None: 1 replica throughout)."""
    replicas = Replicas(make, 1 if rescale_at is None else 2, rng, names)
    for n, (side, batch) in enumerate(feed):
        if n == rescale_at:
            replicas.rescale(3)
        replicas.feed(side, batch)
    return replicas


def final_watermarks(feed: list[tuple[str, Records]], side: str, rescale_at: int | None) -> Callable[[str], float]:
    """The final watermark of ``side`` in the replica holding each key: its greatest time less the
    lateness, counting the greatest any replica had at the rescale (every new replica starts there)."""
    before = [r["t"] for s, b in feed[:rescale_at or 0] for r in b if s == side]
    after = [r for s, b in feed[rescale_at or 0:] for r in b if s == side]
    n = 1 if rescale_at is None else 3
    newest = [max([*before, *(r["t"] for r in after if replica_of_key(r["ad"], n) == i)]) for i in range(n)]
    return lambda key: newest[replica_of_key(key, n)] - LATENESS


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rescaled", [False, True], ids=["one-replica", "rescaled-2-to-3"])
@pytest.mark.parametrize("how", ["inner", "left"])
def test_join_equals_the_brute_force_join_whatever_the_batches_restores_and_rescale(how: str, rescaled: bool,
                                                                                    seed: int) -> None:
    rng = random.Random(seed)
    left, right = two_streams(rng, 3000, keys=12)
    feed = batches(rng, {"left": left, "right": right})
    rescale_at = len(feed) // 2 if rescaled else None
    got = run(lambda: Join(left="clicks", right="views", key="ad", time="t", within=WITHIN, lateness=LATENESS, how=how),
              {"left": "clicks", "right": "views"}, feed, rng, rescale_at)
    assert not got.dead
    ids = Counter(r["id"] for r in got.results)
    assert not [i for i, c in ids.items() if c > 1], "a pair emitted twice"
    expected = join_reference(left, right, how, final_watermarks(feed, "right", rescale_at))
    assert {r["id"]: r for r in got.results} == expected
    pairs = sum(1 for r in expected.values() if r["right_id"] is not None)
    assert pairs > 1500 and (how == "inner" or len(expected) - pairs > 300)
    assert sorted(r["id"] for r in got.late) == sorted(r["id"] for r in left + right if r.get("late"))


def table_streams(rng: random.Random, n: int, keys: int) -> tuple[Records, Records]:
    """Orders at about 2 per time unit, and a table of customers updated at about 1 per time unit
    (two rows at each even time: one customer's two updates at one time now and then), both out of
    order within the lateness, a few later than it."""
    orders = [{"id": i, "customer": f"c{rng.randrange(keys)}", "t": i * 0.5 + rng.choice([0, 0.25, 3.0]), "total": i % 13}
              for i in range(n)]
    rows = [{"id": 500_000 + j, "customer": f"c{rng.randrange(keys + 5)}", "t": float(j - j % 2), "tier": j}
            for j in range(n // 2)]
    return arrival(rng, orders, 4.0, late_every=389), arrival(rng, rows, 4.0, late_every=211)


def enrich_reference(orders: Records, rows: Records, how: str, watermark_table: Callable[[str], float]) -> dict[int, Any]:
    orders, rows = [r for r in orders if not r.get("late")], [r for r in rows if not r.get("late")]
    by_key: dict[str, list[tuple[float, int, dict[str, Any]]]] = {}
    for n, r in enumerate(rows):
        by_key.setdefault(r["customer"], []).append((r["t"], n, r))
    out = {}
    for o in orders:
        if not o["t"] < watermark_table(o["customer"]):
            continue                                     # still waiting for the table
        versions = [v for v in by_key.get(o["customer"], []) if v[0] <= o["t"]]
        row = max(versions, key=lambda v: (v[0], v[1]))[2] if versions else None   # a tie: the later to arrive
        if row is None and how == "inner":
            continue
        enriched = dict(o)
        for k, v in (row.items() if row is not None else dict.fromkeys(("id", "customer", "t")).items()):
            enriched[f"table_{k}" if k in o else k] = v
        out[o["id"]] = enriched
    return out


def enrich_final_watermarks(feed: list[tuple[str, Records]], rescale_at: int | None) -> Callable[[str], float]:
    renamed = [(side, [{**r, "ad": r["customer"]} for r in batch]) for side, batch in feed]
    return final_watermarks(renamed, "table", rescale_at)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rescaled", [False, True], ids=["one-replica", "rescaled-2-to-3"])
@pytest.mark.parametrize("how", ["inner", "left"])
def test_enrich_equals_the_brute_force_temporal_join_and_keeps_the_table_small(how: str, rescaled: bool, seed: int) -> None:
    rng = random.Random(seed)
    orders, rows = table_streams(rng, 3000, keys=30)
    feed = batches(rng, {"stream": orders, "table": rows})
    rescale_at = len(feed) // 2 if rescaled else None
    names = {"stream": "orders", "table": "customers"}
    replicas = Replicas(lambda: Enrich(stream="orders", table="customers", key="customer", time="t",
                                       lateness=LATENESS, how=how), 1 if rescale_at is None else 2, rng, names)
    most = 0
    for n, (side, batch) in enumerate(feed):
        if n == rescale_at:
            replicas.rescale(3)
        replicas.feed(side, batch, key="customer")
        most = max(most, sum(s.stats()["table_rows"] for s in replicas.stages))
    assert not replicas.dead
    ids = Counter(r["id"] for r in replicas.results)
    assert not [i for i, c in ids.items() if c > 1], "an order emitted twice"
    expected = enrich_reference(orders, rows, how, enrich_final_watermarks(feed, rescale_at))
    assert {r["id"]: r for r in replicas.results} == expected
    assert len(expected) > 2500 and (how == "inner" or sum(1 for r in expected.values() if r.get("tier") is None) > 5)
    assert most < 35 * 10, f"the table held {most} versions of 35 keys: old ones are not dropped"
    assert sorted(r["id"] for r in replicas.late) == sorted(r["id"] for r in orders + rows if r.get("late"))


def test_rescale_deals_keys_and_takes_the_furthest_watermark() -> None:
    j = Join(left="a", right="b", key="k", time="t", within=1, lateness=0)
    j.context.input = "a"
    j.process([{"id": i, "k": i, "t": float(i)} for i in range(20)])
    states = Join.rescale([j.snapshot(), {}], 3)
    for i, state in enumerate(states):
        keys = [row[0] for row in state["sides"]["left"]["waiting"]]
        assert keys and all(replica_of_key(k, 3) == i for k in keys)
        assert state["sides"]["left"]["newest"] == 19.0 and state["sides"]["right"]["newest"] is None
    assert sorted(k for s in states for k, *_ in s["sides"]["left"]["waiting"]) == list(range(20))
    assert Join.rescale([{}, {}], 2) == [{"sides": {"left": {"waiting": [], "newest": None},
                                                    "right": {"waiting": [], "newest": None}}, "pairs": 0,
                                          "unmatched": 0, "late": 0},
                                         {"sides": {"left": {"waiting": [], "newest": None},
                                                    "right": {"waiting": [], "newest": None}}}]


def test_right_fields_prefix_and_table_fields_shape_the_results() -> None:
    j = Join(key="ad", time="t", within=2, how="left", prefix="view_", right_fields=["slot", "t"])
    j.context = StageContext(inputs=("clicks", "views"))
    j.context.input = "views"
    j.process([{"id": 10, "ad": "a", "t": 1, "slot": 3, "page": "p"}])
    j.context.input = "clicks"
    assert j.process([{"id": 1, "ad": "a", "t": 2}, {"id": 2, "ad": "b", "t": 2}]) == \
        [{"id": pair_id(1, 10), "ad": "a", "t": 2, "slot": 3, "view_t": 1, "left_id": 1}]
    j.context.input = "views"
    assert j.process([{"id": 11, "ad": "c", "t": 9}]) == \
        [{"id": pair_id(2, None), "ad": "b", "t": 2, "slot": None, "view_t": None, "left_id": 2}]
    e = Enrich(key="customer", time="t", table_key="cid", table_time="at", how="inner", table_fields=["tier"])
    e.context = StageContext(inputs=("orders", "customers"))
    e.context.input = "customers"
    e.process([{"id": 100, "cid": "ada", "at": 0, "tier": "gold", "note": "x"}])
    e.context.input = "orders"
    e.process([{"id": 1, "customer": "ada", "t": 3}, {"id": 2, "customer": "bob", "t": 3}])
    e.context.input = "customers"
    assert e.process([{"id": 101, "cid": "ada", "at": 5, "tier": "silver"}]) == [{"id": 1, "customer": "ada", "t": 3, "tier": "gold"}]
    assert (e.stats()["enriched"], e.stats()["missing"], e.stats()["table_rows"]) == (1, 1, 2)


def test_bad_records_and_options_are_refused_with_the_reason() -> None:
    j = Join(key="ad", time="t", right_key="ad_id", within=5)
    j.context = StageContext(inputs=("clicks", "views"), input="views", outputs=("default",))
    j.process([{"id": 1, "ad_id": "x", "t": 100}, {"id": 2, "ad": "x", "t": 3}, {"id": 3, "ad_id": "x", "t": "soon"},
               {"ad_id": "x", "t": 4}, {"id": 4, "ad_id": float("nan"), "t": 4}, {"id": 5, "ad_id": "y", "t": 50}])
    j.context.input = "normalizer.holdout"
    j.process([{"id": 6, "ad": "x", "t": 1}])
    reasons = [why for _, why, _ in j.take_rejected()]
    assert reasons == ["no key: field 'ad_id' is missing (right input)",
                       "no event time: field 't' must be a finite number (right input)",
                       "no id: the right record's id makes the result's (right input)",
                       "field 'ad_id': key nan is not a finite number",
                       "late: event time 50 behind the right input's watermark 100",
                       "from input 'normalizer.holdout', which is neither the left (clicks) nor the right (views)"]
    for kwargs, needle in [({"within": -1}, "within must be >= 0"), ({"within": 1, "lateness": -1}, "lateness must be >= 0"),
                           ({"within": 1, "how": "outer"}, "how must be inner or left"),
                           ({"within": 1, "left": "a", "right": "a"}, "left and right name one input")]:
        with pytest.raises(ValueError, match=needle):
            Join(key="k", time="t", **kwargs)


JOIN_OK = """
stages:
  clicks: {type: generator}
  views: {type: generator}
  j:
    type: join
    inputs: [clicks, views]
    OPTIONS
  sink: {type: consumer, inputs: [j]}
"""


@pytest.mark.parametrize(("options", "line", "message"), [
    ("options: {key: id, time: t, within: 1}\n    replicas: 2", 9,
     "stages.j.partition: a join with replicas must get each key's records in one replica: add partition: key and key: id"),
    ("options: {key: id, time: t, within: 1, right_key: ref}\n    replicas: 2\n    partition: key\n    key: id", 8,
     "stages.j.options.right_key: with replicas both inputs are split by one field (key: id): right_key must be 'id'"),
    ("options: {key: id, time: t, within: 1, left: clickz}", 8,
     "stages.j.options.left: 'clickz' is not an input of 'j' (inputs: clicks, views)"),
    ("options: {key: id, time: t, within: 1, left: views, right: views}", 8,
     "stages.j.options.right: left and right name one input, 'views'"),
])
def test_validate_refuses_a_join_that_cannot_work_naming_field_and_line(tmp_path, options: str, line: int,
                                                                       message: str) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(JOIN_OK.replace("OPTIONS", options))
    with pytest.raises(ConfigError) as info:
        load_config(path, check_stages=False)
    assert f"services.yaml:{line}: {message}" in str(info.value), str(info.value)
    path.write_text(JOIN_OK.replace("inputs: [clicks, views]", "inputs: [clicks]").replace("OPTIONS", "options: {key: id, time: t}"))
    with pytest.raises(ConfigError, match=r"services.yaml:7: stages.j.inputs: a join takes two inputs, its left and its right: inputs names 1"):
        load_config(path, check_stages=False)
    path.write_text(JOIN_OK.replace("OPTIONS", "options: {key: id, time: t, within: 1}\n    replicas: 2\n    partition: key\n    key: id"))
    load_config(path)


# -- pipelines: two user sources, a join of 2 replicas partitioned by key, SIGKILLs ---------------

RECORDS = '''
def click(i):
    """Click i: one of 30 ads, its event time following i with a bounded disorder (blocks of 8)."""
    block, j = divmod(i, 8)
    return {"id": i, "ad": f"a{(i * 7919) % 30}", "t": (block * 8 + (j * 5) % 8) / 4000, "click": i % 7}


def view(i):
    """View i: one of 33 ads (3 never clicked), the same timeline, another disorder."""
    block, j = divmod(i, 8)
    return {"id": 1_000_000 + i, "ad": f"a{(i * 104729) % 33}", "t": (block * 8 + (j * 3) % 8) / 4000 + 0.0005, "slot": i % 5}


def order(i):
    block, j = divmod(i, 8)
    return {"id": i, "customer": f"c{(i * 7919) % 25}", "t": (block * 8 + (j * 5) % 8) / 4000, "total": i % 13}


def customer(i):
    """A customer's new tier: one of 28 customers (3 never order), 4 updates a second per customer."""
    return {"id": 2_000_000 + i, "customer": f"c{(i * 13) % 28}", "t": i / 112, "tier": i}
'''

SOURCES = '''
from paced import Paced
from records import click, view, order, customer


def source(fn):
    class One(Paced):
        def record(self, i):
            return fn(i)
    One.__name__ = fn.__name__.title()
    return One


Clicks, Views, Orders, Customers = source(click), source(view), source(order), source(customer)
'''

# lateness: 3 s of event time (12,000 records): a restarted replica's inputs resend what they had sent
# it unacknowledged after what they send it anew, so its inputs come out of order by about what
# they sent in its downtime and ack_timeout; the lateness covers that (no record is late)
PIPELINE = string.Template("""
pipeline: joins
defaults: {heartbeat_timeout: 60, ack_timeout: 0.5}
stages:
  $a: {type: "sources:$A", options: {count: $count_a, rate: $rate_a}}
  $b: {type: "sources:$B", options: {count: $count_b, rate: $rate_b}}
  $stage:
    type: $type
    inputs: [$a, $b]
    replicas: 2
    partition: key
    key: $key
    options: $options
  results: {type: consumer, inputs: [$stage], options: {output: output/results.jsonl}}
""")


def pipeline_text(stage: str, type_: str, key: str, options: str, a: tuple[str, int, int], b: tuple[str, int, int]) -> str:
    """Sources ``a`` and ``b`` (name, count, rate; the class ``sources:<Name>``) into ``stage``, into a consumer."""
    return PIPELINE.substitute(stage=stage, type=type_, key=key, options=options, a=a[0], A=a[0].title(), count_a=a[1],
                               rate_a=a[2], b=b[0], B=b[0].title(), count_b=b[1], rate_b=b[2])


def records_module() -> dict[str, Any]:
    scope: dict[str, Any] = {}
    exec(RECORDS, scope)     # the very functions the pipeline's sources call
    return scope


def kill_replicas(p: Any, stage: str, figure: str, every: int) -> int:
    """SIGKILL replica 0, 1, 0, 1 of ``stage``, each once its ``figure`` passed ``every`` times more."""
    kills = 0
    for target in (0, 1, 0, 1):
        wait_for(lambda target=target, k=kills: p.row(stage, target)["stats"].get(figure, 0) > every * (k // 2 + 1),
                 timeout=90, what=f"{stage}.{target} to make results")
        os.kill(p.row(stage, target)["pid"], signal.SIGKILL)
        kills += 1
        wait_for(lambda target=target, k=kills: p.row(stage, target)["state"] == "running"
                 and p.row(stage, target)["restarts"] >= (k + 1) // 2, timeout=60, what="the replica restarted")
    return sum(p.row(stage, i)["restarts"] for i in (0, 1))


def watermarks_by_replica(records: Records, key: str, lateness: float, replicas: int = 2) -> Callable[[str], float]:
    """The final watermark of the replica (of ``replicas``) holding each key: its newest record's time less the lateness."""
    newest = [max(r["t"] for r in records if replica_of_key(r[key], replicas) == i) for i in range(replicas)]
    return lambda k: newest[replica_of_key(k, replicas)] - lateness


def run_through_kills(p: Any, stage: str, figure: str, every: int, sources: tuple[str, str],
                      expected: dict[int, Any], fields: tuple[str, ...]) -> None:
    """Start the pipeline, SIGKILL ``stage``'s replicas 4 times, wait for both sources to complete
    and the sink to hold as many results as ``expected``; then each result must be there once,
    equal (on ``fields``) to the reference, and no record late."""
    (p.folder / "paced.py").write_text(PACED_SOURCE)
    (p.folder / "records.py").write_text(RECORDS)
    (p.folder / "sources.py").write_text(SOURCES)
    p.up()
    restarts = kill_replicas(p, stage, figure, every)
    wait_for(lambda: all(p.row(s)["state"] == "completed" for s in sources), timeout=120, what="both sources completed")
    wait_for(lambda: len(p.output_records("output/results.jsonl")) >= len(expected), timeout=120,
             what=f"{len(expected)} results at the sink")
    late = sum(p.row(stage, i)["stats"].get("late", 0) for i in (0, 1))
    p.down()
    results = p.output_records("output/results.jsonl")
    ids = Counter(r["id"] for r in results)
    assert not [i for i, c in ids.items() if c > 1], "a result written twice"
    assert {r["id"]: {f: r.get(f) for f in fields} for r in results} == \
        {i: {f: r.get(f) for f in fields} for i, r in expected.items()}
    assert late == 0 and restarts >= 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["inner", "left"])
def test_a_join_of_two_replicas_emits_every_pair_once_exactly_through_sigkills(pipeline, how: str) -> None:
    count = 40000
    p = pipeline(pipeline_text("joined", "join", "ad", "{left: clicks, right: views, key: ad, time: t, within: 0.003, "
                               f"lateness: 3, how: {how}}}", ("clicks", count, 3000), ("views", count, 3000)))
    fns = records_module()
    clicks, views = [fns["click"](i) for i in range(count)], [fns["view"](i) for i in range(count)]
    expected = join_reference(clicks, views, how, watermarks_by_replica(views, "ad", 3.0), within=0.003)
    pairs = sum(1 for r in expected.values() if r["right_id"] is not None)
    assert pairs > 20000 and (how == "inner" or len(expected) - pairs > 5000)
    run_through_kills(p, "joined", "pairs", 1500, ("clicks", "views"), expected,
                      ("id", "left_id", "right_id", "ad", "t", "right_t", "click", "slot"))


@pytest.mark.timeout(300)
def test_enrich_of_two_replicas_emits_every_order_once_exactly_through_sigkills(pipeline) -> None:
    count, table = 40000, 1456
    p = pipeline(pipeline_text("enriched", "enrich", "customer", "{key: customer, time: t, lateness: 3}",
                               ("orders", count, 3000), ("customers", table, 110)))
    fns = records_module()
    orders, rows = [fns["order"](i) for i in range(count)], [fns["customer"](i) for i in range(table)]
    expected = enrich_reference(orders, rows, "left", watermarks_by_replica(rows, "customer", 3.0))
    assert sum(1 for r in expected.values() if r.get("tier") is None) > 20 and len(expected) > 0.9 * count
    run_through_kills(p, "enriched", "enriched", 1000, ("orders", "customers"), expected,
                      ("id", "customer", "t", "total", "tier", "table_id", "table_t"))


@pytest.mark.timeout(420)
def test_a_join_scaled_2_to_3_mid_stream_through_sigkills_emits_every_result_once_exactly(pipeline) -> None:
    """``streampipe scale`` re-deals the join's waiting records by key through ``Join.rescale``."""
    count = 60000
    p = pipeline(pipeline_text("joined", "join", "ad", "{left: clicks, right: views, key: ad, time: t, within: 0.003, "
                               "lateness: 3, how: left}", ("clicks", count, 3000), ("views", count, 3000)))
    (p.folder / "paced.py").write_text(PACED_SOURCE)
    (p.folder / "records.py").write_text(RECORDS)
    (p.folder / "sources.py").write_text(SOURCES)
    fns = records_module()
    clicks, views = [fns["click"](i) for i in range(count)], [fns["view"](i) for i in range(count)]
    # the keys as the final 3 replicas own them; every new replica starts at the furthest old watermark,
    # which each one's own records pass long before the end
    expected = join_reference(clicks, views, "left", watermarks_by_replica(views, "ad", 3.0, replicas=3), within=0.003)
    p.up()
    wait_for(lambda: p.row("joined", 0)["stats"].get("pairs", 0) > 1000, timeout=90, what="pairs made")
    kill(p, "joined", 0, 1)
    scale(p, "joined", 3)
    assert p.row("clicks")["state"] != "completed", "the stream ended before the rescale"
    assert [r["replica"] for r in p.rows("joined")] == [0, 1, 2]
    wait_for(lambda: p.row("joined", 2)["stats"].get("pairs", 0) > 100, timeout=90, what="the new replica joins")
    kill(p, "joined", 2, 1)
    kill(p, "joined", 1, 1)
    wait_for(lambda: all(p.row(s)["state"] == "completed" for s in ("clicks", "views")), timeout=180,
             what="both sources completed")
    wait_for(lambda: len(p.output_records("output/results.jsonl")) >= len(expected), timeout=120,
             what=f"{len(expected)} results at the sink")
    late = sum(p.row("joined", i)["stats"].get("late", 0) for i in range(3))
    events = p.events("scale")
    p.down()
    results = p.output_records("output/results.jsonl")
    assert len({r["id"] for r in results}) == len(results), "a result written twice"
    fields = ("id", "left_id", "right_id", "ad", "t", "right_t")
    assert {r["id"]: {f: r.get(f) for f in fields} for r in results} == \
        {i: {f: r.get(f) for f in fields} for i, r in expected.items()}
    assert late == 0
    assert any("keyed state re-dealt" in e.get("reason", "") for e in events), events
