"""The ``http`` ingest source with real processes and sockets: a client posts, the pipeline writes.

The pipeline test: 20,000 records posted by 8 client threads to http -> consumer, the source and
the sink SIGKILLed mid-stream; every record answered 200 is in the output, every id once, and a
record is there more than once only when its client had to retry it (no 200 came back).
Bad requests (not JSON, not a map, no token, too large) get 400 / 401 / 413 and the source keeps
its pid; a full buffer gets 429 with Retry-After. http -> postgres upserting by the client's own
key: each key once in the table, although bodies whose 200 was lost are posted again.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from streampipe.stages.builtins.http_source import parse_body
from tests.conftest import wait_for
from tests.servers import free_port, pg_bindir, postgres  # noqa: F401

TOKEN = "s3cret-token"
PIPELINE = """
pipeline: ingest
defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 100, ack_timeout: 0.5, heartbeat_timeout: 60}}
stages:
  ingest:
    type: http
    options: {{port: {port}, token: {token}, max_pending: {max_pending}, max_body_bytes: 65536, reply_timeout_s: 10}}
  sink: {{type: consumer, inputs: [ingest], options: {{output: output/records.jsonl}}}}
"""


def post(port: int, body: bytes, token: str | None = TOKEN, timeout: float = 20.0) -> tuple[int, dict, dict]:
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        con.request("POST", "/", body=body, headers=headers)
        resp = con.getresponse()
        data = resp.read()
        return resp.status, json.loads(data or b"{}"), dict(resp.getheaders())
    finally:
        con.close()


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_parse_body_shapes() -> None:
    assert parse_body(b'{"a": 1}') == [{"a": 1}]
    assert parse_body(b'[{"a": 1}, {"b": 2}]') == [{"a": 1}, {"b": 2}]
    assert parse_body(b'{"a": 1}\n\n{"b": 2}\n') == [{"a": 1}, {"b": 2}]
    assert parse_body(b"  ") == []
    for bad, why in [(b"nope", "not JSON"), (b'{"a": 1}\n[2]', "line 2 is a JSON list"), (b'"x"', "a JSON str"),
                     (b'{"a": 1}\n{"a"', "line 2 is not JSON"), (b"\xff", "not UTF-8")]:
        with pytest.raises(ValueError, match=why):
            parse_body(bad)


@pytest.mark.timeout(180)
def test_http_to_consumer_every_200_arrives_once_across_kills(pipeline, tmp_path: Path) -> None:
    port = free_port()
    p = pipeline(PIPELINE.format(port=port, token=TOKEN, max_pending=1000))
    p.up()
    wait_for(lambda: p.row("ingest")["state"] == "running", timeout=60, what="the source running")
    pid = p.row("ingest")["pid"]

    # -- bad requests: answered, nothing taken, the source keeps its pid
    assert post(port, b"not json")[0] == 400
    assert post(port, b'[{"a": 1}, 2]')[0] == 400
    assert post(port, b'{"a": 1}', token=None)[0] == 401
    assert post(port, b'{"a": 1}', token="wrong")[0] == 401
    too_big = raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Length: 1000000\r\n\r\n")
    assert too_big.startswith(b"HTTP/1.1 413"), too_big[:80]
    assert raw(port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")

    # -- a full buffer: 429 with Retry-After while the sink is stopped
    sink_pid = p.row("sink")["pid"]
    os.kill(sink_pid, signal.SIGSTOP)
    try:
        first: list[tuple[int, dict, dict]] = []
        t = threading.Thread(target=lambda: first.append(post(port, json.dumps([{"k": -i - 1} for i in range(1000)]).encode())))
        t.start()
        wait_for(lambda: p.row("ingest")["stats"].get("pending") == 1000, timeout=30, what="the buffer full")
        code, _, headers = post(port, b'{"k": -2000}')
        assert code == 429 and headers.get("Retry-After") == "1"
    finally:
        os.kill(sink_pid, signal.SIGCONT)
    t.join(30)
    assert first and first[0][0] == 200 and first[0][1]["accepted"] == 1000, first
    assert p.row("ingest")["pid"] == pid

    # -- the stream: 8 clients, 20,000 records, kills of the source and the sink meanwhile
    total, per_post, clients = 20_000, 25, 8
    ok: set[int] = set()
    attempts: Counter[int] = Counter()
    codes: Counter[int | str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def client(c: int) -> None:
        keys = list(range(c, total, clients))
        for at in range(0, len(keys), per_post):
            chunk = keys[at:at + per_post]
            body = "\n".join(json.dumps({"k": k, "v": k * 2}) for k in chunk).encode()   # JSON lines
            while time.monotonic() < deadline:
                with lock:
                    attempts.update(chunk)
                try:
                    code = post(port, body)[0]
                except OSError as exc:
                    code = type(exc).__name__
                with lock:
                    codes[code] += 1
                if code == 200:
                    with lock:
                        ok.update(chunk)
                    break
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    for k, victim in enumerate(["ingest", "sink", "ingest"]):
        wait_for(lambda k=k: len(ok) >= 5000 * (k + 1), timeout=90, what=f"{5000 * (k + 1)} records answered 200")
        victim_pid = p.row(victim)["pid"]
        os.kill(victim_pid, signal.SIGKILL)
        wait_for(lambda v=victim, vp=victim_pid: p.row(v)["state"] == "running" and p.row(v)["pid"] != vp,
                 timeout=60, what=f"{victim} back")
    for th in threads:
        th.join(max(1.0, deadline - time.monotonic()))
    assert len(ok) == total, f"{total - len(ok)} records never answered 200; answers {dict(codes)}"

    wait_for(lambda: {r.get("k") for r in p.output_records()} >= ok, timeout=60, what="every 200 in the output")
    time.sleep(1.0)    # anything still in flight (records of a request that was not answered) lands
    rows = [r for r in p.output_records() if r["k"] >= 0]
    ids = [r["id"] for r in p.output_records()]
    assert len(ids) == len(set(ids)), "an id written twice"
    seen = Counter(r["k"] for r in rows)
    assert set(seen) == ok
    over = {k: n for k, n in seen.items() if n > attempts[k]}
    assert not over, f"records written more often than posted: {list(over.items())[:5]}"
    once = sum(1 for k in ok if seen[k] == 1)
    print(f"\n{total} records, {sum(codes.values())} posts, answers {dict(codes)}; written once {once}, "
          f"more than once {total - once} (their client retried after no 200)")
    assert sum(1 for k, n in seen.items() if n > 1 and attempts[k] == 1) == 0
    assert p.row("ingest")["restarts"] == 2 and p.row("sink")["restarts"] == 1


def test_an_open_port_needs_a_token(tmp_path: Path) -> None:
    from streampipe.launcher.config import load_config
    from streampipe.launcher.errors import ConfigError

    config = tmp_path / "services.yaml"
    config.write_text("pipeline: p\nstages:\n  ingest:\n    type: http\n    options: {host: 0.0.0.0, port: 8099}\n"
                      "  sink: {type: consumer, inputs: [ingest]}\n")
    with pytest.raises(ConfigError, match="host 0.0.0.0 opens the ingest port") as err:
        load_config(config)
    assert "stages.ingest.options.host" in str(err.value)
    config.write_text(config.read_text().replace("port: 8099}", "port: 8099, token: t}"))
    load_config(config)


PG_PIPELINE = """
pipeline: ingest-pg
defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 100, ack_timeout: 0.5, heartbeat_timeout: 60}}
stages:
  ingest: {{type: http, options: {{port: {port}, token: {token}}}}}
  events:
    type: postgres
    inputs: [ingest]
    options: {{dsn: "{dsn}", create: true, columns: {{k: k, id: id, record: "*"}}, key: [k], types: {{k: bigint}}}}
