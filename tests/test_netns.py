"""Across machines, on real (namespaced) hosts: a name that resolves to several replicas, one host
lost mid-stream and one added, every id exactly once at the sink.

Hosts: A runs the generator and the sink, B and C the normalizer's replicas under the one name
``normalizer`` (two A records in the hosts files), D joins later. All over CURVE. The tests make
and remove their own network namespaces (tests/netns.py); they skip only where that is not
possible (not root).
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from streampipe.stages.network import generate_keys
from tests.conftest import wait_for
from tests.netns import Hosts, skip_reason
from tests.netstages import RUN_STAGE, metric, sink_ids

REASON = skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
RESOLVE_S = 1.0


@pytest.fixture
def hosts():
    h = Hosts()
    yield h
    h.close()


def metrics_of(hosts: Hosts, host: str, port: int) -> str:
    """/metrics of the replica on ``host``, fetched from inside that host's network."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
    return hosts.run(host, [sys.executable, "-c", code]).stdout


def test_replicas_behind_one_name_lose_a_host_and_gain_one(hosts: Hosts, tmp_path: Path) -> None:
    n, health = 30_000, 9400
    generate_keys(tmp_path / "keys")
    for name in ("a", "b", "c", "d"):
        hosts.add(name)
    hosts.set_name("normalizer", [hosts.address("b"), hosts.address("c")])
    hosts.set_name("sink", [hosts.address("a")])
    (tmp_path / "services.yaml").write_text(textwrap.dedent(f"""\
        pipeline: hosts
        transport: tcp
        bind_host: 0.0.0.0
        resolve_interval: {RESOLVE_S}
        security: curve
        keys: keys
        defaults: {{ack_timeout: 0.3}}
        stages:
          generator: {{type: generator, options: {{count: {n}, rate: 1000, seed: 4}}}}
          normalizer: {{type: normalizer, inputs: [generator], replicas: 2, address: normalizer, port: 7001}}
          consumer: {{type: consumer, inputs: [normalizer], address: sink, port: 7002}}
        """))
    logs: dict[str, Path] = {}

    def start(host: str, stage: str, *args: str):
        logs[host + stage] = tmp_path / f"{host}-{stage}.log"
        with open(logs[host + stage], "wb") as out:
            return hosts.popen(host, [*RUN_STAGE, stage, "--config", str(tmp_path / "services.yaml"),
                                      "--run-dir", str(tmp_path / f"run-{host}"), "--health-port", str(health), *args],
                               stdout=out, stderr=out)

    def tails() -> str:
        return "\n".join(f"--- {name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                         for name, log in logs.items())

    def ready(host: str, stage: str) -> None:
        wait_for(lambda: " - ready: pid " in logs[host + stage].read_text(errors="replace"), timeout=60,
                 what=f"{stage} ready on host {host}")

    # D's replica starts with the others but is not under the name yet: on a loaded machine its
    # start can outlast the stream, and the test is of the name gaining it, not of its start
    procs = {"a-sink": start("a", "consumer"), "b": start("b", "normalizer", "--replica", "0"),
             "c": start("c", "normalizer", "--replica", "1"),
             "d": start("d", "normalizer", "--replica", "2")}   # a third replica, as a scale-out names it
    for host, stage in (("a", "consumer"), ("b", "normalizer"), ("c", "normalizer"), ("d", "normalizer")):
        ready(host, stage)
    procs["a-gen"] = start("a", "generator", "--health-port", str(health + 1))
    sink = tmp_path / "run-a"
    wait_for(lambda: len(sink_ids(sink)) > n // 4, timeout=60, what="the stream flowing through B and C")
    assert (metric(metrics_of(hosts, "c", health), "streampipe_records_in_total") or 0) > 0, "C took its share"

    # host C's stage dies and C leaves the name: what was in flight to it is resent to B
    procs["c"].kill()
    procs["c"].wait(10)
    hosts.set_name("normalizer", [hosts.address("b")])
    wait_for(lambda: len(sink_ids(sink)) > n // 2, timeout=60, what="the stream flowing through B alone",
             detail=lambda: f"{len(sink_ids(sink))} ids at the sink\n{tails()}")

    # host D joins the name: the generator connects to it at its next re-resolution
    joined = time.monotonic()
    hosts.set_name("normalizer", [hosts.address("b"), hosts.address("d")])
    wait_for(lambda: (metric(metrics_of(hosts, "d", health), "streampipe_records_in_total") or 0) > 0,
             timeout=RESOLVE_S + 15, interval=0.25, what="D receiving", detail=tails)
    took = time.monotonic() - joined
    print(f"\nD received {took:.1f}s after it joined the name (resolve_interval {RESOLVE_S:g}s)")

    wait_for(lambda: len(sink_ids(sink)) >= n, timeout=90, what=f"{n} ids at the sink")
    time.sleep(1.0)
    counts = sink_ids(sink)
    assert sorted(counts) == list(range(n)), f"lost: {sorted(set(range(n)) - set(counts))[:10]}"
    assert max(counts.values()) == 1, "no id twice"
    for name in ("a-gen", "b", "d", "a-sink"):
        procs[name].terminate()
        assert procs[name].wait(30) == 0, f"{name} drains and exits 0 on SIGTERM"
