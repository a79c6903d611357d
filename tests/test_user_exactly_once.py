"""Exactly once for the stages users write, as a new user writes them: plain classes.

The pipeline: the built-in generator -> ``Tag`` (stateless) -> ``Counter`` (a running count per
key in ``snapshot()``/``restore()``, stamped on each record) -> a sink that INSERTs each record
into SQLite. A graceful command (``restart``, ``apply``, ``scale``, an ``up --watch`` edit) must
repeat nothing even at that plain sink: the replica stopped is drained (its senders fence it, it
finishes and acknowledges what it took), so nothing it had is sent again. A SIGKILL of the
stateful ``Counter`` must leave its counts exact (the saved snapshot lists the batches it holds).
A sink on the sink API (``write(batch, marks)``) and the built-in ``sqlite`` sink hold each id once
across SIGKILLs of every stage and of the supervisor, and the Counter's counts stay exact through
them (it keeps the ids it has applied with its snapshot).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import Pipeline, alive, cli, wait_for

MODULE = '''
import sqlite3


class Tag:
    """Stateless: adds its option."""
    def __init__(self, tag="a"):
        self.tag = tag

    def process(self, batch):
        return [{**r, "tag": self.tag} for r in batch]


class Counter:
    """Stateful: a running count per key, stamped on each record."""
    def __init__(self):
        self.counts = {}

    def process(self, batch):
        out = []
        for r in batch:
            key = str(r["id"] % 7)
            self.counts[key] = self.counts.get(key, 0) + 1
            out.append({**r, "key": key, "stamp": self.counts[key]})
        return out

    def snapshot(self):
        return {"counts": self.counts}      # its live dict: the runtime copies it

    def restore(self, state):
        self.counts = dict(state["counts"])

    def stats(self):
        return {"total": sum(self.counts.values()), "counts": dict(self.counts)}


class Rows:
    """A plain sink: one INSERT per record, nothing else (at-least-once on its own)."""
    def __init__(self, path="rows.db"):
        self.path = path

    def setup(self):
        self.db = sqlite3.connect(self.context.run_dir / self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER, key TEXT, stamp INTEGER, tag TEXT)")

    def process(self, batch):
        with self.db:
            self.db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?)",
                                [(r["id"], r["key"], r["stamp"], r["tag"]) for r in batch])
        return []

    def teardown(self):
        self.db.close()


class ExactRows(Rows):
    """The same sink on the sink API: the records and the runtime's marks in one transaction."""
    def setup(self):
        super().setup()
        self.db.execute("CREATE TABLE IF NOT EXISTS marks (sink TEXT PRIMARY KEY, marks BLOB)")

    def load_marks(self):
        row = self.db.execute("SELECT marks FROM marks WHERE sink = 'rows'").fetchone()
        return row[0] if row else None

    def write(self, batch, marks):
        with self.db:
            self.db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?)",
                                [(r["id"], r["key"], r["stamp"], r["tag"]) for r in batch])
            self.db.execute("INSERT OR REPLACE INTO marks VALUES ('rows', ?)", (marks,))
