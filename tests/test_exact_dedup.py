"""Exact dedup with no clock, with real processes: a source replica kept down (paused, or dead
and restarted much later) while the rest of the pipeline runs far past every time-based setting,
then back: every id reaches the sink exactly once. And a source whose ids stop increasing.

Before watermarks, the sink closed a hole in the ids once it had been open ``dedup_horizon_s``
(300 s): with it at 2 s and one generator replica paused for 7 s, 4,998 of 20,000 records were
lost as "duplicates". Here every timer is at its minimum and the pause is longer than all of them.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time

from tests.conftest import Pipeline, cli, ready_pid, wait_for

FAST = """\
pipeline: lag
delivery: at-least-once
defaults:
  restart: always
  ack_timeout: 0.05           # resend after 50 ms without an ack
  backoff_initial: 0
  backoff_max: 0.05
  min_uptime: 0.1
  max_restarts: 1000
  linger_ms: 1
stages:
  generator:
    type: generator
    replicas: 2
    restart: {restart}
    heartbeat_timeout: {hb}
    options: {{count: {n}, rate: {rate}, seed: 3}}
  normalizer:
    type: normalizer
    inputs: [generator]
  consumer:
    type: consumer
    inputs: [normalizer]
    options: {{checkpoint_s: 0.01}}
"""


def exactly_once(p: Pipeline, n: int, timeout: float) -> None:
    wait_for(lambda: len(set(p.output_ids())) >= n, timeout=timeout, what=f"{n} distinct ids at the sink")
    wait_for(lambda: all(r["state"] == "completed" for r in p.rows("generator")), timeout=30,
             what="both generator replicas completed")
    time.sleep(0.5)   # anything still in flight would land now
    counts = collections.Counter(p.output_ids())
    assert sorted(counts) == list(range(n)), f"lost: {sorted(set(range(n)) - set(counts))[:20]}"
    dups = {i: c for i, c in counts.items() if c > 1}
    assert not dups, f"duplicated: {list(dups.items())[:20]}"


def flowing(pipeline, n: int, restart: str, hb: float) -> tuple[Pipeline, int]:
    """A two-replica generator of ``n`` ids, up and flowing; returns it and replica 1's pid."""
    p = pipeline(FAST.format(n=n, rate=100, restart=restart, hb=hb))
    p.up()
    pid = wait_for(lambda: ready_pid(p, "generator", 1), timeout=30, what="generator replica 1 running")
    wait_for(lambda: len(p.output_ids()) >= 100, timeout=30, what="the stream flowing")
    return p, pid


def test_a_paused_source_replica_loses_nothing(pipeline, tmp_path) -> None:
    n = 4000
    p, slow = flowing(pipeline, n, restart="always", hb=120)
    os.kill(slow, signal.SIGSTOP)            # replica 1's ids stop; replica 0's go on past them
    try:
        before = len(p.output_ids())
        time.sleep(8)                        # 160 x ack_timeout, 800 x the consumer's checkpoint_s
        assert len(p.output_ids()) > before + 200, "the other replica kept the pipeline busy"
    finally:
        os.kill(slow, signal.SIGCONT)
    exactly_once(p, n, timeout=60)
    assert ready_pid(p, "generator", 1) == slow, "the paused replica was not replaced: it lagged, it did not die"


def test_a_source_replica_down_then_restarted_loses_nothing(pipeline, tmp_path) -> None:
    n = 4000
    p, victim = flowing(pipeline, n, restart="never", hb=1)
    os.kill(victim, signal.SIGKILL)    # its unacked batches are replayed after the restart
    time.sleep(8)
    assert p.row("generator", 1)["state"] in ("stopped", "failed"), "restart: never kept it down"
    cli("restart", "generator", "--config", str(p.config), cwd=p.folder, check=True)
    p.remember()
    exactly_once(p, n, timeout=60)


UNORDERED = '''\
from streampipe import Source


class Unordered(Source):
    """Even ids 0..998, a pause (the watermark passes 998), then 1 (below it), 1001 and 999."""

    def generate(self):
        for i in range(0, 1000, 2):
            yield {"id": i}
        for _ in range(500):
            yield None                      # ~2 ms each: acks arrive, the position is committed
        yield {"id": 1}
        yield {"id": 1001}
        yield {"id": 999}
'''


def test_a_source_whose_ids_do_not_increase_is_never_deduplicated_wrongly(pipeline, tmp_path) -> None:
    (tmp_path / "unordered.py").write_text(UNORDERED)
    p = pipeline("""\
        pipeline: unordered
        defaults: {ack_timeout: 0.05}
        stages:
          source: {type: "unordered:Unordered"}
          consumer: {type: consumer, inputs: [source]}
        """)
    p.up()
    wait_for(lambda: p.row("source")["state"] == "completed", timeout=60, what="the source completed")
    wait_for(lambda: 1001 in p.output_ids(), timeout=10, what="the last records at the sink")
    time.sleep(0.3)
    counts = collections.Counter(p.output_ids())
    dead_file = p.run_dir / "deadletter" / "source.jsonl"
    dead = [json.loads(x) for x in dead_file.read_text().splitlines()] if dead_file.exists() else []
    dead_ids = [d["record"]["id"] for d in dead]
    assert all(counts[i] == 1 for i in range(0, 1000, 2)) and counts[1001] == 1 and counts[999] == 1
    # id 1 is below the watermark the source already announced (unless no batch was acked by
    # then): it goes to the dead-letter file with the reason, never silently dropped as a duplicate
    assert counts[1] + dead_ids.count(1) == 1, (counts[1], dead)
    assert all("below watermark" in d["error"] for d in dead)
    assert sum(counts.values()) == 500 + 2 + counts[1]


def test_a_killed_source_repartitioned_duplicates_nothing(pipeline, tmp_path) -> None:
    """Both source replicas SIGKILLed between two saves of their position, then ``down``, 2 -> 3
    replicas, ``up``: the new generation re-emits what the dead replicas had not saved, and the
    sink must tell every such id it already wrote. It can because a replica never announces a
    watermark ahead of its saved position (before that rule: ~1 s of ids duplicated per replica)."""
    n = 3000
    p, one = flowing(pipeline, n, restart="never", hb=1)
    zero = ready_pid(p, "generator", 0)
    assert zero is not None
    wait_for(lambda: len(p.output_ids()) >= 600, timeout=30, what="a few saves of the positions")
    for pid in (zero, one):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(r["state"] in ("stopped", "failed") for r in p.rows("generator")), timeout=30,
             what="both source replicas down")
    time.sleep(1)                      # what was in flight reaches the sink, and its watermarks with it
    assert p.down().returncode == 0
    p.config.write_text(p.config.read_text().replace("replicas: 2", "replicas: 3").replace("restart: never", "restart: always"))
    p.up()
    assert len(p.rows("generator")) == 3
    exactly_once(p, n, timeout=90)
