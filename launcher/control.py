"""Control commands: the CLI's requests to a running supervisor, one small object each.

Each :class:`Command` has a ``name``, turns CLI arguments into a message (:meth:`message`) and
carries it out inside the supervisor (:meth:`execute`). The wire is REQ -> ROUTER on
``<run dir>/sock/control``, msgpack both ways; the socket file lives in the 0700 run directory,
so only its owner can talk to it. :func:`request` is the client side, always with a timeout.

The client packs its request and unpacks the reply with msgpack itself, as :mod:`streampipe.stages.wire`
does (``use_bin_type``, ``raw=False``): requests and replies are plain maps, and ``wire`` imports
numpy for its column frames (~150 ms), which ``streampipe status`` must not pay. The supervisor
reads a request with :func:`wire.read_command` and packs its reply with :func:`wire.packb`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
import zmq

from streampipe.launcher.errors import ControlError, NotRunning
from streampipe.launcher.rundir import RunDir

if TYPE_CHECKING:
    from streampipe.launcher.supervisor import Supervisor

REQUEST_TIMEOUT_S = 10.0    # a busy supervisor answers status in ms; 10 s means it is wedged
ACTION_TIMEOUT_S = 300.0    # a rolling restart or a scale waits for READY replica by replica
MAX_REPLICAS = 64           # of one stage: each is a process, and its producers keep a socket per replica


class Command:
    name: ClassVar[str]

    def message(self, **args: Any) -> dict[str, Any]:
        return {"cmd": self.name, **args}

    async def execute(self, sup: Supervisor, msg: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class Status(Command):
    """Every stage replica: pid, state, uptime, restarts, CPU, RSS, counters, last error."""

    name = "status"

    async def execute(self, sup: Supervisor, msg: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **sup.status()}


class Down(Command):
    """Stop the pipeline: sources first, SIGTERM, grace period, SIGKILL; then the supervisor exits."""

    name = "down"

    async def execute(self, sup: Supervisor, msg: dict[str, Any]) -> dict[str, Any]:
        sup.request_stop()
        return {"ok": True, "supervisor_pid": sup.status()["supervisor_pid"]}


def _stage_of(sup: Supervisor, msg: dict[str, Any]) -> str:
    stage = msg.get("stage", "")
    if stage not in sup.watchers:
        raise ControlError(f"no stage {stage!r} (stages: {', '.join(sup.watchers)})")
    return stage


class Restart(Command):
    """Rolling restart of one stage: replica by replica, each READY before the next stops."""

    name = "restart"

    async def execute(self, sup: Supervisor, msg: dict[str, Any]) -> dict[str, Any]:
        return await sup.watchers[_stage_of(sup, msg)].restart()


class Scale(Command):
    """Set a stage's replica count while data flows; upstream PUSH sockets follow."""

    name = "scale"

    async def execute(self, sup: Supervisor, msg: dict[str, Any]) -> dict[str, Any]:
        n = int(msg.get("replicas", 0))
        if not 1 <= n <= MAX_REPLICAS:
            raise ControlError(f"replicas must be between 1 and {MAX_REPLICAS}")
        stage = _stage_of(sup, msg)
        if sup.is_source(stage):
            # a source's replicas split one stream by their count: their saved positions are
            # re-dealt while none of them runs, i.e. when the pipeline starts
            raise ControlError(f"{stage} is a source and cannot be scaled while it runs: set `replicas: {n}` on it in "
                               f"{sup.cfg.path.name}, then `streampipe down` and `streampipe up`; its saved positions are "
                               f"repartitioned exactly, so no record is skipped or repeated")
        return await sup.watchers[stage].scale(n)


class Apply(Command):
    """Apply a changed services.yaml to the running pipeline (``dry_run``: only plan it).

    The CLI has validated the file (exit 2 on an error); the supervisor reads it again (the
    file may have changed since) without inspecting the stage code, plans, and carries the plan
    out (:mod:`streampipe.launcher.apply`). The reply is the plan and what was refused.
    """

    name = "apply"

    async def execute(self, sup: Supervisor, msg: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        from streampipe.launcher.apply import apply_config
        from streampipe.launcher.config import load_config

        path = msg.get("config")
        if not isinstance(path, str) or not path:
            raise ControlError("apply needs the config file's path")
        new = await asyncio.to_thread(load_config, path, check_stages=False)
        return await apply_config(sup, new, dry_run=bool(msg.get("dry_run", False)))


class Replay(Command):
    """Replay a stage's dead letters: its first live replica puts each through ``process`` again
    (:mod:`streampipe.stages.runtime.replay`); the CLI follows ``<stage>.replayed`` to see them settle."""

    name = "replay"

    async def execute(self, sup: Supervisor, msg: dict[str, Any]) -> dict[str, Any]:
        from streampipe.launcher.replica import LIVE

        stage = _stage_of(sup, msg)
        if sup.is_source(stage):
            raise ControlError(f"{stage} is a source: its dead letters are lines of its input it could not read, "
                               "not records it took in; fix the input and let the source read it again")
        live = [r for r in sup.watchers[stage].replicas if r.state in LIVE]
        if not live:
            raise ControlError(f"no replica of {stage} is running to replay into (streampipe status)")
        sup.tell(live[0], "replay")
        return {"ok": True, "replica": live[0].ident}


COMMANDS: dict[str, Command] = {c.name: c for c in (Status(), Down(), Restart(), Scale(), Apply(), Replay())}


def request(run_dir: Path | str, cmd: str, timeout: float = REQUEST_TIMEOUT_S, **args: Any) -> dict[str, Any]:
    """Send one command to the supervisor of ``run_dir`` and return its reply."""
    rd = RunDir(run_dir)
    pid = rd.supervisor_pid()
    if pid is None:
        raise NotRunning(f"no pipeline is running in {rd.path}")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        sock.connect(rd.control)
        sock.send(msgpack.packb(COMMANDS[cmd].message(**args), use_bin_type=True))
        reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
    except zmq.Again:
        raise ControlError(f"the supervisor (pid {pid}) did not answer {cmd!r} within {timeout:g}s") from None
    except zmq.ZMQError as exc:
        raise ControlError(f"cannot reach the supervisor (pid {pid}) at {rd.control}: {exc}") from None
    finally:
        sock.close()
    if not reply.get("ok", False):
        raise ControlError(reply.get("error", "the supervisor refused the command"))
    return reply


def restart_stage(run_dir: Path | str, stage: str) -> dict[str, Any]:
    """``streampipe restart STAGE`` (the CLI and the dashboard): a rolling restart, once it is done."""
    return request(run_dir, "restart", timeout=ACTION_TIMEOUT_S, stage=stage)


def scale_stage(run_dir: Path | str, stage: str, replicas: int) -> dict[str, Any]:
    """``streampipe scale STAGE N`` (the CLI and the dashboard); the supervisor checks the rest (a source)."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ControlError(f"replicas must be between 1 and {MAX_REPLICAS}")
    return request(run_dir, "scale", timeout=ACTION_TIMEOUT_S, stage=stage, replicas=replicas)
