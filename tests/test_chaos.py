"""Chaos: SIGKILL stages and the supervisor while a finite stream flows; every record must land once.

One run, in three phases, on a two-replica source:

1. SIGKILLs, one a second, of every stage (source replicas included) and once of the supervisor;
   then the fork server SIGSTOPped for longer than the spawn timeout while a stage it must
   respawn is killed (the supervisor gives up on it, kills it and spawns otherwise);
2. source replica 1 kept down (SIGSTOP: its ids stop while replica 0 runs on past them, its
   position and watermark frozen) for ``down_s`` seconds while the kills go on elsewhere: no
   clock may close the holes it leaves at the sink;
3. ``down``, the source's replica count changed in ``services.yaml`` (2 -> 3, or 2 -> 1), ``up``
   on the same run dir, and kills again until the stream is complete.

CI runs it small. The long version (four runs of 1,000,000 records, the replica down for
minutes) runs by hand and prints a line per run. Throughout, a census every 0.1 s checks that
no replica ever has two live processes.

    python3 -m pytest -m slow tests/test_chaos.py -s -p no:xdist
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import psutil
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
  ack_timeout: 0.2            # every timer low: none of them may close a hole
  min_uptime: 0.1
stages:
  generator:
    type: generator
    replicas: {gen_replicas}
    heartbeat_timeout: 100000 # a replica paused on purpose is down, not hung
    options: {{count: {n}, rate: {rate}, seed: 5}}
  normalizer:
    type: normalizer
    inputs: [generator]
    replicas: 2
  consumer:
    type: consumer
    inputs: [normalizer]
    options: {{checkpoint_s: 0.05}}
"""


# the same chaos through a user's own stages: a stateful plain class (a count per key, stamped on
# each record) and a sink on the sink API (SQLite: the records and the marks in one transaction)
USER_STAGES = '''
import sqlite3


class Counter:
    def __init__(self):
        self.counts = {}

    def process(self, batch):
        out = []
        for r in batch:
            key = str(r["id"] % 7)
            self.counts[key] = self.counts.get(key, 0) + 1
            out.append({"id": r["id"], "key": key, "stamp": self.counts[key]})
        return out

    def snapshot(self):
        return {"counts": self.counts}

    def restore(self, state):
        self.counts = dict(state["counts"])

    def stats(self):
        return {"counts": dict(self.counts)}


class Rows:
    def setup(self):
        self.db = sqlite3.connect(self.context.run_dir / "rows.db")
        self.db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER, key TEXT, stamp INTEGER)")
        self.db.execute("CREATE TABLE IF NOT EXISTS marks (sink TEXT PRIMARY KEY, marks BLOB)")

    def load_marks(self):
        row = self.db.execute("SELECT marks FROM marks WHERE sink = 'rows'").fetchone()
        return row[0] if row else None

    def write(self, batch, marks):
        with self.db:
            self.db.executemany("INSERT INTO rows VALUES (?, ?, ?)", [(r["id"], r["key"], r["stamp"]) for r in batch])
            self.db.execute("INSERT OR REPLACE INTO marks VALUES ('rows', ?)", (marks,))

    def teardown(self):
        self.db.close()
'''
USER_CHAOS = CHAOS.replace("""  consumer:
    type: consumer
    inputs: [normalizer]
    options: {{checkpoint_s: 0.05}}
""", """  counter:
    type: "userstages:Counter"
    inputs: [normalizer]
  consumer:
    type: "userstages:Rows"
    inputs: [counter]
""")


