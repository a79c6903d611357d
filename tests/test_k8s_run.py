"""The exported Kubernetes manifests, run as a kubelet would, on test hosts (network namespaces).

``streampipe export kubernetes`` writes the manifests of a small CURVE pipeline; the test's
kubelet (:mod:`tests.kubelet`) runs every pod of every StatefulSet on a host of its own named as
the pod, with the container's command, env (downward API), volumes (ConfigMap, the keys Secret
made as the README says, emptyDir, a claim per pod), security context and probes, and the
headless Services resolvable to their ready pods through the hosts files. Nothing here reads the
pipeline's ``services.yaml``: only the manifests. The stream must reach the sink with every id
exactly once across a SIGKILLed pod (restarted by the kubelet), a ``kubectl scale`` (the new pod
gets traffic) and a hung pod (its liveness probe fails: killed and restarted).
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import kubelet, netns
from tests.conftest import cli, wait_for
from tests.kubelet import Cluster, Image, secret_from_files
from tests.netstages import metric, sink_ids

REPO = Path(__file__).resolve().parent.parent
N = 12000                # ids of the finite stream
RATE = 250               # records/s: 48 s of stream, long enough to kill a pod and scale while it flows (on a loaded CI machine too)
NAMESPACE = "streams"
PIPELINE = f"""\
    pipeline: demo
    transport: tcp
    security: curve
    keys: ../keys                  # beside the pipeline's folder, not in the image: the pods get a Secret
    resolve_interval: 1            # a new pod gets traffic within 1 s of being ready
    stages:
      generator: {{type: generator, options: {{count: {N}, rate: {RATE}, seed: 5}}}}
      normalizer: {{type: normalizer, inputs: [generator], replicas: 2}}
      consumer: {{type: consumer, inputs: [normalizer]}}
    """


@pytest.fixture
def hosts() -> Iterator[netns.Hosts]:
    reason = kubelet.skip_reason()
    if reason:
        pytest.skip(reason)
    h = netns.Hosts()
    try:
        yield h
    finally:
        h.close()
        ours = [line for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith(f"sp{h.tag}-")]
        assert not ours, f"namespaces left behind: {ours}"
        assert not [p for p in netns.NETNS_ETC.glob(f"sp{h.tag}-*")], "/etc/netns entries left behind"


def exported(tmp_path: Path) -> tuple[list[dict[str, Any]], Path, Path]:
    """The manifests of the pipeline (``export kubernetes -o``), its folder (the image's /pipeline) and its keys."""
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "services.yaml").write_text(textwrap.dedent(PIPELINE))
    cli("keys", "generate", str(tmp_path / "keys"), check=True)
    out = tmp_path / "k8s"
    cli("export", "kubernetes", "--config", str(folder / "services.yaml"), "--image", "registry.example/demo:1",
        "--namespace", NAMESPACE, "-o", str(out), check=True)
    objects = [yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))]
    return objects, folder, tmp_path / "keys"


def sink(cluster: Cluster) -> collections.Counter[int]:
    """Ids in the consumer's output, on its pod's claim (its run directory is /var/lib/streampipe/run)."""
    return sink_ids(cluster.pods["demo-consumer-0"].claim() / "run")


def pod_report(cluster: Cluster) -> str:
    """Every pod as ``kubectl describe`` and ``kubectl logs [--previous]`` show it: asked when a wait
    fails (``wait_for(detail=...)``), so it says why a pod is not ready at that time."""
    return "\n".join(p.describe() for p in list(cluster.pods.values()))


