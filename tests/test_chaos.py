"""Chaos: SIGKILL stages and the supervisor while a finite stream flows; every record must land once.

CI runs the short version. The long one (1,000,000 records, a kill every second) runs by hand:

    python3 -m pytest -m slow tests/test_chaos.py -s

Each prints the kills it made and the lost and duplicated record counts.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Pipeline, alive, wait_for

CHAOS = """\
pipeline: chaos
delivery: at-least-once
defaults:
  restart: always
  max_restarts: 1000          # chaos is not a crash loop: never give up on a stage
  backoff_initial: 0.05
  backoff_max: 0.2
  ack_timeout: 1.0
stages:
  generator:
    type: generator
    options: {{count: {n}, rate: {rate}, seed: 5}}
  normalizer:
    type: normalizer
    inputs: [generator]
    replicas: 2
  consumer:
    type: consumer
    inputs: [normalizer]
"""


def run_chaos(p: Pipeline, n: int, kill_every: float, seed: int = 1, max_seconds: float = 600) -> dict[str, object]:
    rng = random.Random(seed)
    p.up()
    kills: list[str] = []
    must = ["normalizer", "consumer"] * 2
    rng.shuffle(must)
    must[0:0] = ["generator"]           # the source's kills come early, while its stream still flows
    must.insert(2, "generator")
    must.insert(len(must) // 2, "supervisor")
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        time.sleep(kill_every)
        st = p.status_or_none()
        if st is None:
            continue
        gen = next(r for r in st["stages"] if r["name"] == "generator")
        if gen["state"] == "completed" and not must:
            break
        target = must.pop(0) if must else rng.choice(["generator", "normalizer", "consumer", "normalizer", "consumer"])
        if target == "supervisor":
            pids = [r["pid"] for r in st["stages"] if r["pid"]]
            os.kill(st["supervisor_pid"], signal.SIGKILL)
            kills.append("supervisor")
            wait_for(lambda pids=pids: not any(alive(pid) for pid in pids), timeout=5, interval=0.05, what="stages gone with the supervisor")
            p.up()
            continue
        victims = [r for r in st["stages"] if r["name"] == target and r["pid"] and r["state"] in ("running", "blocked", "starting")]
        if not victims:
            if gen["state"] == "completed" and target == "generator":
                continue           # nothing left to kill there: the stream is complete
            must.insert(0, target)  # try again at the next tick
            continue
        victim = rng.choice(victims)
        try:
            os.kill(victim["pid"], signal.SIGKILL)
        except ProcessLookupError:
            must.insert(0, target)
            continue
        kills.append(f"{target}.{victim['replica']}")
    # let the stream finish and drain
    wait_for(lambda: p.row("generator")["state"] == "completed", timeout=max_seconds, interval=0.5, what="the stream to complete")
    wait_for(lambda: len(set(p.output_ids())) >= n, timeout=120, interval=0.5, what=f"{n} distinct records at the sink")
    time.sleep(1.0)   # anything still being redelivered would show up as a duplicate now
    ids = p.output_ids()
    counts = collections.Counter(ids)
    lost = n - len(set(ids) & set(range(n)))
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    summary = {"records": n, "kills": len(kills), "lost": lost, "duplicated": duplicated,
               "killed": dict(collections.Counter(k.split(".")[0] for k in kills))}
    print(f"\nchaos: {summary}\nkill order: {' '.join(kills)}")
    return summary


def check(summary: dict[str, object]) -> None:
    killed = summary["killed"]
    assert isinstance(killed, dict)
    assert all(killed.get(s, 0) >= 2 for s in ("generator", "normalizer", "consumer")), killed
    assert killed.get("supervisor") == 1
    assert summary["lost"] == 0 and summary["duplicated"] == 0, summary


def test_chaos_short(pipeline, tmp_path: Path) -> None:
    n = 30_000
    p = pipeline(CHAOS.format(n=n, rate=2_500))
    check(run_chaos(p, n, kill_every=1.0))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_long(pipeline, tmp_path: Path) -> None:
    n = int(os.environ.get("STREAMPIPE_CHAOS_N", "1000000"))
    p = pipeline(CHAOS.format(n=n, rate=int(os.environ.get("STREAMPIPE_CHAOS_RATE", "20000"))))   # ~50 s of kills
    check(run_chaos(p, n, kill_every=1.0, max_seconds=1500))
