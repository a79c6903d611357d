"""The spec a stage replica starts from (:class:`streampipe.stages.spec.StageSpec`), built from the
config in one place for ``streampipe up`` (the supervisor fills in the endpoints it owns) and
``streampipe run-stage`` (endpoints from names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streampipe.launcher.config import PipelineConfig, StageConfig
from streampipe.stages.spec import EdgeSpec, StageSpec


def stage_spec(cfg: PipelineConfig, sc: StageConfig, replica: int, replicas: int, run_dir: Path, *,
               control: str, input: str | None, ack: str, edges: list[EdgeSpec], ack_peers: list[str],
               supervisor_pid: int, **network: Any) -> StageSpec:
    """The spec of one replica: what ``up`` and ``run-stage`` both hand to the stage runtime."""
    return StageSpec(
        name=sc.name, replica=replica, replicas=replicas, type=sc.type, options=sc.options, inputs=list(sc.inputs),
        run_dir=str(run_dir), config_dir=str(cfg.config_dir), control=control, input=input, ack=ack,
        edges=edges, ack_peers=ack_peers, supervisor_pid=supervisor_pid,
        max_message_bytes=int(cfg.max_message_mb * (1 << 20)), delivery=cfg.delivery, max_batch=sc.max_batch,
        linger_ms=sc.linger_ms, hwm=sc.hwm, max_inflight=sc.max_inflight, ack_timeout=sc.ack_timeout,
        stop_grace=sc.stop_grace, log_level=cfg.logging.level, log_rotation=cfg.logging.rotation,
        log_retention=cfg.logging.retention, pipeline=cfg.pipeline, file_max_bytes=cfg.logging.file_max_bytes,
        heartbeat_timeout=sc.heartbeat_timeout, resolve_interval=cfg.resolve_interval,
        keyed=sc.partition_key is not None, **network)