@pytest.mark.timeout(420)   # every wait below is bounded by its own timeout; this only backs them up
def test_exported_manifests_run_as_a_kubelet_would(hosts: netns.Hosts, tmp_path: Path) -> None:
    objects, folder, keys = exported(tmp_path)
    statefulsets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "StatefulSet"}
    assert sorted(statefulsets) == ["demo-consumer", "demo-generator", "demo-normalizer"]
    image = Image.from_dockerfile(REPO / "Dockerfile", {"PIPELINE": folder})
    # README, "Running on Kubernetes", 2: kubectl create secret generic demo-keys --from-file=keys/
    secret = secret_from_files("demo-keys", keys, NAMESPACE)
    cluster = Cluster(hosts, tmp_path / "cluster", image)
    try:
        cluster.apply([secret, *objects])
        assert sorted(cluster.pods) == sorted(f"{name}-{i}" for name, sts in statefulsets.items()
                                              for i in range(sts["spec"]["replicas"]))
        wait_for(lambda: all(p.ready for p in cluster.pods.values()), timeout=120, interval=0.2,
                 what="every pod ready", detail=lambda: pod_report(cluster))
        wait_for(lambda: len(sink(cluster)) >= N // 5, timeout=60, interval=0.2, what="the stream at the sink", detail=lambda: pod_report(cluster))

        # mid-stream, the consumer's container is SIGKILLed (an OOM kill, a crash): the kubelet restarts it;
        # and kubectl scale statefulset/demo-normalizer --replicas=3: the new pod joins the Service and gets traffic
        consumer = cluster.pod("demo-consumer-0")
        consumer.kill(signal.SIGKILL)
        assert len(sink(cluster)) < N, "killed mid-stream"
        cluster.scale("demo-normalizer", 3)
        third = cluster.pod("demo-normalizer-2")

        def third_records_in() -> float:
            return metric(third.metrics(), "streampipe_records_in_total", stage="normalizer", replica="2") or 0

        wait_for(lambda: consumer.restarts == 1 and consumer.ready, timeout=120, interval=0.2,
                 what="the consumer restarted and ready", detail=lambda: pod_report(cluster))
        assert consumer.exits[0] == -signal.SIGKILL
        wait_for(lambda: third_records_in() > 0, timeout=60, interval=0.5, what="traffic to demo-normalizer-2", detail=lambda: pod_report(cluster))
        assert len(sink(cluster)) < N, "the third normalizer joined while the stream flowed"

        # a hung pod (SIGSTOP: neither its loop nor its probes answer) fails its liveness probe: the kubelet
        # takes it out of its Service (readiness), stops it (SIGTERM, grace, SIGKILL) and starts it again
        hung = cluster.pod("demo-normalizer-0")
        hung.kill(signal.SIGSTOP)
        wait_for(lambda: hung.restarts == 1 and hung.ready, timeout=120, interval=0.2,
                 what="the hung normalizer restarted and ready", detail=lambda: pod_report(cluster))
        assert hung.exits[0] == -signal.SIGKILL and any("liveness probe failed" in e for e in hung.events), hung.events

        wait_for(lambda: len(sink(cluster)) >= N, timeout=90, interval=0.5, what=f"{N} ids at the sink", detail=lambda: pod_report(cluster))
        time.sleep(1.0)   # a duplicate would arrive now
        counts = sink(cluster)
        assert sorted(counts) == list(range(N)), "every id reached the sink"
        assert max(counts.values()) == 1, f"no id twice: {[i for i, c in counts.items() if c > 1][:10]}"
        restarted = {p.name: p.restarts for p in cluster.pods.values() if p.restarts}
        assert restarted == {"demo-consumer-0": 1, "demo-normalizer-0": 1}, f"only the killed and the hung pod restarted\n{pod_report(cluster)}"
    finally:
        codes = cluster.close()
    # kubectl delete: every pod drains on SIGTERM within its grace period and exits 0
    assert {name: c[-1] for name, c in codes.items()} == dict.fromkeys(codes, 0), codes


@pytest.mark.timeout(240)
def test_a_pod_that_cannot_start_says_why_in_the_report(hosts: netns.Hosts, tmp_path: Path) -> None:
    """An image whose ``streampipe`` is not on its PATH (as a virtualenv hidden below a volume was):
    the container exits at once, again after each back-off, and the report of the wait that gives
    up on it says so: its state, its last exit, and that container's log with the reason."""
    objects, folder, keys = exported(tmp_path)
    consumer = [o for o in objects if o["kind"] != "StatefulSet" or o["metadata"]["name"] == "demo-consumer"]
    image = Image.from_dockerfile(REPO / "Dockerfile", {"PIPELINE": folder})
    image.env["PATH"] = str(tmp_path / "no-such-bin")
    cluster = Cluster(hosts, tmp_path / "cluster", image)
    try:
        cluster.apply([secret_from_files("demo-keys", keys, NAMESPACE), *consumer])
        pod = cluster.pod("demo-consumer-0")
        with pytest.raises(pytest.fail.Exception) as failed:
            wait_for(lambda: pod.ready, timeout=20, interval=0.2, what="the consumer ready", detail=lambda: pod_report(cluster))
        report = str(failed.value)
        assert pod.restarts >= 1 and not pod.ready, report
        assert "--- demo-consumer-0" in report and "ready=False" in report
        assert re.search(r"last state=exited 128 \(container \d+\)", report), report
        assert re.search(r"log of container \d+ \(exited 128\):\n", report), report
        # the reason, from the container's own log
        assert "StartError: exec: 'streampipe': executable file not found in $PATH" in report, report
    finally:
        codes = cluster.close()
    assert codes["demo-consumer-0"] and all(c is not None for c in codes["demo-consumer-0"]), codes
