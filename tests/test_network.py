"""Stages across machines, on loopback: ``run-stage`` processes with no supervisor, over tcp.

Loopback has a whole /8: each "host" here is its own 127.0.0.x address, so a name (here a list
of addresses) resolves to several replicas. The test with real hosts (network namespaces) is
tests/test_netns.py.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from streampipe.stages import wire
from streampipe.stages.network import generate_keys
from tests.conftest import wait_for
from tests.netstages import Stages, free_port, http_get, metric, sink_ids


@pytest.fixture
def stages(tmp_path: Path):
    s = Stages(tmp_path)
    yield s
    s.kill_all()


def stranger_frames(first_id: int, ack: str) -> list[bytes]:
    """A well-formed data message a stranger could send: if it got in, its ids would reach the sink."""
    header = {"k": "d", "src": "generator", "r": 0, "e": "default>normalizer", "ep": 1, "seq": 1, "n": 5,
              "t": time.time(), "ack": ack, "o": None, "w": None}
    return wire.data_frames(header, [{"id": first_id + i, "x": [0.0] * 8, "label": 0} for i in range(5)])


@pytest.mark.timeout(240)
def test_curve_pipeline_exactly_once_and_strangers_get_nothing(stages: Stages, tmp_path: Path) -> None:
    n = 20_000
    generate_keys(tmp_path / "keys")
    p_norm, p_cons, h_cons, h_gen = free_port("127.0.0.12"), free_port("127.0.0.14"), free_port(), free_port()
    (tmp_path / "services.yaml").write_text(textwrap.dedent(f"""\
        pipeline: net
        transport: tcp
        security: curve
        keys: keys
        resolve_interval: 0.5
        defaults: {{ack_timeout: 0.3}}
        stages:
          generator: {{type: generator, options: {{count: {n}, rate: 4000, seed: 2}}}}
          normalizer:
            type: normalizer
            inputs: [generator]
            replicas: 2
            address: [127.0.0.12, 127.0.0.13]     # one name, two hosts
            port: {p_norm}
          consumer: {{type: consumer, inputs: [normalizer], address: 127.0.0.14, port: {p_cons}}}
        """))
    stages.start("consumer", "consumer", "--bind-host", "127.0.0.14", "--health-port", str(h_cons))
    stages.start("norm0", "normalizer", "--replica", "0", "--bind-host", "127.0.0.12")
    stages.start("norm1", "normalizer", "--replica", "1", "--bind-host", "127.0.0.13")
    for label in ("consumer", "norm0", "norm1"):
        stages.wait_ready(label)
    stages.start("generator", "generator", "--bind-host", "127.0.0.15", "--health-port", str(h_gen))
    run_dir = tmp_path / ".streampipe"
    wait_for(lambda: len(sink_ids(run_dir)) > n // 5, timeout=60, what="the stream flowing through both replicas")

    # replica 1 leaves (SIGTERM drains it, exit 0): with no supervisor to say so, it tells the
    # generator itself (a LEAVE), which fences it, so nothing waits on its address; an impostor
    # without the server key takes the address (tests/test_runtime_outputs.py: the LEAVE alone)
    assert stages.stop("norm1") == 0
    assert "stop_grace ran out" not in stages.log("norm1"), stages.log("norm1")[-2000:]
    ctx = zmq.Context()
    try:
        impostor = ctx.socket(zmq.PULL)
        fake_public, fake_secret = zmq.curve_keypair()
        impostor.curve_secretkey, impostor.curve_publickey, impostor.curve_server = fake_secret, fake_public, True
        impostor.bind(f"tcp://127.0.0.13:{p_norm}")

        def missing() -> str:
            lost = sorted(set(range(n)) - set(sink_ids(run_dir)))
            return f"{len(lost)} ids missing at the sink (first {lost[:5]}); the generator's log:\n{stages.log('generator')[-3000:]}"
        wait_for(lambda: len(sink_ids(run_dir)) >= n, timeout=90, what=f"{n} ids at the sink", detail=missing)
        time.sleep(1.0)
        counts = sink_ids(run_dir)
        assert sorted(counts) == list(range(n)), "every id reached the sink"
        assert max(counts.values()) == 1, "no id twice"
        assert impostor.poll(0) == 0, "a host without the server key read something out"

        # strangers at the consumer's and the normalizer's inputs: a client key not admitted, and no CURVE
        wrong_public, wrong_secret = zmq.curve_keypair()
        server_public, _ = zmq.auth.load_certificate(str(tmp_path / "keys" / "server.key"))
        socks = []
        for target in (f"tcp://127.0.0.14:{p_cons}", f"tcp://127.0.0.12:{p_norm}"):
            for curve in (True, False):
                s = ctx.socket(zmq.PUSH)
                s.linger = 0
                if curve:
                    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_public, wrong_public, wrong_secret
                s.connect(target)
                for k in range(50):
                    try:
                        s.send_multipart(stranger_frames(10**6 + 1000 * len(socks) + 5 * k, "tcp://127.0.0.1:1"), flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                socks.append(s)
        wait_for(lambda: (metric(http_get(f"http://127.0.0.1:{h_cons}/metrics")[1], "streampipe_curve_denied_total") or 0) > 0,
                 timeout=20, what="the consumer to count a denied handshake")
        time.sleep(1.5)
        assert set(sink_ids(run_dir)) == set(range(n)), "nothing a stranger sent reached the sink"
    finally:     # a failure above must not leave its sockets to the next test's garbage collector
        ctx.destroy(linger=0)

    for label in ("generator", "norm0", "consumer"):
        assert stages.stop(label) == 0, f"{label} drains and exits 0 on SIGTERM:\n{stages.log(label)[-2000:]}"


SLOW = '''\
import time

from streampipe import Stage


class Slow(Stage):
    """setup() takes 3 s; process() never returns once it sees id 30."""

    def setup(self):
        time.sleep(3)

    def process(self, batch):
        if any(r["id"] == 30 for r in batch):
            time.sleep(3600)
        return batch
'''


def test_health_probes_follow_setup_and_a_hung_process(stages: Stages, tmp_path: Path) -> None:
    (tmp_path / "slowstage.py").write_text(SLOW)
    port, health = free_port("127.0.0.16"), free_port()
    (tmp_path / "services.yaml").write_text(textwrap.dedent(f"""\
        pipeline: probes
        transport: tcp
        stages:
          generator: {{type: generator, options: {{count: 1000, rate: 50}}}}
          slow: {{type: "slowstage:Slow", inputs: [generator], address: 127.0.0.16, port: {port}, heartbeat_timeout: 1.5}}
        """))
    stages.start("slow", "slow", "--bind-host", "127.0.0.16", "--health-port", str(health))
    url = f"http://127.0.0.1:{health}"
    first = wait_for(lambda: (got := http_get(url + "/readyz"))[0] and got, timeout=30, interval=0.05, what="the health server")
    assert first[0] == 503, f"/readyz while setup() runs: {first}"
    assert http_get(url + "/healthz")[0] == 200, "starting is not hung"
    wait_for(lambda: http_get(url + "/readyz")[0] == 200, timeout=30, what="/readyz 200 after setup()")
    assert http_get(url + "/healthz")[0] == 200
    # labelled by pipeline as under `up`: two pipelines on one Prometheus do not collide (issue 27)
    assert metric(http_get(url + "/metrics")[1], "streampipe_up", pipeline="probes", stage="slow", replica="0") == 1
    stages.start("generator", "generator", "--bind-host", "127.0.0.17")
    status, body = wait_for(lambda: (got := http_get(url + "/healthz"))[0] == 503 and got, timeout=30,
                            what="/healthz 503 once process() hangs")
    assert "hung" in body
    assert stages.procs["slow"].poll() is None, "a hung replica is reported, not killed: its supervisor (the kubelet) decides"


def test_an_edge_without_receivers_is_unreachable_then_recovers(stages: Stages, tmp_path: Path) -> None:
    n, port, health = 3000, free_port("127.0.0.18"), free_port()
    p_cons = free_port("127.0.0.19")
    (tmp_path / "services.yaml").write_text(textwrap.dedent(f"""\
        pipeline: reach
        transport: tcp
        resolve_interval: 0.5
        defaults: {{heartbeat_timeout: 1, max_inflight: 4, max_batch: 10, ack_timeout: 0.2}}
        stages:
          generator: {{type: generator, options: {{count: {n}, rate: 0}}}}
          normalizer: {{type: normalizer, inputs: [generator], address: 127.0.0.18, port: {port}}}
          consumer: {{type: consumer, inputs: [normalizer], address: 127.0.0.19, port: {p_cons}}}
        """))
    stages.start("generator", "generator", "--bind-host", "127.0.0.20", "--health-port", str(health))
    url = f"http://127.0.0.1:{health}/metrics"
    wait_for(lambda: metric(http_get(url)[1], "streampipe_edge_unreachable", edge="default>normalizer") == 1,
             timeout=30, what="the edge reported unreachable")
    text = http_get(url)[1]
    assert (metric(text, "streampipe_records_out_total") or 0) == 0, "nothing is sent (or dropped) into the void"
    assert metric(text, "streampipe_blocked") == 1, "the source waits: backpressure"
    stages.start("consumer", "consumer", "--bind-host", "127.0.0.19")
    stages.start("normalizer", "normalizer", "--bind-host", "127.0.0.18")
    wait_for(lambda: len(sink_ids(tmp_path / ".streampipe")) >= n, timeout=60, what="the stream once a receiver is up")
    wait_for(lambda: metric(http_get(url)[1], "streampipe_edge_unreachable", edge="default>normalizer") is None,
             timeout=10, what="the edge reachable again")
    counts = sink_ids(tmp_path / ".streampipe")
    assert sorted(counts) == list(range(n)) and max(counts.values()) == 1


def test_a_network_bind_without_curve_is_loud(stages: Stages, tmp_path: Path) -> None:
    health = free_port()
    (tmp_path / "services.yaml").write_text(textwrap.dedent(f"""\
        pipeline: open
        transport: tcp
        bind_host: 0.0.0.0
        stages:
          generator: {{type: generator, options: {{count: 10}}}}
          consumer: {{type: consumer, inputs: [generator], address: 127.0.0.1, port: {free_port()}}}
        """))
    stages.start("consumer", "consumer", "--health-port", str(health))
    stages.wait_ready("consumer")
    assert "INSECURE: tcp bind on 0.0.0.0 without CURVE" in stages.log("consumer")


def test_run_stage_refuses_what_cannot_work(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "services.yaml").write_text(textwrap.dedent("""\
        pipeline: bad
        transport: tcp
        stages:
          generator: {type: generator}
          consumer: {type: consumer, inputs: [generator]}
        """))
    proc = subprocess.run([sys.executable, "-m", "streampipe", "run-stage", "generator"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "stages.consumer.port" in proc.stderr and "has no port" in proc.stderr


def test_idle_health_connections_cost_no_thread_and_no_throughput(stages: Stages, tmp_path: Path) -> None:
    """Issue 21: 500 idle half-requests to /healthz made 507 threads in the stage. Now 2,000 idle
    connections (half of them a request line without its end) leave the stage's thread count
    as it was, /healthz answers meanwhile, the stream flows on, and the server drops them."""
    import socket

    import psutil

    from streampipe.launcher import healthserver

    n, p_cons, health = 20_000, free_port("127.0.0.21"), free_port()
    (tmp_path / "services.yaml").write_text(textwrap.dedent(f"""\
        pipeline: idle
        transport: tcp
        resolve_interval: 0.5
        stages:
          generator: {{type: generator, options: {{count: {n}, rate: 2000}}}}
          consumer: {{type: consumer, inputs: [generator], address: 127.0.0.21, port: {p_cons}}}
        """))
    cons = stages.start("consumer", "consumer", "--bind-host", "127.0.0.21", "--health-port", str(health))
    stages.wait_ready("consumer")
    stages.start("generator", "generator", "--bind-host", "127.0.0.22")
    wait_for(lambda: len(sink_ids(tmp_path / ".streampipe")) > 1000, timeout=60, what="records flowing")
    proc = psutil.Process(cons.pid)
    threads_before = proc.num_threads()
    written_before = len(sink_ids(tmp_path / ".streampipe"))
    idle: list[socket.socket] = []
    try:
        for i in range(2000):
            s = socket.create_connection(("127.0.0.1", health), timeout=10)
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # and never the blank line
            idle.append(s)
        t0 = time.monotonic()
        assert http_get(f"http://127.0.0.1:{health}/healthz")[0] == 200
        answered_in = time.monotonic() - t0
        assert proc.num_threads() == threads_before, "no thread per connection"
        assert answered_in < 3.0, f"/healthz took {answered_in:.2f}s behind 2,000 idle connections"
        wait_for(lambda: len(sink_ids(tmp_path / ".streampipe")) > written_before + 2000, timeout=30,
                 what="the stream flowing while the connections are held")
        time.sleep(healthserver.READ_TIMEOUT_S + 1)
        oldest = idle[0]
        oldest.settimeout(5)
        assert oldest.recv(1) == b"", "an idle connection is closed by the server after its read timeout"
        assert len(proc.net_connections("tcp")) < 100 + healthserver.MAX_CONNECTIONS, "the server keeps at most its bound open"
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: len(sink_ids(tmp_path / ".streampipe")) >= n, timeout=60, what="the whole stream")
    counts = sink_ids(tmp_path / ".streampipe")
    assert sorted(counts) == list(range(n)) and max(counts.values()) == 1
    assert proc.num_threads() == threads_before