'''

PIPELINE = """\
pipeline: users
defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 100, {extra}}}
stages:
  gen: {{type: generator, options: {{rate: {rate}, count: {count}, seed: 3}}}}
  tag: {{type: "mystages:Tag", inputs: [gen], options: {{tag: a}}}}
  counter: {{type: "mystages:Counter", inputs: [tag]}}
  rows: {{type: "mystages:{sink}", inputs: [counter]}}
"""


PLAIN = ("rows.db", "SELECT id, key, stamp FROM rows")
BUILTIN = ("out.db", "SELECT id, key, json_extract(record, '$.stamp') FROM rows")   # the sqlite sink's table


def rows_of(p: Pipeline, where: tuple[str, str] = PLAIN) -> list[tuple[int, str, int]]:
    path = p.run_dir / where[0]
    if not path.exists():
        return []
    con = sqlite3.connect(path, timeout=30)
    try:
        return con.execute(where[1]).fetchall()
    except sqlite3.OperationalError:
        return []        # the sink has not made its table yet
    finally:
        con.close()


def expected_counts(count: int) -> dict[str, int]:
    return dict(collections.Counter(str(i % 7) for i in range(count)))


def assert_exact(rows: list[tuple[int, str, int]], count: int) -> None:
    ids = [r[0] for r in rows]
    dup = len(ids) - len(set(ids))
    lost = count - len(set(ids))
    assert dup == 0 and lost == 0, f"{dup} duplicated rows, {lost} lost"
    stamps: dict[str, list[int]] = collections.defaultdict(list)
    for _, key, stamp in rows:
        stamps[key].append(stamp)
    for key, n in expected_counts(count).items():
        assert sorted(stamps[key]) == list(range(1, n + 1)), f"key {key}: stamps are not exactly 1..{n}"


def done(p: Pipeline, count: int, where: tuple[str, str] = PLAIN) -> bool:
    return p.row("gen")["state"] == "completed" and len({r[0] for r in rows_of(p, where)}) >= count


@pytest.mark.timeout(600)
def test_graceful_commands_repeat_nothing_at_a_plain_sink(pipeline, tmp_path: Path) -> None:
    count = 60_000       # 200 s at 300/s: flowing however slow the machine, until the last apply lifts the rate
    (tmp_path / "mystages.py").write_text(MODULE)
    p = pipeline(PIPELINE.format(rate=300, count=count, sink="Rows", extra="ack_timeout: 2"))
    up = cli("up", "--detach", "--watch", "--config", str(p.config), cwd=tmp_path, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    p.remember()

    def flowing(more: int) -> None:
        at = len(rows_of(p))
        wait_for(lambda: len(rows_of(p)) > at + more, timeout=90, what="the stream to flow on")

    flowing(500)
    for stage in ("tag", "counter", "rows"):
        cli("restart", stage, "--config", str(p.config), cwd=tmp_path, timeout=120, check=True)
        flowing(300)
    other = tmp_path / "other.yaml"      # the same pipeline with another option: `apply` restarts tag
    other.write_text(p.config.read_text().replace("tag: a", "tag: b"))
    cli("apply", "--config", str(other), "--run-dir", str(p.run_dir), cwd=tmp_path, timeout=280, check=True)
    flowing(300)
    cli("scale", "tag", "2", "--config", str(p.config), cwd=tmp_path, timeout=120, check=True)
    flowing(300)
    cli("scale", "tag", "1", "--config", str(p.config), cwd=tmp_path, timeout=120, check=True)
    flowing(300)
    before = p.row("tag")["pid"]
    (tmp_path / "mystages.py").write_text(MODULE.replace('"tag": self.tag}', '"tag": self.tag, "code": 2}'))
    wait_for(lambda: p.row("tag")["pid"] not in (None, before) and p.row("tag")["state"] == "running",
             timeout=120, what="up --watch restarting tag with its new code")
    assert not p.events("kill"), [e["reason"] for e in p.events("kill")]     # every stop drained
    # the rest at full speed, then the checks
    cli("apply", "--config", str(other), "--run-dir", str(p.run_dir), cwd=tmp_path, timeout=280, check=True)
    other.write_text(other.read_text().replace("rate: 300", "rate: 0"))
    cli("apply", "--config", str(other), "--run-dir", str(p.run_dir), cwd=tmp_path, timeout=280, check=True)
    wait_for(lambda: done(p, count), timeout=240, what="every record at the sink")
    assert_exact(rows_of(p), count)
    assert p.row("counter")["stats"]["counts"] == expected_counts(count)


@pytest.mark.timeout(600)
def test_a_stateful_transform_killed_keeps_exact_counts(pipeline, tmp_path: Path) -> None:
    count = 20_000
    (tmp_path / "mystages.py").write_text(MODULE)
    # ack_timeout 0.3: resends come quickly after each kill, and may reach the counter while the
    # batch's first copy is in its saved state: the saved list of batches must answer them
    p = pipeline(PIPELINE.format(rate=1000, count=count, sink="Rows", extra="ack_timeout: 0.3"))
    p.up()
    for kill in range(5):
        wait_for(lambda kill=kill: len(rows_of(p)) > 2500 * (kill + 1), timeout=90, what="the stream to flow on")
        # its pid as status has it now (between two status reads on a loaded machine it may be restarting)
        pid = wait_for(lambda: p.row("counter")["pid"], timeout=60, what="the counter's pid")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda kill=kill: p.row("counter")["state"] == "running" and p.row("counter")["restarts"] >= kill + 1,
                 timeout=60, what="the counter running again")
    wait_for(lambda: p.row("gen")["state"] == "completed", timeout=240, what="the stream to end")

    def counts() -> dict[str, int]:
        return p.row("counter")["stats"].get("counts", {})
    wait_for(lambda: sum(counts().values()) >= count, timeout=120, what="the counter to count every record")
    # the count at the time of the check, not of the wait's start
    assert counts() == expected_counts(count), f"counts {counts()} != {expected_counts(count)}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sink", ["ExactRows", "sqlite"])
def test_a_sink_on_the_sink_api_holds_each_id_once_across_sigkills(pipeline, tmp_path: Path, sink: str) -> None:
    count = 16_000
    (tmp_path / "mystages.py").write_text(MODULE)
    text = PIPELINE.format(rate=1000, count=count, sink=sink, extra="ack_timeout: 0.3")
    if sink == "sqlite":
        text = text.replace('type: "mystages:sqlite"', "type: sqlite, options: {path: out.db, columns: [key]}")
    p = pipeline(text)
    where = PLAIN if sink == "ExactRows" else BUILTIN
    p.up()
    victims = ["tag", "counter", "rows", "gen", "supervisor", "rows", "tag", "rows"]
    for k, victim in enumerate(victims):
        wait_for(lambda k=k: len(rows_of(p, where)) > 1500 * (k + 1), timeout=90, what="the stream to flow on")
        st = p.status()
        if victim == "supervisor":
            pids = [r["pid"] for r in st["stages"] if r["pid"]]
            os.kill(st["supervisor_pid"], signal.SIGKILL)
            wait_for(lambda pids=pids: not any(alive(pid) for pid in pids), timeout=10, what="stages gone with the supervisor")
            p.up()
            continue
        row = next(r for r in st["stages"] if r["name"] == victim)
        if row["pid"]:
            os.kill(row["pid"], signal.SIGKILL)
        wait_for(lambda victim=victim: p.row(victim)["state"] in ("running", "completed"), timeout=60, what=f"{victim} back")
    wait_for(lambda: done(p, count, where), timeout=240, what="every record at the sink")
    ids = [r[0] for r in rows_of(p, where)]
    assert len(ids) == len(set(ids)) == count, f"{len(ids) - len(set(ids))} duplicated, {count - len(set(ids))} lost"
    # the Counter applied each record once, whoever was killed upstream of it (it keeps the ids it applied)
    wait_for(lambda: p.row("counter")["stats"].get("total", 0) >= count, timeout=60, what="the counter's last save")
    assert p.row("counter")["stats"]["counts"] == expected_counts(count)


POISON = '''
import os
import time


