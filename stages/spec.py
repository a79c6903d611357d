"""What the supervisor tells a stage process about itself: its identity, endpoints and limits.

Passed as JSON in the ``STREAMPIPE_SPEC`` environment variable (cold start) or over the fork
server's pipe (fork-server start). Plain data only.
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

ENV_VAR = "STREAMPIPE_SPEC"
DUMP_STACK_SIGNAL = signal.SIGUSR2   # a stage writes its Python stack to its .stderr on it (faulthandler)


@dataclass
class EdgeSpec:
    name: str                  # "<output>><dest>"
    output: str                # the stage's output feeding this edge
    dest: str
    endpoints: list[str]       # one per replica of dest
    addresses: list[str] = field(default_factory=list)   # or: names resolved to the replicas (run-stage)
    port: int = 0              # ... and the port they bind
    keyed: bool = False        # dest is partitioned by id: records go to a replica by their id's block
    key_field: str | None = None   # dest is partitioned by key (``partition: key``): records go by this field's key group


@dataclass
class StageSpec:
    name: str
    replica: int
    replicas: int
    type: str
    options: dict[str, Any]
    run_dir: str
    config_dir: str
    control: str               # supervisor ROUTER endpoint ("" for run-stage: no supervisor)
    input: str | None          # PULL endpoint this replica binds (None for a source)
    ack: str                   # PULL endpoint for acks this replica binds
    edges: list[EdgeSpec] = field(default_factory=list)
    ack_peers: list[str] = field(default_factory=list)   # ack endpoints of the replicas feeding this one
    supervisor_pid: int = 0
    delivery: str = "at-least-once"
    max_batch: int = 1000
    linger_ms: float = 1.0
    hwm: int = 100
    max_inflight: int = 32
    ack_timeout: float = 2.0
    max_message_bytes: int = 64 << 20   # a data frame larger than this is refused by the receiver (MAXMSGSIZE)
    stop_grace: float = 5.0
    log_level: str = "INFO"
    log_rotation: str = "10 MB"
    log_retention: int = 5
    pipeline: str = "pipeline"  # the pipeline's name, for the process title
    file_max_bytes: int = 10 * 2**20   # dead letters and .stderr rotate at this size
    # across machines (streampipe.stages.network)
    bind_host: str = ""                # tcp: the host its sockets bind; a PUSH connects from it too
    advertise_host: str | None = None  # tcp: the host written into headers for acks
    resolve_interval: float = 5.0
    curve_keys: str | None = None      # the key folder: CURVE on every tcp socket
    heartbeat_timeout: float = 10.0    # an edge without a receiver this long is unreachable
    last_exit: str = ""                # how the previous process of this replica ended (a poison record's reason)
    keyed: bool = False                # partition: key (its saved state is for one replica count: stages/repartition.py)
    inputs: list[str] = field(default_factory=list)   # its ``inputs:`` as services.yaml names them (StageContext.inputs)

    @property
    def ident(self) -> str:
        return f"{self.name}.{self.replica}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StageSpec:
        data = json.loads(text)
        data["edges"] = [EdgeSpec(**e) for e in data.get("edges", [])]
        return cls(**data)
