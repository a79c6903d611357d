"""The wiring between stages: which replica sends to which, at what address, and who is fenced.

The :class:`Wiring` answers, for the running config (and, during an ``apply``, the config it
replaces and the edges that still drain), what each replica is started with (its spec: input,
ack and output addresses, the ack peers it answers), and tells running replicas when that
changes: a scale moves the endpoints of an edge; a new producer is a new ack peer; a replica in
a graceful stop (a drain) has its senders fence it, and hears again whose FENCE to wait for when
a sender exits or starts. An address is the same for every incarnation of a replica, so that
upstream PUSH sockets reconnect to a replacement by themselves.
"""

from __future__ import annotations

import os
import random
import socket
from typing import TYPE_CHECKING

from streampipe.launcher.config import Edge, PipelineConfig
from streampipe.launcher.replica import Replica, State
from streampipe.launcher.specs import stage_spec
from streampipe.stages.spec import EdgeSpec, StageSpec

if TYPE_CHECKING:
    from streampipe.launcher.supervisor import Supervisor


class Wiring:
    """The addresses and edges of every replica (see the module's docstring)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.ports: dict[tuple[str, str, int], int] = {}
        self.retired: PipelineConfig | None = None           # during an apply: the config being replaced ...
        self.draining: list[Edge] = []                       # ... and its edges that may still carry data
        self.drains: dict[str, Replica] = {}                 # replicas in a graceful stop, by ident (Watcher.stop_replica)

    def spec_for(self, rep: Replica) -> StageSpec:
        cfg, sc = self.sup.cfg, rep.cfg
        edges = []
        if rep.stage not in cfg.stages and self.retired is not None:
            cfg = self.retired    # a stage an apply is removing keeps its old edges until it stops
        for e in cfg.edges():
            if e.src == rep.stage:
                edges.append(EdgeSpec(name=e.name, output=e.output, dest=e.dest, endpoints=self.endpoints_of(e.dest),
                                      keyed=cfg.stages[e.dest].partitioned_by_id, key_field=cfg.stages[e.dest].partition_key))
        tcp = cfg.transport == "tcp"
        return stage_spec(
            cfg, sc, rep.index, len(self.sup.replicas[rep.stage]), self.sup.rd.path, control=self.sup.rd.stages,
            input=self.endpoint("i", rep.stage, rep.index) if sc.inputs else None,
            ack=self.endpoint("a", rep.stage, rep.index), edges=edges, ack_peers=self.ack_peers(rep.stage),
            supervisor_pid=os.getpid(), bind_host=cfg.bind_host if tcp else "",
            curve_keys=str(cfg.keys_dir) if tcp and cfg.security == "curve" and cfg.keys_dir else None)

    def ack_peers(self, stage: str) -> list[str]:
        """The ack endpoints of every replica feeding ``stage``: the only ones its replicas ack to."""
        return sorted({self.endpoint("a", r.stage, r.index) for r, _ in self.upstream_replicas(stage)})

    def endpoints_of(self, stage: str) -> list[str]:
        return [self.endpoint("i", stage, r.index) for r in self.sup.replicas[stage] if not r.wanted_down]

    def endpoint(self, kind: str, stage: str, index: int) -> str:
        """A replica's input ("i") or ack ("a") endpoint; the same one for every incarnation,
        so that upstream PUSH sockets reconnect to a replacement by themselves."""
        if self.sup.cfg.transport == "ipc":
            return self.sup.rd.endpoint(f"{kind}.{stage}.{index}")
        key = (kind, stage, index)
        if key not in self.ports:
            self.ports[key] = free_port(self.sup.cfg.bind_host)
        return f"tcp://{self.sup.cfg.bind_host}:{self.ports[key]}"

    def upstream_replicas(self, stage: str) -> list[tuple[Replica, str]]:
        """The replicas sending to ``stage`` (during an apply, also on the old edges still draining)."""
        edges = self.sup.cfg.edges() + [e for e in self.draining if e.src in self.sup.replicas]
        return [(r, e.name) for e in edges if e.dest == stage for r in self.sup.replicas.get(e.src, [])]

    def fence(self, rep: Replica, on: bool) -> list[str]:
        """Tell the running replicas that send to ``rep`` to send it nothing more (``on``) or again;
        returns their ack addresses (the FENCEs ``rep`` waits for)."""
        endpoint = self.endpoint("i", rep.stage, rep.index)
        told = []
        for up, edge in self.upstream_replicas(rep.stage):
            if up.pid is not None and (up.live or up.state == State.STOPPING):
                self.sup.tell(up, "fence", edge=edge, endpoint=endpoint, on=on)
                told.append(self.endpoint("a", up.stage, up.index))
        return sorted(set(told))

    def retell_drains(self) -> None:
        """A replica exited or became READY: the replicas draining hear again whose FENCE to wait
        for (an exited sender sends none; a new one has just been told to fence)."""
        for rep in self.drains.values():
            self.sup.tell(rep, "stop", senders=self.fence(rep, True))

    def announce_endpoints(self, stage: str) -> None:
        endpoints = self.endpoints_of(stage)
        for rep, edge in self.upstream_replicas(stage):
            self.sup.tell(rep, "connect", edge=edge, endpoints=endpoints)

    def announce_ack_peers(self, stage: str) -> None:
        """Tell the stages fed by ``stage`` the ack addresses of its replicas, now that they changed."""
        for dest in {e.dest for e in self.sup.cfg.edges() if e.src == stage}:
            acks = self.ack_peers(dest)
            for rep in self.sup.replicas[dest]:
                self.sup.tell(rep, "peers", acks=acks)


PORT_TRIES = 64    # random picks below the ephemeral range before falling back to the kernel's choice


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux), or IANA's."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now, which the stage binds a moment later (ZeroMQ sets SO_REUSEADDR).

    Picked at random *below* the ephemeral range: a port there is taken only by a server that binds
    it, never by the local end of some outgoing connection made between this pick and the stage's
    bind (on a busy machine one took a replica's ack port in that moment: ``Address already in use``).
    """
    low, _ = ephemeral_range()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if low > 11024:
        for port in random.sample(range(10000, low - 1024), PORT_TRIES):
            with socket.socket(family) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
