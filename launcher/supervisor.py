"""The supervisor: one asyncio program that starts, watches, heals and stops the stage processes.

Tasks of one supervisor::

    control   ROUTER <run dir>/sock/control   CLI requests (status, down, restart, scale, apply)
    stages    ROUTER <run dir>/sock/stages    hello / ready / heartbeats / errors from stages
    SIGCHLD   waitpid(-1, WNOHANG)            exits, noticed at once, for every stage
    health    every poll_interval             psutil readings, limits, hung detection
    history   every few seconds               <run dir>/status-history.jsonl (for `report`)

Every task the supervisor starts is owned (:meth:`Supervisor.own`): its failure is an event
(``task-failed``) and is handled. A replica's task (a respawn, a kill) that fails sends the
replica through its restart policy (backoff, or ``failed`` with the error in ``status``); one of
the loops above that fails is started again, and past its restart intensity the supervisor stops
every stage and exits 1, loudly, instead of running half-blind (without the stage-message loop,
every stage would be killed as hung). Commands that start or stop the replicas of one stage
(restart, scale, a respawn) hold that stage's lock, so they never interleave; ``apply`` (a changed
``services.yaml``, also on SIGHUP) runs one at a time and takes each stage's lock for its steps
(:mod:`streampipe.launcher.apply`).

Start order is downstream first (a stage's input is bound before its producers connect);
each stage's replicas must report READY, or fail, or time out, before its producers start.
Stop order is the reverse: sources first, so everything in flight drains downstream.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from loguru import logger

from streampipe._rotating import RotatingFile, rotate_stdio
from streampipe.launcher import fencing
from streampipe.launcher.apply import apply_config
from streampipe.launcher.config import PipelineConfig, load_config
from streampipe.launcher.control import COMMANDS, Command
from streampipe.launcher.errors import StageError, StreampipeError
from streampipe.launcher.plan import replica_drift
from streampipe.launcher.replica import Replica, State
from streampipe.launcher.rundir import RunDir, longest_socket_name
from streampipe.launcher.spawn import ForkServer, become_subreaper, spawn_stage_cold
from streampipe.launcher.watcher import Watcher
from streampipe.launcher.wiring import Wiring
from streampipe.monitor.events import EventLog
from streampipe.monitor.health import Probe
from streampipe.monitor.policy import RestartPolicy, describe_exit
from streampipe.stages import wire
from streampipe.stages.proctitle import set_title
from streampipe.stages.registry import target_of

HISTORY_INTERVAL_S = 2.0        # status-history.jsonl sampling: enough for a throughput curve
UNCLAIMED_KEEP = 8              # messages kept from a pid start_replica has not registered yet
UNCLAIMED_PIDS = 64             # ... for at most this many pids (stale replicas' last words)
UNCLAIMED_TTL_S = 10.0          # ... and for this long: a spawn reply takes ms, and pids are reused
LOOP_MAX_RESTARTS = 5           # a supervisor loop failing more often than this ...
LOOP_RESTART_WINDOW_S = 60.0    # ... in this long is broken, not unlucky: stop everything, exit 1


class Supervisor:
    def __init__(self, cfg: PipelineConfig, run_dir: Path | None = None, metrics_port: int | None = None,
                 watch: bool = False, exit_when_done: bool = False) -> None:
        self.cfg = cfg
        self.watch = watch                                   # up --watch: launcher/watch.py
        self.exit_when_done = exit_when_done                 # up --exit-when-done: a batch job
        self.done_code = 0                                   # ... 1 once a stage failed for good
        self.rd = RunDir(run_dir or cfg.default_run_dir())
        self.metrics_port = metrics_port
        self.watchers: dict[str, Watcher] = {}              # stage -> its replicas and every change to them
        self.by_pid: dict[int, Replica] = {}
        self.by_ident: dict[str, Replica] = {}
        self.early_exits: dict[int, tuple[float, int]] = {}                  # pid -> (seen at, exit code)
        self.unclaimed: dict[int, tuple[float, list[dict[str, Any]]]] = {}   # pid -> (seen at, messages)
        self.owned: set[asyncio.Task[Any]] = set()         # every task started: see own()
        self.apply_lock = asyncio.Lock()                     # one `apply` at a time, once the start-up is done
        self.started = False
        self.wiring = Wiring(self)                           # addresses, edges, fences and drains between the replicas
        self.exit_code = 0                                   # 1 once a loop failed for good
        self.fork_starting = False
        self.stop_requested = asyncio.Event()
        self.stopping = False
        self.started_at = time.time()
        self.fork: ForkServer | None = None
        self.events: EventLog | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.stage_sock: zmq.asyncio.Socket | None = None
        self.control_sock: zmq.asyncio.Socket | None = None
        self.snapshot: dict[str, Any] | None = None   # status() as of the last health tick (for other threads)
        self.rejects = wire.Rejects()                  # malformed messages dropped on the stages / control sockets
        self.commands = COMMANDS

    # -- public ------------------------------------------------------------------------------
    async def run(self) -> int:
        self.rd.claim(longest_socket_name(list(self.cfg.stages)))
        set_title("supervisor", self.cfg.pipeline)
        self._setup_logging()
        self.events = EventLog(self.rd.events, self.cfg.logging.file_max_bytes, self.cfg.logging.retention)
        self.events.emit("supervisor", reason=f"up: pipeline {self.cfg.pipeline!r} from {self.cfg.path}", pid=os.getpid())
        if not become_subreaper():
            logger.warning("could not become a child subreaper: fork-server stages are watched by pid only")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.own(self.reload(), "reload (SIGHUP)"))
        self.ctx = zmq.asyncio.Context()
        self.stage_sock = self.ctx.socket(zmq.ROUTER)
        self.stage_sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.stage_sock.setsockopt(zmq.LINGER, 0)
        self.stage_sock.setsockopt(zmq.MAXMSGSIZE, wire.CONTROL_MAX_BYTES)
        self.stage_sock.bind(self.rd.stages)
        self.control_sock = self.ctx.socket(zmq.ROUTER)
        self.control_sock.setsockopt(zmq.LINGER, 0)
        self.control_sock.setsockopt(zmq.MAXMSGSIZE, wire.CONTROL_MAX_BYTES)
        self.control_sock.bind(self.rd.control)
        for name, sc in self.cfg.stages.items():
            self.watchers[name] = Watcher(self, name, sc)
            for rep in self.watchers[name].replicas:
                rep.waiting()
        for what, loop_fn in (("stages", self._serve_stages), ("control", self._serve_control),
                              ("health", self._health_loop), ("history", self._history_loop)):
            self.own(self._keep(what, loop_fn), what, vital=True)
        code = 0
        try:
            if self.metrics_port is not None:
                from streampipe.launcher.metrics import serve_metrics

                try:
                    serve_metrics(self, self.metrics_port)
                except OSError as exc:
                    raise StageError(f"cannot serve metrics on 127.0.0.1:{self.metrics_port}: {exc.strerror}") from None
            if any(sc.spawn == "fork-server" for sc in self.cfg.stages.values()):
                await self._start_forkserver()
            await self._start_all()
            self.started = True
            if self.watch:
                from streampipe.launcher.watch import watch

                self.own(watch(self), "watch")
            await self.stop_requested.wait()
            code = self.exit_code or self.done_code
        except StreampipeError as exc:
            logger.error(str(exc))
            code = exc.exit_code
        except Exception as exc:
            logger.opt(exception=True).error(f"supervisor error: {exc}")
            code = 1
        finally:
            await self._shutdown()
        return code

    def request_stop(self) -> None:
        """First Ctrl-C / SIGTERM: graceful stop. A second one while stopping: SIGKILL everything now."""
        if self.stop_requested.is_set() and self.stopping:
            logger.warning("second interrupt: killing every stage now (SIGKILL)")
            for reps in self.replicas.values():
                for rep in reps:
                    rep.wanted_down = True
                    rep.signal(signal.SIGKILL)
            return
        if not self.stop_requested.is_set():
            logger.info("stopping the pipeline (sources first, then downstream); Ctrl-C again to kill at once")
        self.stop_requested.set()

    @property
    def replicas(self) -> dict[str, list[Replica]]:
        """Every stage's replicas, by stage (read only: the watchers own them)."""
        return {name: w.replicas for name, w in self.watchers.items()}

    def status(self) -> dict[str, Any]:
        """Every replica, in a fixed order (the config's stage order, then replica index; a stage an
        apply is removing last), and ``drift``: the stages whose running replica count is not the config's."""
        now = time.time()
        order = {name: i for i, name in enumerate(self.cfg.stages)}
        reps = sorted((r for rs in self.replicas.values() for r in rs), key=lambda r: (order.get(r.stage, len(order)), r.index))
        drift = replica_drift(self.cfg, {name: len(rs) for name, rs in self.replicas.items()})
        return {"supervisor_pid": os.getpid(), "pipeline": self.cfg.pipeline, "config": str(self.cfg.path),
                "run_dir": str(self.rd.path), "delivery": self.cfg.delivery, "uptime_s": round(now - self.started_at, 1),
                "forkserver_pid": self.fork.pid if self.fork else None, "drift": drift,
                "stopping": self.stopping, "malformed": dict(self.rejects.counts), "stages": [r.status(now) for r in reps]}

    # -- owned tasks -------------------------------------------------------------------------
    def own(self, coro: Coroutine[Any, Any, Any], what: str, rep: Replica | None = None, vital: bool = False) -> asyncio.Task[Any]:
        """Start ``coro`` as a task the supervisor keeps track of; a failure is handled, never lost.

        ``rep``: the replica the task works for (its failure goes through the replica's restart
        policy). ``vital``: one of the supervisor's own loops (its failure stops the supervisor).
        """
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self.owned.add(task)
        task.add_done_callback(functools.partial(self._task_done, what, rep, vital))
        return task

    def _task_done(self, what: str, rep: Replica | None, vital: bool, task: asyncio.Task[Any]) -> None:
        self.owned.discard(task)
        if task.cancelled() or task.exception() is None:
            if vital and not self.stopping and not task.cancelled():
                self.fail_loudly(f"the supervisor's {what} loop ended")
            return
        exc = task.exception()
        assert exc is not None
        try:
            self.task_failed(what, rep, exc)
        except Exception as again:   # reporting failed too (a full disk?): nothing is left to trust
            logger.opt(exception=again).critical(f"cannot handle the failure of {what}: {again}")
            self.fail_loudly(f"{what} failed and its failure could not be handled")
        if vital:
            self.fail_loudly(f"the supervisor's {what} loop failed: {type(exc).__name__}: {exc}")

    def task_failed(self, what: str, rep: Replica | None, exc: BaseException) -> None:
        """An event for a failed task; a replica's task sends the replica through its policy (its watcher's)."""
        reason = f"{what}: {type(exc).__name__}: {exc}"
        logger.opt(exception=exc).error(f"task failed: {reason}")
        assert self.events is not None
        watcher = self.watchers.get(rep.stage) if rep is not None else None
        if rep is None or watcher is None:
            self.events.emit("task-failed", reason=reason)
            return
        watcher.task_failed(what, rep, exc)

    async def _keep(self, what: str, loop_fn: Callable[[], Awaitable[None]]) -> None:
        """Run one of the supervisor's loops for as long as the supervisor runs.

        An unexpected error is a ``task-failed`` event and the loop starts again after a backoff;
        past ``LOOP_MAX_RESTARTS`` in ``LOOP_RESTART_WINDOW_S`` the supervisor stops every stage
        and exits 1.
        """
        policy = RestartPolicy(backoff_initial=0.05, backoff_max=1.0, max_restarts=LOOP_MAX_RESTARTS,
                               restart_window=LOOP_RESTART_WINDOW_S)
        assert self.events is not None
        while True:
            started = time.monotonic()
            try:
                await loop_fn()
                return
            except Exception as exc:
                decision = policy.on_exit(time.monotonic(), 1, time.monotonic() - started)
                then = f"restarting it in {decision.delay:.2f}s" if decision.action == "restart" else "giving up"
                logger.opt(exception=exc).error(f"the {what} loop failed: {exc}")
                self.events.emit("task-failed", reason=f"{what} loop: {type(exc).__name__}: {exc}; {then}")
                if decision.action != "restart":
                    self.fail_loudly(f"the {what} loop failed {LOOP_MAX_RESTARTS} times in {LOOP_RESTART_WINDOW_S:g}s")
                    return
                await asyncio.sleep(decision.delay)

    def fail_loudly(self, why: str) -> None:
        """Stop every stage and exit 1: the supervisor cannot watch them any more."""
        if self.stopping or self.exit_code:
            return
        self.exit_code = 1
        logger.critical(f"{why}: stopping every stage; the supervisor exits 1")
        if self.events is not None:
            self.events.emit("supervisor", reason=f"{why}: stopping", pid=os.getpid())
        self.request_stop()

    # -- set-up ------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        logger.add(self.rd.logs / "supervisor.jsonl", serialize=True, level="DEBUG", rotation=self.cfg.logging.rotation,
                   retention=self.cfg.logging.retention, diagnose=False)    # no variable values in tracebacks
        logger.configure(extra={"stage": "supervisor", "replica": 0})

    async def _start_forkserver(self) -> None:
        if self.fork_starting or self.stopping:
            return   # one start at a time
        self.fork_starting = True
        types = sorted({sc.type for sc in self.cfg.stages.values()})
        fork = self.fork = ForkServer(types, self.cfg.config_dir, self.rd.logs / "forkserver.stderr", self.cfg.pipeline)
        t0 = time.monotonic()
        try:
            await fork.start()
        except Exception as exc:
            logger.warning(f"fork server did not start ({exc}); stages start cold")
            fork.kill()
            if self.fork is fork:
                self.fork = None
            return
        finally:
            self.fork_starting = False
        assert self.events is not None
        self.events.emit("forkserver", pid=fork.pid, reason=f"preloaded in {time.monotonic() - t0:.2f}s")

    async def _start_all(self) -> None:
        """Each stage's replicas, downstream first; each stage READY (or failed, or timed out) before its producers."""
        for name in self.cfg.downstream_first():
            if self.stop_requested.is_set():
                return
            await self.watchers[name].start()
            await self.watchers[name].settle(until=self.stop_requested)

    # -- spawning ----------------------------------------------------------------------------
    async def start_replica(self, rep: Replica) -> None:
        if self.stopping or rep.pid is not None:
            return   # stopping, or already running (a restart racing the start-up)
        spec = self.wiring.spec_for(rep)
        spec.last_exit = rep.kill_reason or rep.last_exit    # a record in hand at that death is a suspect (stages.poison)
        stderr = self.rd.logs / f"{rep.ident}.stderr"
        module = target_of(rep.cfg.type).partition(":")[0]
        await self._clear_fence(rep)
        if self.stopping or rep.pid is not None:
            return
        t0 = time.monotonic()
        fork = self.fork if rep.cfg.spawn == "fork-server" and self.fork is not None and self.fork.ready else None
        if fork is not None and fork.changed(module):
            if module not in fork.failed:   # edited since the preload: fresh code, and a fresh server
                logger.info(f"{module} changed since the fork server preloaded it: {rep.ident} starts cold; reloading the fork server")
                self.own(self._restart_forkserver(), "fork server reload")
            fork = None
        pid, mode = None, "cold"
        if fork is not None:
            try:
                pid, mode = await fork.spawn(spec, stderr), "fork-server"
            except Exception as exc:
                logger.warning(f"fork server spawn failed ({exc}); starting {rep.ident} cold and replacing the server")
                fork.kill()   # reaped in _reap, which starts a new one
                await self._clear_fence(rep)   # the server may have forked the stage before it stalled
        if pid is None:
            try:
                pid = spawn_stage_cold(spec, stderr)
            except OSError as exc:
                raise StageError(f"cannot start {rep.ident}: {exc}") from exc
        if rep.pid is not None or self.stopping:   # raced with another start while we awaited the server
            os.kill(pid, signal.SIGKILL)
            return
        rep.spawned(pid, mode, Probe(pid))
        self.by_pid[pid] = rep
        assert self.events is not None
        self.events.emit("start", rep.stage, rep.index, pid, reason=f"{mode} spawn in {1000 * (time.monotonic() - t0):.1f} ms",
                         spawn=mode, t_spawn=time.time())
        for msg in self.unclaimed.pop(pid, (0.0, []))[1]:
            self._on_stage_message(rep, msg)
        if pid in self.early_exits:
            asyncio.get_running_loop().call_soon(self._exited, self.by_pid.pop(pid), self.early_exits.pop(pid)[1])

    async def _clear_fence(self, rep: Replica) -> None:
        """Kill a stale process holding the replica's lock, before another is made (launcher/fencing.py)."""
        for stale in await fencing.clear(self.rd.path, rep.ident):
            assert self.events is not None
            self.events.emit("fenced", rep.stage, rep.index, stale, reason="a stale process held the replica's lock: SIGKILLed")

    async def _restart_forkserver(self) -> None:
        old = self.fork
        if old is not None:
            old.stop()
        await self._start_forkserver()

    # -- exits -------------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.fork is not None and pid == self.fork.pid:
                self.fork.lost()
                if not self.stopping:
                    assert self.events is not None
                    self.events.emit("forkserver", pid=pid, reason=f"fork server died ({describe_exit(code)}); restarting it")
                    self.own(self._start_forkserver(), "fork server start")
                continue
            rep = self.by_pid.pop(pid, None)
            if rep is not None and rep.pid == pid:
                self._exited(rep, code)
            elif rep is None:   # a stage that exited before start_replica registered it, or a stage's orphan
                self.early_exits[pid] = (time.monotonic(), code)
                expire(self.early_exits)

    # -- killing -----------------------------------------------------------------------------
    def _exited(self, rep: Replica, code: int) -> None:
        watcher = self.watchers.get(rep.stage)
        if watcher is not None:
            watcher.on_exit(rep, code)
        else:   # its stage was removed by an apply that gave up waiting for it
            rep.gone()

    async def _shutdown(self) -> None:
        self.stopping = True
        order = list(reversed(self.cfg.downstream_first()))
        order = [n for n in self.replicas if n not in order] + order   # a stage an apply was removing: first
        for name in order:
            if name in self.watchers:
                await self.watchers[name].stop()
        if self.fork is not None:
            self.fork.stop()
            pid = self.fork.pid
            if pid:
                await asyncio.sleep(0)
                for _ in range(50):
                    if self.fork.pid is None:
                        break
                    await asyncio.sleep(0.02)
                if self.fork.pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    await asyncio.sleep(0.05)
        self.reap()
        owned = list(self.owned)
        for t in owned:
            t.cancel()
        await asyncio.gather(*owned, return_exceptions=True)
        if self.events is not None:
            self.events.emit("supervisor", reason="down: every stage stopped", pid=os.getpid())
            self.events.close()
        for sock in (self.stage_sock, self.control_sock):
            if sock is not None:
                sock.close(linger=0)
        if self.ctx is not None:
            self.ctx.term()
        self.rd.release()

    # -- stage messages ----------------------------------------------------------------------
    async def _serve_stages(self) -> None:
        assert self.stage_sock is not None
        while True:
            frames = await self.stage_sock.recv_multipart()
            try:   # bad input is counted and dropped: this task must outlive any message
                msg = wire.read_stage_message(wire.single(frames[1:]))
                rep = self.by_ident.get(frames[0].decode(errors="replace"))
                if rep is None:
                    raise wire.Malformed(f"from an unknown stage {frames[0][:60]!r}")
            except wire.Malformed as exc:
                self.rejects.drop("stages", str(exc))
                continue
            pid = msg["pid"]
            if pid and rep.pid != pid:
                # from a replica already replaced, or from one so quick that its READY beat the
                # fork server's reply: keep it until start_replica knows the pid
                early = self.unclaimed.setdefault(pid, (time.monotonic(), []))[1]
                if len(early) < UNCLAIMED_KEEP:
                    early.append(msg)
                expire(self.unclaimed)
                continue
            self._on_stage_message(rep, msg)

    def _on_stage_message(self, rep: Replica, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        now = time.time()
        assert self.events is not None
        if op == "hb":
            rep.beat(msg, now)
        elif op == "ready":
            rep.ready(now)
            if rep.cfg.inputs:   # its spec may predate a scale upstream
                self.tell(rep, "peers", acks=self.wiring.ack_peers(rep.stage))
            if self.wiring.drains:
                self.wiring.retell_drains()
            self.events.emit("ready", rep.stage, rep.index, rep.pid, reason=f"ready {now - rep.started_at:.3f}s after start",
                             t_ready=now, spawn=rep.spawn_mode)
        elif op == "error":
            rep.last_error = f"{msg.get('error', '')}\n{msg.get('traceback', '')}".strip()
        elif op == "completed":
            rep.completed()
            self.events.emit("completed", rep.stage, rep.index, rep.pid, reason=f"end of stream after {msg.get('records_out', '?')} records")

    def tell(self, rep: Replica, op: str, **fields: Any) -> None:
        if self.stage_sock is None:
            return
        try:
            self.stage_sock.send_multipart([rep.ident.encode(), wire.control(op, **fields)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # -- CLI requests ------------------------------------------------------------------------
    async def _serve_control(self) -> None:
        assert self.control_sock is not None
        while True:
            frames = await self.control_sock.recv_multipart()
            try:   # [ident, b"", request] from a REQ; anything else is counted, answered and dropped
                if len(frames) != 3 or frames[1]:
                    raise wire.Malformed(f"a request of {len(frames) - 1} frames, expected a REQ envelope")
                msg = wire.read_command(frames[2])
                command = self.commands.get(msg["cmd"])
                if command is None:
                    raise wire.Malformed(f"unknown command {msg['cmd'][:40]!r}")
            except wire.Malformed as exc:
                self.rejects.drop("control", str(exc))
                await self._reply(frames[0], {"ok": False, "error": f"malformed request: {exc}"})
                continue
            # each command in its own task: a rolling restart must not hold up `status`
            self.own(self._answer(frames[0], command, msg), "control command")

    async def _reply(self, ident: bytes, reply: dict[str, Any]) -> None:
        assert self.control_sock is not None
        try:   # a ROUTER never blocks: a reply to a requester that is gone is dropped
            await self.control_sock.send_multipart([ident, b"", wire.packb(reply)])
        except zmq.ZMQError:
            pass

    async def _answer(self, ident: bytes, command: Command, msg: dict[str, Any]) -> None:
        try:
            reply = await command.execute(self, msg)
        except StreampipeError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            logger.opt(exception=True).warning(f"control command failed: {exc}")
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        await self._reply(ident, reply)

    # -- runtime changes (used by commands) ------------------------------------------------
    def is_source(self, stage: str) -> bool:
        """Whether ``stage`` is a source (also for a stage an apply is removing)."""
        watcher = self.watchers.get(stage)
        return watcher.is_source() if watcher is not None else self.cfg.is_source(stage)

    async def reload(self) -> None:
        """SIGHUP: read the config file again and apply it; a bad file changes nothing (an event says why)."""
        assert self.events is not None
        try:
            new = await asyncio.to_thread(load_config, self.cfg.path)
        except StreampipeError as exc:
            logger.error(f"SIGHUP: {exc}; nothing changed")
            self.events.emit("apply", reason=f"SIGHUP: refused: {exc}; nothing changed")
            return
        try:
            reply = await apply_config(self, new)
        except StreampipeError as exc:
            logger.error(f"SIGHUP: {exc}")
            self.events.emit("apply", reason=f"SIGHUP: refused: {exc}; nothing changed")
            return
        if reply.get("refused"):
            logger.error("SIGHUP: " + "; ".join(reply["refused"]))

    # -- periodic ----------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval)   # read each tick: `apply` may change it
            now_m = time.monotonic()
            for watcher in list(self.watchers.values()):
                watcher.check_health(now_m)
            self.rejects.flush()   # the count of malformed messages not logged yet, if any
            self.snapshot = self.status()
            if self.exit_when_done and self.started and not self.stop_requested.is_set():
                self.stop_if_done()

    def stop_if_done(self) -> None:
        """``up --exit-when-done``: stop once every source replica has completed (its end of stream
        acknowledged, so every batch it sent is done end to end) and every other replica has ended
        its stream (its heartbeat says so once its receivers confirmed its own end of stream, so
        what its ``finish()`` made is done too), or with exit status 1 once a replica has failed
        for good (its restarts used up: it will not come back on its own)."""
        assert self.events is not None
        failed = [r.ident for reps in self.replicas.values() for r in reps if r.state == State.FAILED]
        sources = [r for name, reps in self.replicas.items() if self.is_source(name) for r in reps]
        others = [r for name, reps in self.replicas.items() if not self.is_source(name) for r in reps]
        if failed:
            self.done_code = 1
            self.events.emit("done", reason=f"failed: {', '.join(failed)}; stopping the pipeline (exit status 1)")
        elif (sources and all(r.state == State.COMPLETED for r in sources)
              and all(r.hb.get("finished") is True for r in others)):
            self.events.emit("done", reason="every source completed and every stage ended its stream; stopping the pipeline")
        else:
            return
        self.request_stop()

    async def _history_loop(self) -> None:
        """status-history.jsonl, and the rotation of this process's own output (``up --detach``)."""
        limit, keep = self.cfg.logging.file_max_bytes, self.cfg.logging.retention
        history = RotatingFile(self.rd.path / "status-history.jsonl", limit, keep)
        try:
            while True:
                await asyncio.sleep(HISTORY_INTERVAL_S)
                now = time.time()
                # type and stats(): `report` summarises a stage by them (a window's emitted, late, open, watermark)
                row = {"time": now, "stages": {r.ident: {"in": r.hb.get("records_in", 0), "out": r.hb.get("records_out", 0),
                                                         "state": r.state, "rss": r.reading.rss_bytes,
                                                         "cpu": r.reading.cpu_percent, "type": r.cfg.type,
                                                         "stats": r.hb.get("stats") or {}}
                                                for reps in self.replicas.values() for r in reps}}
                history.write(json.dumps(row, default=str) + "\n")     # a stage's stats may hold bytes
                rotate_stdio(self.rd.path / "supervisor.out", limit, keep)
        finally:
            history.close()


def _pgid_is(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def expire(table: dict[int, Any]) -> None:
    """Forget pid-keyed entries older than UNCLAIMED_TTL_S (pids get reused) or beyond UNCLAIMED_PIDS."""
    now = time.monotonic()
    for pid in [p for p, entry in table.items() if now - entry[0] > UNCLAIMED_TTL_S]:
        del table[pid]
    while len(table) > UNCLAIMED_PIDS:
        table.pop(next(iter(table)))


def run_supervisor(cfg: PipelineConfig, run_dir: Path | None = None, metrics_port: int | None = None,
                   watch: bool = False, exit_when_done: bool = False) -> int:
    return asyncio.run(Supervisor(cfg, run_dir, metrics_port, watch, exit_when_done).run())