def sqlite_ids(p: Pipeline) -> list[int]:
    path = p.run_dir / "rows.db"
    if not path.exists():
        return []
    con = sqlite3.connect(path, timeout=30)
    try:
        return [i for (i,) in con.execute("SELECT id FROM rows")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


SPAWN_REPLY_TIMEOUT_S = 10.0    # = launcher.spawn.SPAWN_REPLY_TIMEOUT_S: the fork server stays stopped past it


class Census(threading.Thread):
    """Every 0.1 s, the live processes of each replica of ``pipeline`` (by their titles): the most seen at once."""

    TITLE = re.compile(r"streampipe: (?P<ident>\S+\.\d+) \[(?P<pipeline>[^\]]+)\]")

    def __init__(self, pipeline: str) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.most, self.scans = pipeline, collections.Counter[str](), 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            now = collections.Counter[str]()
            for proc in psutil.process_iter(["cmdline", "status"]):
                try:
                    m = self.TITLE.fullmatch(" ".join(proc.info["cmdline"] or []).strip())
                    if m and m["pipeline"] == self.pipeline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                        now[m["ident"]] += 1
                except psutil.Error:
                    continue
            for ident, n in now.items():
                self.most[ident] = max(self.most[ident], n)
            self.scans += 1
            self.halt.wait(0.1)

    def twice(self) -> dict[str, int]:
        return {ident: n for ident, n in self.most.items() if n > 1}


class Chaos:
    def __init__(self, p: Pipeline, seed: int, targets: tuple[str, ...] = ("generator", "normalizer", "consumer")) -> None:
        self.p, self.rng, self.kills = p, random.Random(seed), []   # type: ignore[var-annotated]
        self.targets = targets

    def victims(self, st: dict[str, Any], target: str, spare: tuple[str, int] | None) -> list[dict[str, Any]]:
        return [r for r in st["stages"] if r["name"] == target and r["pid"] and (r["name"], r["replica"]) != spare
                and r["state"] in ("running", "blocked", "starting")]

    def kill(self, target: str, spare: tuple[str, int] | None = None) -> bool:
        """SIGKILL one live replica of ``target`` (or the supervisor, then ``up`` again)."""
        st = self.p.status_or_none()
        if st is None:
            return False
        if target == "supervisor":
            pids = [r["pid"] for r in st["stages"] if r["pid"]]
            os.kill(st["supervisor_pid"], signal.SIGKILL)
            self.kills.append("supervisor")
            wait_for(lambda: not any(alive(pid) for pid in pids), timeout=10, interval=0.05, what="stages gone with the supervisor")
            self.p.up()
            return True
        victims = self.victims(st, target, spare)
        if not victims:
            return False
        victim = self.rng.choice(victims)
        try:
            os.kill(victim["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.kills.append(f"{target}.{victim['replica']}")
        return True

    def random_kills(self, seconds: float, spare: tuple[str, int] | None = None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            self.kill(self.rng.choice([*self.targets, *self.targets[1:]]), spare)


def run_chaos(p: Pipeline, n: int, down_s: float, seed: int, new_replicas: int, user: bool = False) -> dict[str, object]:
    chaos = Chaos(p, seed, ("generator", "normalizer", "counter", "consumer") if user else ("generator", "normalizer", "consumer"))
    output_ids = (lambda: sqlite_ids(p)) if user else p.output_ids
    started = time.monotonic()
    census = Census("chaos")
    census.start()
    p.up()
    wait_for(lambda: len(output_ids()) >= 100, timeout=60, what="the stream flowing")
    # 1: every stage and the supervisor, while both source replicas still flow
    must = list(chaos.targets) * 2
    chaos.rng.shuffle(must)
    must.insert(len(must) // 2, "supervisor")
    for target in must:
        time.sleep(1.0)
        wait_for(lambda t=target: chaos.kill(t), timeout=30, interval=0.2, what=f"a {target} to kill")
    # 1b: the fork server stopped past the spawn timeout while it has a stage to respawn
    server = wait_for(lambda: (p.status_or_none() or {}).get("forkserver_pid"), timeout=60, what="the fork server")
    os.kill(server, signal.SIGSTOP)
    try:
        wait_for(lambda: chaos.kill(chaos.targets[-1]), timeout=30, interval=0.2, what="a sink to kill")
        time.sleep(SPAWN_REPLY_TIMEOUT_S + 2.0)
    finally:
        try:
            os.kill(server, signal.SIGCONT)
        except ProcessLookupError:
            pass                 # the supervisor killed it
    # 2: source replica 1 down for down_s, kills elsewhere
    paused = wait_for(lambda: next((r["pid"] for r in p.rows("generator") if r["replica"] == 1 and r["state"] == "running"), None),
                      timeout=120, what="generator replica 1 running")
    os.kill(paused, signal.SIGSTOP)
    try:
        at_pause = len(output_ids())
        chaos.random_kills(down_s, spare=("generator", 1))
        during_pause = len(output_ids()) - at_pause
        assert p.row("generator", 1)["pid"] == paused, "the paused replica was down, not replaced"
    finally:
        os.kill(paused, signal.SIGCONT)
    chaos.random_kills(3)
    left = sum(1 for r in p.rows("generator") if r["state"] != "completed")
    assert left, "the stream must still flow when the replica count changes: raise n or lower the rate"
    # 3: down, a new replica count for the source, up on the same run dir
    assert p.down().returncode == 0
    p.config.write_text(p.config.read_text().replace("replicas: 2\n    heartbeat_timeout", f"replicas: {new_replicas}\n    heartbeat_timeout"))
    p.up()
    assert len(p.rows("generator")) == new_replicas
    wait_for(lambda: chaos.random_kills(1) or all(r["state"] == "completed" for r in p.rows("generator")),
             timeout=1200, interval=0, what="the source to complete under kills")
    wait_for(lambda: len(set(output_ids())) >= n, timeout=300, interval=0.5, what=f"{n} distinct records at the sink")
    time.sleep(1.0)   # anything still being redelivered would show up as a duplicate now
    ids = output_ids()
    counts = collections.Counter(ids)
    census.halt.set()
    census.join(10)
    summary = {"records": n, "seconds": round(time.monotonic() - started), "replica_down_s": down_s, "arrived_while_down": during_pause,
               "source_replicas": f"2->{new_replicas}", "kills": len(chaos.kills),
               "lost": n - len(set(ids) & set(range(n))), "duplicated": sum(c - 1 for c in counts.values() if c > 1),
               "unexpected": len(set(ids) - set(range(n))),
               "killed": dict(collections.Counter(k.split(".")[0] for k in chaos.kills)),
               "census_scans": census.scans, "replicas_seen_twice": census.twice()}
    if user:      # the stateful stage applied each record once, across every kill
        want = dict(collections.Counter(str(i % 7) for i in range(n)))
        wait_for(lambda: sum(p.row("counter")["stats"].get("counts", {}).values()) >= n, timeout=60, what="the counter's last save")
        got = p.row("counter")["stats"]["counts"]
        summary["state_exact"] = got == want
        summary["state_off_by"] = sum(abs(got.get(k, 0) - v) for k, v in want.items())
    print(f"\nchaos: {summary}\nkill order: {' '.join(chaos.kills)}")
    return summary


def check(summary: dict[str, object]) -> None:
    killed = summary["killed"]
    assert isinstance(killed, dict)
    assert all(killed.get(s, 0) >= 2 for s in ("generator", "normalizer", "consumer")), killed
    assert killed.get("supervisor") == 1
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["unexpected"] == 0, summary
    assert summary["replicas_seen_twice"] == {} and summary["census_scans"] > 100, summary   # one process per replica
    assert summary.get("state_exact", True), summary


@pytest.mark.timeout(300)
def test_chaos_short(pipeline, tmp_path: Path) -> None:
    n = 30_000
    p = pipeline(CHAOS.format(n=n, rate=200, gen_replicas=2))     # 75 s a replica: still flowing in phase 3
    check(run_chaos(p, n, down_s=6, seed=1, new_replicas=3))


@pytest.mark.timeout(300)
def test_chaos_short_through_a_users_stateful_stage_and_sink(pipeline, tmp_path: Path) -> None:
    n = 20_000
    (tmp_path / "userstages.py").write_text(USER_STAGES)
    p = pipeline(USER_CHAOS.format(n=n, rate=150, gen_replicas=2))
    check(run_chaos(p, n, down_s=6, seed=2, new_replicas=1, user=True))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", [1, 2])
def test_chaos_long_through_a_users_stateful_stage_and_sink(pipeline, tmp_path: Path, seed: int) -> None:
    """The long run with a user's stateful plain class and a sink on the sink API: 1,000,000 records."""
    n = int(os.environ.get("STREAMPIPE_CHAOS_N", "1000000"))
    rate = int(os.environ.get("STREAMPIPE_CHAOS_RATE", "3000"))
    down_s = float(os.environ.get("STREAMPIPE_CHAOS_DOWN_S", "150"))
    (tmp_path / "userstages.py").write_text(USER_STAGES)
    p = pipeline(USER_CHAOS.format(n=n, rate=rate, gen_replicas=2))
    check(run_chaos(p, n, down_s=down_s, seed=seed, new_replicas=3 if seed % 2 else 1, user=True))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_chaos_long(pipeline, tmp_path: Path, seed: int) -> None:
    """1,000,000 records; source replica 1 down for 150 s; the source goes 2 -> 3 (odd seeds) or 2 -> 1 replicas."""
    n = int(os.environ.get("STREAMPIPE_CHAOS_N", "1000000"))
    rate = int(os.environ.get("STREAMPIPE_CHAOS_RATE", "3000"))          # per source replica: 167 s of stream each
    down_s = float(os.environ.get("STREAMPIPE_CHAOS_DOWN_S", "150"))
    p = pipeline(CHAOS.format(n=n, rate=rate, gen_replicas=2))
    check(run_chaos(p, n, down_s=down_s, seed=seed, new_replicas=3 if seed % 2 else 1))