class Fragile:
    """Hangs on one record, kills its process on another."""
    def process(self, batch):
        for r in batch:
            if r["id"] == 1234:
                time.sleep(3600)          # process() never returns
            if r["id"] == 2345:
                os._exit(7)               # no exception to catch: the process is gone
        return batch
'''


@pytest.mark.timeout(300)
def test_a_record_that_hangs_or_kills_its_stage_is_dead_lettered_and_the_stream_goes_on(pipeline, tmp_path: Path) -> None:
    count = 4000
    (tmp_path / "fragile.py").write_text(POISON)
    p = pipeline(f"""\
        pipeline: poison
        defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 50, ack_timeout: 0.5}}
        stages:
          gen: {{type: generator, options: {{rate: 2000, count: {count}}}}}
          fragile: {{type: "fragile:Fragile", inputs: [gen], heartbeat_timeout: 6}}
          sink: {{type: consumer, inputs: [fragile]}}
    """)
    p.up()
    want = set(range(count)) - {1234, 2345}
    wait_for(lambda: set(p.output_ids()) >= want, timeout=240, what="every other record at the sink")
    dead = [json.loads(line) for line in (p.run_dir / "deadletter" / "fragile.jsonl").read_text().splitlines()]
    why = {d["record"]["id"]: d["error"] for d in dead}
    assert set(why) == {1234, 2345}, why
    assert "hung" in why[1234] and "died twice" in why[1234]
    assert "exit" in why[2345] and "died twice" in why[2345]
    assert sorted(p.output_ids()) == sorted(want)            # nothing else lost, nothing twice
    assert p.row("fragile")["restarts"] <= 4                 # two deaths per poison record, in whatever order they come
    stderr = (p.run_dir / "logs" / "fragile.0.stderr").read_text()
    assert "in process" in stderr and "fragile.py" in stderr, stderr[-2000:]   # faulthandler: where it hung