"""


@pytest.mark.timeout(180)
def test_http_to_postgres_upsert_by_client_key_exactly_once_across_kills(pipeline, postgres) -> None:  # noqa: F811
    """The README's route to exactly once for the client: its own key, and a sink that upserts by it.
    A body whose 200 was lost is posted again under new ids, and lands on the same rows."""
    import psycopg

    port = free_port()
    p = pipeline(PG_PIPELINE.format(port=port, token=TOKEN, dsn=postgres.dsn))
    p.up()
    total, per_post = 6_000, 50
    ok: set[int] = set()
    retried = 0
    killed: list[str] = []
    for at in range(0, total, per_post):
        keys = range(at, at + per_post)
        body = json.dumps([{"k": k, "v": k * 3} for k in keys]).encode()
        if at in (2_000, 4_000):                         # the source, then the sink, killed mid-stream
            victim = "ingest" if at == 2_000 else "events"
            os.kill(p.row(victim)["pid"], signal.SIGKILL)
            killed.append(victim)
        deadline = time.monotonic() + 60
        while True:
            try:
                code = post(port, body)[0]
            except OSError:
                code = 0
            if code == 200:
                ok.update(keys)
                break
            retried += 1
            assert time.monotonic() < deadline, f"no 200 for the body at {at} (last answer {code})"
            time.sleep(0.05)
    with psycopg.connect(postgres.dsn) as con:
        got = con.execute("SELECT count(*), count(DISTINCT k), min(k), max(k), bool_and((record->>'v')::bigint = k * 3) "
                          "FROM events").fetchone()
    assert got == (total, total, 0, total - 1, True), got
    assert len(ok) == total and killed == ["ingest", "events"]
