"""``streampipe run-stage STAGE``: one stage replica in the foreground, no supervisor.

The entrypoint of a container or a systemd unit: whatever runs it (the kubelet, systemd) restarts
it, probes it and limits it. The replica runs the same :func:`streampipe.stages.runtime.main` as
under ``streampipe up``; what differs is around it:

- its endpoints come from the config and name resolution (``address:``/``port:`` of the stages
  it feeds, re-resolved every ``resolve_interval``), not from a supervisor;
- its replica index from ``--replica``, else from an ordinal at the end of the host name
  (``consumer-3`` -> 3, as a StatefulSet names its pods), else 0;
- it logs JSON lines to stdout; SIGTERM (or Ctrl-C) drains and exits 0; a finished source stays
  up, idle, until stopped;
- it serves HTTP on ``--health-port``: ``/healthz`` (200 while the processing loop beats within
  ``heartbeat_timeout``, 503 when it is stuck inside ``process``), ``/readyz`` (200 once
  ``setup()`` returned and its input is bound), ``/metrics`` (Prometheus, the names of
  ``up --metrics-port``).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from streampipe.launcher.config import PipelineConfig
from streampipe.launcher.errors import ConfigError
from streampipe.launcher.healthserver import HealthServer
from streampipe.launcher.specs import stage_spec
from streampipe.stages.runtime import Host
from streampipe.stages.spec import EdgeSpec, StageSpec

ADVERTISE_ENV = "STREAMPIPE_ADVERTISE_HOST"
DEFAULT_HEALTH_PORT = 8080


def replica_from_hostname(hostname: str) -> int | None:
    """``consumer-3`` -> 3 (a StatefulSet's pod names); None without a trailing ordinal."""
    m = re.search(r"-(\d+)$", hostname.split(".")[0])
    return int(m.group(1)) if m else None


def default_address(stage: str) -> list[str]:
    """A stage without ``address:`` is reached at its name as a DNS label (``log_extractor`` ->
    ``log-extractor``): the name of its Service on Kubernetes."""
    return [stage.replace("_", "-").lower()]


def run_stage_args(stage: str, *, config: str | Path, run_dir: str | Path, replica: int | None = None,
                   health_port: int | None = None, bind_host: str | None = None) -> list[str]:
    """The arguments of ``streampipe run-stage`` (after the program) for one replica: what a
    Kubernetes pod (``export kubernetes``) and a systemd unit (``export systemd``) run.

    >>> run_stage_args("normalizer", config="/p/services.yaml", run_dir="/p/.streampipe", replica=1, health_port=9465)
    ['run-stage', 'normalizer', '--replica', '1', '--config', '/p/services.yaml', '--run-dir', '/p/.streampipe', '--health-port', '9465']
    """
    args = ["run-stage", stage]
    if replica is not None:
        args += ["--replica", str(replica)]
    args += ["--config", str(config), "--run-dir", str(run_dir)]
    if health_port is not None:
        args += ["--health-port", str(health_port)]
    if bind_host is not None:
        args += ["--bind-host", bind_host]
    return args


def run_stage_spec(cfg: PipelineConfig, stage: str, replica: int | None, run_dir: Path, *,
                   bind_host: str | None = None, advertise_host: str | None = None, keys: Path | None = None) -> StageSpec:
    """The spec of one replica run alone; a :class:`ConfigError` says what is missing."""
    if stage not in cfg.stages:
        raise ConfigError(f"no stage {stage!r} (stages: {', '.join(cfg.stages)})", file=cfg.path, field="stages")
    if cfg.transport != "tcp":
        raise ConfigError("run-stage reaches other stages over the network: set transport: tcp", file=cfg.path, field="transport")
    sc = cfg.stages[stage]
    if replica is None:
        replica = replica_from_hostname(socket.gethostname())
        replica = 0 if replica is None else replica
    replicas = sc.replicas
    if sc.inputs:
        replicas = max(replicas, replica + 1)    # scaled out by its orchestrator (kubectl scale): welcome
    elif not 0 <= replica < sc.replicas:         # a source's ids are split by its replica count
        raise ConfigError(f"replica {replica} of the source {stage!r}, which has replicas: {sc.replicas} "
                          f"(indexes 0..{sc.replicas - 1}): a source's ids are split by its replica count; "
                          f"change replicas: in the config to scale it", file=cfg.path, field=f"stages.{stage}.replicas")
    host = bind_host or sc.bind_host or cfg.bind_host
    edges = []
    for e in cfg.edges():
        if e.src != stage:
            continue
        dest = cfg.stages[e.dest]
        if dest.port is None:
            raise ConfigError(f"{stage!r} sends to {e.dest!r}, which has no port: give {e.dest!r} the port its replicas bind "
                              f"(port: N) and the name they are reached at (address:, default {default_address(e.dest)[0]!r})",
                              file=cfg.path, field=f"stages.{e.dest}.port")
        edges.append(EdgeSpec(name=e.name, output=e.output, dest=e.dest, endpoints=[],
                              addresses=dest.addresses or default_address(e.dest), port=dest.port,
                              keyed=dest.partitioned_by_id, key_field=dest.partition_key))
    if sc.inputs and sc.port is None:
        raise ConfigError(f"{stage!r} has inputs: give it the port its producers reach it at (port: N)",
                          file=cfg.path, field=f"stages.{stage}.port")
    zhost = "*" if host in ("0.0.0.0", "*", "") else host
    advertise = advertise_host or os.environ.get(ADVERTISE_ENV) or (os.path.expandvars(cfg.advertise_host) if cfg.advertise_host else None)
    keys_dir = keys or (cfg.keys_dir if cfg.security == "curve" else None)
    return stage_spec(cfg, sc, replica, replicas, run_dir, control="",
                      input=f"tcp://{zhost}:{sc.port}" if sc.inputs else None,
                      ack=f"tcp://{zhost}:{sc.ack_port or '*'}", edges=edges, ack_peers=[], supervisor_pid=0,
                      bind_host=host, advertise_host=advertise or None,
                      curve_keys=str(keys_dir) if keys_dir else None)


class Health(Host):
    """What the HTTP probes read: the replica's last beat, readiness and heartbeat figures."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.ready = False
        self.idle_since: float | None = None
        self.last_beat = time.monotonic()
        self.hb: dict[str, Any] = {}
        self.state = "starting"
        self.error = ""
        self.proc = psutil.Process()
        self.proc.cpu_percent()

    # -- Host ----------------------------------------------------------------------------------
    def on_tell(self, op: str, fields: dict[str, Any]) -> None:
        if op == "hb":
            self.last_beat = time.monotonic()
            self.hb = fields
            if self.state in ("running", "blocked"):
                self.state = "blocked" if fields.get("blocked") else "running"
        elif op == "ready":
            self.ready, self.state, self.last_beat = True, "running", time.monotonic()
        elif op == "error":
            self.error, self.state = str(fields.get("error", "")), "failed"

    def idle(self, stop: threading.Event) -> None:
        self.idle_since, self.state = time.monotonic(), "completed"
        super().idle(stop)

    # -- probes --------------------------------------------------------------------------------
    def healthz(self) -> tuple[int, str]:
        if self.idle_since is not None:
            return 200, "ok: stream completed, idle\n"
        if not self.ready:
            return 200, "ok: starting\n"           # /readyz says when it can take work; not hung yet
        silent = time.monotonic() - self.last_beat
        if silent > self.spec.heartbeat_timeout:
            return 503, f"hung: no loop progress for {silent:.1f}s (heartbeat_timeout {self.spec.heartbeat_timeout:g}s)\n"
        return 200, "ok\n"

    def readyz(self) -> tuple[int, str]:
        return (200, "ready\n") if self.ready else (503, "not ready: setup() running or input not bound\n")

    def snapshot(self) -> dict[str, Any]:
        try:
            cpu, rss = self.proc.cpu_percent(), self.proc.memory_info().rss
        except psutil.Error:
            cpu, rss = 0.0, 0
        row = {**self.hb, "name": self.spec.name, "replica": self.spec.replica, "state": self.state,
               "restarts": 0, "cpu_percent": cpu, "rss_bytes": rss, "dead_letters": self.hb.get("dead_letters", 0)}
        return {"pipeline": self.spec.pipeline, "stages": [row], "malformed": {}}


def serve_health(health: Health, port: int, host: str = "0.0.0.0") -> HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port`` from one daemon thread
    (:mod:`streampipe.launcher.healthserver`: bounded, with read timeouts, whatever the clients do)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import CollectorRegistry

    from streampipe.launcher.metrics import PipelineCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(health.snapshot))  # type: ignore[arg-type]
    text = "text/plain; charset=utf-8"

    def route(path: str) -> tuple[int, str, str]:
        if path == "/healthz":
            return (*health.healthz(), text)
        if path == "/readyz":
            return (*health.readyz(), text)
        if path == "/metrics":
            return 200, generate_latest(registry).decode(), CONTENT_TYPE_LATEST
        return 404, "not found: /healthz, /readyz, /metrics\n", text

    return HealthServer(host, port, route).start()


def run_stage(spec: StageSpec, health_port: int | None, health_host: str = "0.0.0.0") -> int:
    """Run the replica in this process until SIGTERM; returns its exit status."""
    from streampipe.stages.proctitle import set_title, starting
    from streampipe.stages.runtime import main

    set_title(starting(spec.ident), spec.pipeline)
    health = Health(spec)
    server = serve_health(health, health_port, health_host) if health_port is not None else None
    try:
        return main(spec, host=health)
    finally:
        if server is not None:
            server.shutdown()
