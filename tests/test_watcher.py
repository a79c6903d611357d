"""One stage's watcher without a process or a socket (launcher/watcher.py).

The watcher is driven with a stand-in supervisor: its ``start_replica`` records the start and
gives the replica a pid no process can have (above the kernel's largest ``pid_max``), so every
signal the watcher sends finds no process; exits are fed to :meth:`Watcher.on_exit` by hand, as
the supervisor's SIGCHLD handler would. The event log is real, so the test reads what
``streampipe events`` would show.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from streampipe.launcher.config import StageConfig
from streampipe.launcher.replica import Replica, State
from streampipe.launcher.watcher import Watcher
from streampipe.monitor.events import EventLog
from streampipe.monitor.health import Reading

NO_SUCH_PID = 4_194_304 + 17     # above the largest pid_max Linux allows: no process has it


class Probe:
    def read(self) -> Reading:
        return Reading()


class StandIn:
    """What a watcher uses of its supervisor, with starts recorded instead of made."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "logs").mkdir()
        (tmp / "state").mkdir()
        self.rd = SimpleNamespace(path=tmp, logs=tmp / "logs", state=tmp / "state")
        self.cfg = SimpleNamespace(config_dir=tmp, is_source=lambda name: False)
        self.events = EventLog(tmp / "events.jsonl")
        self.stopping = False
        self.stage_sock = None
        self.by_ident: dict[str, Replica] = {}
        self.watchers: dict[str, Watcher] = {}
        self.wiring = SimpleNamespace(drains={}, retell_drains=lambda: None)
        self.started: list[str] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start_replica(self, rep: Replica) -> None:
        self.started.append(rep.ident)
        rep.spawned(NO_SUCH_PID, "cold", Probe())   # type: ignore[arg-type]

    def own(self, coro: Coroutine[Any, Any, Any], what: str, rep: Replica | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self.tasks.add(task)
        return task

    def reap(self) -> None:
        pass

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events.recent]


def watcher_of(tmp: Path, **cfg: Any) -> tuple[StandIn, Watcher]:
    sup = StandIn(tmp)
    w = Watcher(sup, "norm", StageConfig(type="normalizer", inputs=["gen"], **cfg))  # type: ignore[arg-type]
    sup.watchers["norm"] = w
    return sup, w


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_exits_go_through_backoff_then_fail_past_the_restart_limit(tmp_path: Path) -> None:
    async def run() -> None:
        sup, w = watcher_of(tmp_path, backoff_initial=0.01, backoff_max=0.02, max_restarts=2, restart_window=60)
        rep = w.replicas[0]
        await w.start()
        assert sup.started == ["norm.0"] and rep.state == State.STARTING
        w.on_exit(rep, 1)                      # the first crash: started again at once
        assert rep.state == State.STARTING and rep.pid is None
        await until(lambda: len(sup.started) == 2)
        w.on_exit(rep, 1)                      # the second, soon after: a backoff first
        assert rep.state == State.BACKOFF and rep.pid is None
        await until(lambda: len(sup.started) == 3)
        assert rep.state == State.STARTING and rep.restarts == 2
        w.on_exit(rep, 1)                      # the third: past max_restarts in the window
        assert rep.state == State.FAILED and rep.settled.is_set()
        await asyncio.sleep(0.1)
        assert len(sup.started) == 3           # and nothing starts it again
        assert sup.kinds() == ["exit", "restart", "exit", "backoff", "restart", "exit", "failed"]

    asyncio.run(run())


def test_a_hung_replica_is_killed_and_replaced(tmp_path: Path) -> None:
    async def run() -> None:
        sup, w = watcher_of(tmp_path, heartbeat_timeout=0.05, stop_grace=0.5, backoff_initial=0.0, min_uptime=0.0)
        rep = w.replicas[0]
        await w.start()
        rep.ready(time.time())
        await asyncio.sleep(0.1)               # no heartbeat since READY for twice heartbeat_timeout
        w.check_health(time.monotonic())
        await asyncio.sleep(0)                 # the kill runs as a task of its own
        assert rep.state == State.STOPPING and rep.kill_reason.startswith("hung")
        await asyncio.sleep(0.05)
        w.on_exit(rep, -15)                    # its SIGTERM, as SIGCHLD would report it
        await until(lambda: len(sup.started) == 2)
        assert rep.state == State.STARTING and not rep.kill_reason
        assert sup.kinds()[:3] == ["hung", "exit", "restart"]

    asyncio.run(run())


def test_a_wanted_stop_is_not_restarted_and_a_removed_stage_is_not_respawned(tmp_path: Path) -> None:
    async def run() -> None:
        sup, w = watcher_of(tmp_path, replicas=2, backoff_initial=0.05)
        await w.start()
        first, second = w.replicas
        first.stopping(True, "")              # a wanted stop (down, scale): its exit is final
        w.on_exit(first, 0)
        assert first.state == State.STOPPED
        w.on_exit(second, 1)                   # a crash: a respawn is due ...
        assert second.state == State.STARTING
        del sup.watchers["norm"]               # ... but an apply removed the stage meanwhile
        await asyncio.sleep(0.2)
        assert sup.started == ["norm.0", "norm.1"]

    asyncio.run(run())
