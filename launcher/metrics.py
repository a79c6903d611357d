"""Prometheus metrics of a running pipeline (``streampipe up --metrics-port PORT``).

Served by prometheus_client on 127.0.0.1 only, from the supervisor's own view (heartbeats and
psutil readings), so scraping costs the stages nothing. Every series is labelled by
``pipeline`` (two pipelines on one Prometheus never collide), ``stage`` and ``replica``:

    streampipe_records_in_total / _records_out_total / _dead_letters_total / _errors_total
    streampipe_malformed_total (malformed messages a replica dropped on its input, ack, control sockets)
    streampipe_supervisor_malformed_total{pipeline, socket=stages|control} (the supervisor's, no stage label)
    streampipe_restarts_total, streampipe_up (1 running or blocked), streampipe_blocked
    streampipe_cpu_percent, streampipe_rss_bytes
    streampipe_batch_latency_seconds (histogram of ``process`` time per batch)
    streampipe_model_version, streampipe_model_metric{metric=...} (trainer and evaluator)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from streampipe.stages.runtime import LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from streampipe.launcher.supervisor import Supervisor

LABELS = ["pipeline", "stage", "replica"]   # pipeline: two pipelines scraped by one Prometheus never collide
COUNTERS = (("records_in", "Records received (a source: produced)"), ("records_out", "Records sent downstream"),
            ("dead_letters", "Records sent to the dead-letter file"), ("errors", "Records that failed in process"),
            ("restarts", "Restarts by the supervisor"), ("malformed", "Malformed messages dropped by the replica"))


class PipelineCollector:
    """The metrics of a status snapshot: the supervisor's (``up``), or one replica's (``run-stage``)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        snapshot = self.snapshot() or {"stages": []}
        rows = snapshot["stages"]
        pipeline = str(snapshot.get("pipeline", ""))
        counters = {name: CounterMetricFamily(f"streampipe_{name}", doc, labels=LABELS) for name, doc in COUNTERS}
        up = GaugeMetricFamily("streampipe_up", "1 when the replica is running or blocked", labels=LABELS)
        blocked = GaugeMetricFamily("streampipe_blocked", "1 when waiting on a slow downstream", labels=LABELS)
        cpu = GaugeMetricFamily("streampipe_cpu_percent", "CPU percent (psutil)", labels=LABELS)
        rss = GaugeMetricFamily("streampipe_rss_bytes", "Resident memory (psutil)", labels=LABELS)
        latency = HistogramMetricFamily("streampipe_batch_latency_seconds", "Time in process() per batch", labels=LABELS)
        version = GaugeMetricFamily("streampipe_model_version", "Model version (trainer, evaluator)", labels=LABELS)
        metric = GaugeMetricFamily("streampipe_model_metric", "Latest model metric", labels=LABELS + ["metric"])
        unreachable = GaugeMetricFamily("streampipe_edge_unreachable", "1 when an output edge has had no connected "
                                        "receiver for heartbeat_timeout", labels=LABELS + ["edge"])
        denied = CounterMetricFamily("streampipe_curve_denied", "Connections refused by CURVE authentication", labels=LABELS)
        for r in rows:
            labels = [pipeline, r["name"], str(r["replica"])]
            for name, family in counters.items():
                family.add_metric(labels, float(r.get(name, 0) or 0))
            up.add_metric(labels, 1.0 if r["state"] in ("running", "blocked") else 0.0)
            blocked.add_metric(labels, 1.0 if r.get("blocked") else 0.0)
            if r.get("cpu_percent") is not None:     # None: no process to measure (no sample rather than a stale one)
                cpu.add_metric(labels, float(r["cpu_percent"]))
            if r.get("rss_bytes") is not None:
                rss.add_metric(labels, float(r["rss_bytes"]))
            buckets = list(r.get("latency_buckets") or [])
            if buckets:
                cumulative, total = [], 0
                for bound, count in zip([*LATENCY_BUCKETS_MS, float("inf")], buckets):
                    total += count
                    cumulative.append((str(bound / 1000.0) if bound != float("inf") else "+Inf", float(total)))
                approx_sum = total * float(r.get("latency_ms") or 0.0) / 1000.0
                latency.add_metric(labels, cumulative, approx_sum)
            for edge in r.get("unreachable") or []:
                unreachable.add_metric(labels + [str(edge)], 1.0)
            denied.add_metric(labels, float(r.get("denied", 0) or 0))
            stats = r.get("stats") or {}
            if isinstance(stats.get("model_version"), (int, float)):
                version.add_metric(labels, float(stats["model_version"]))
            if isinstance(stats.get("metric"), (int, float)):
                metric.add_metric(labels + [str(stats.get("metric_name", "metric"))], float(stats["metric"]))
        sup_malformed = CounterMetricFamily("streampipe_supervisor_malformed", "Malformed messages the supervisor dropped",
                                            labels=["pipeline", "socket"])
        for sock in ("stages", "control"):
            sup_malformed.add_metric([pipeline, sock], float(snapshot.get("malformed", {}).get(sock, 0)))
        yield sup_malformed
        yield from counters.values()
        yield from (up, blocked, cpu, rss, latency, version, metric, unreachable, denied)


def serve_metrics(sup: Supervisor, port: int) -> None:
    """Serve /metrics on 127.0.0.1:port from a daemon thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(lambda: sup.snapshot))  # type: ignore[arg-type]
    start_http_server(port, addr="127.0.0.1", registry=registry)
