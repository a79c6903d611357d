"""One stage's replicas, the circus way: a :class:`Watcher` per stage owns them.

A watcher holds its stage's :class:`~streampipe.launcher.replica.Replica` list and its lock, and
does everything that starts, stops or replaces them: the start-up (a source's saved positions
re-dealt first), a rolling restart, a scale, a removal by ``apply``, the stop of one replica (a
drain, or a signal), and the decision taken when one exits (restart after a backoff, stop, or
fail) or is found hung or over a limit. Commands that change a stage's replicas hold its lock,
so they never interleave; a kill takes none (it never starts anything, and a hung replica must
not wait for a rolling restart).

The :class:`~streampipe.launcher.supervisor.Supervisor` keeps what every stage shares (the
sockets and their loops, the fork server, the wiring between stages, the event log) and routes
to the watchers: an exit reaped by SIGCHLD goes to its replica's watcher, and ``control``,
``apply`` and ``watch`` call watcher methods.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from loguru import logger

from streampipe.launcher.config import StageConfig
from streampipe.launcher.replica import SETTLED, Replica, State, settle
from streampipe.monitor.events import EventLog
from streampipe.monitor.policy import describe_exit
from streampipe.stages.spec import DUMP_STACK_SIGNAL
from streampipe.stages.state import load_replica_state, read_layout

if TYPE_CHECKING:
    from streampipe.launcher.supervisor import Supervisor

STDERR_TAIL_LINES = 12          # lines of a dead stage's stderr shown as its last error
HUNG_KILL_GRACE_S = 1.0         # a hung loop will not honour SIGTERM; do not wait long
REPARTITION_TIMEOUT_S = 120.0   # the repartition child imports the source's module (scikit-learn alone ~2 s cold)


class Watcher:
    """The replicas of one stage and every change to them (see the module's docstring)."""

    def __init__(self, sup: Supervisor, name: str, sc: StageConfig) -> None:
        self.sup = sup
        self.name = name
        self.lock = asyncio.Lock()     # held by start, restart, scale, a respawn, a removal
        self.refusal = ""              # why the last repartition was refused
        self.replicas: list[Replica] = []
        for _ in range(sc.replicas):
            self.add_replica(sc)

    @property
    def events(self) -> EventLog:
        assert self.sup.events is not None
        return self.sup.events

    def add_replica(self, sc: StageConfig) -> Replica:
        rep = Replica.of(self.name, len(self.replicas), sc)
        self.replicas.append(rep)
        self.sup.by_ident[rep.ident] = rep
        return rep

    def is_source(self) -> bool:
        """Whether this stage is a source (also while an apply removes it: its replicas' config says)."""
        return not self.replicas[0].cfg.inputs if self.replicas else self.sup.cfg.is_source(self.name)

    # -- starting ----------------------------------------------------------------------------
    async def start_guarded(self, rep: Replica, what: str) -> None:
        """Start one replica inside a command or the start-up: a failure is the replica's, not the caller's."""
        try:
            await self.sup.start_replica(rep)
        except Exception as exc:
            self.task_failed(what, rep, exc)

    async def start(self) -> None:
        """Start every replica (a source's saved positions re-dealt first, if the count changed);
        returns once they are started, not READY (see :meth:`settle`)."""
        async with self.lock:
            if (self.is_source() or self.keyed()) and not await self.repartition():
                return
            for rep in self.replicas:
                rep.waiting()
                await self.start_guarded(rep, f"start {rep.ident}")

    async def settle(self, until: asyncio.Event | None = None) -> None:
        """Wait until every replica is READY, failed or completed, or the longest ``ready_timeout``
        passed (or ``until`` is set); a replica late past its timeout is a warning."""
        timeout = max(r.cfg.ready_timeout for r in self.replicas)
        if until is None:
            await settle(self.replicas, timeout)
            return
        stop = asyncio.ensure_future(until.wait())
        everyone = asyncio.ensure_future(settle(self.replicas, timeout))
        try:
            await asyncio.wait([everyone, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            everyone.cancel()
        late = [r.ident for r in self.replicas if not r.settled.is_set()]
        if late and not until.is_set():
            logger.warning(f"{', '.join(late)} not READY after {timeout:g}s; starting its producers anyway")

    def keyed(self) -> bool:
        """Whether the stage is partitioned by key: its state (if any) is re-dealt by key on a rescale."""
        return bool(self.replicas) and self.replicas[0].cfg.partition_key is not None

    async def repartition(self, fail: bool = True) -> bool:
        """Re-deal a source's saved positions (a keyed transform's state) when they were taken
        with another replica count.

        Runs ``python -m streampipe.stages.repartition`` (the supervisor never imports stage
        code) and waits for it. False when it refused or failed: with ``fail``, the stage's
        replicas are then ``failed`` with its message as their error, and are not started.
        """
        reps = self.replicas
        layout = read_layout(self.sup.rd.state, self.name)
        if layout is None or not layout.differs(len(reps)):
            return True
        spec = json.dumps({"name": self.name, "type": reps[0].cfg.type, "config_dir": str(self.sup.cfg.config_dir),
                           "run_dir": str(self.sup.rd.path), "replicas": len(reps), "keyed": not self.is_source()})
        cmd = [sys.executable, "-m", "streampipe.stages.repartition", spec]

        def run() -> tuple[str, str]:
            # the exit status may be reaped by the supervisor's SIGCHLD first: the answer is the JSON line on stdout
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
                try:
                    return proc.communicate(timeout=REPARTITION_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                    return out, f"{err}\nrepartition did not finish in {REPARTITION_TIMEOUT_S:g}s"

        out, err = await asyncio.to_thread(run)
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {"ok": False, "error": "\n".join(err.strip().splitlines()[-STDERR_TAIL_LINES:]) or "repartition failed"}
        if answer.get("ok"):
            self.events.emit("repartition", self.name, None, None, reason=str(answer.get("message", "")))
            return True
        error = str(answer.get("error", "repartition failed"))
        logger.error(error)
        self.refusal = error
        if fail:
            for rep in reps:
                rep.failed(error)
            self.events.emit("failed", self.name, None, None, reason="cannot repartition its saved positions", last_error=error)
        return False

    # -- commands ----------------------------------------------------------------------------
    async def restart(self, cfg: StageConfig | None = None) -> dict[str, Any]:
        """Rolling restart: one replica at a time, each READY before the next goes down.

        ``cfg`` (apply): each replica restarts with this config; one that runs it already is left alone.
        """
        async with self.lock:
            if self.is_source() and not await self.repartition():
                return {"ok": False, "error": self.replicas[0].last_error}
            for rep in list(self.replicas):
                if cfg is not None:
                    if rep.cfg is cfg:
                        continue
                    rep.retune(cfg)
                rep.policy.reset()
                rep.last_error = ""     # the error of the code or config replaced: status shows the new run's own
                if rep.pid is not None:
                    await self.stop_replica(rep, reason="restart requested")
                rep.wanted_down = False
                if rep.state != State.COMPLETED and not self.sup.stopping:
                    await self.start_guarded(rep, f"restart {rep.ident}")
                    await settle([rep], rep.cfg.ready_timeout)
            return {"ok": True, "stage": self.name, "replicas": len(self.replicas)}

    async def scale(self, n: int, cfg: StageConfig | None = None) -> dict[str, Any]:
        """Set the replica count; new replicas start with ``cfg`` (default: the others')."""
        async with self.lock:
            reps, sup = self.replicas, self.sup
            before = len(reps)
            if self.keyed() and n != before:
                return await self.rescale_keyed(n, cfg)
            if n > before:
                new = [self.add_replica(cfg or reps[0].cfg) for _ in range(before, n)]
                sup.wiring.announce_ack_peers(self.name)   # before they send: their batches must be acknowledged
                for rep in new:
                    await self.start_guarded(rep, f"start {rep.ident}")
                await settle(new, reps[0].cfg.ready_timeout)
                sup.wiring.announce_endpoints(self.name)
            elif n < before:
                gone = reps[n:]
                await asyncio.gather(*(self.stop_replica(r) for r in gone))   # drained: senders fence them first
                sup.wiring.announce_endpoints(self.name)       # wanted_down: they leave the senders' edges
                del reps[n:]
                for rep in gone:
                    sup.by_ident.pop(rep.ident, None)
                sup.wiring.announce_ack_peers(self.name)   # their receivers close the ack sockets towards them
            self.events.emit("scale", self.name, None, None, reason=f"{before} -> {n} replicas")
            return {"ok": True, "stage": self.name, "before": before, "after": n}

    async def rescale_keyed(self, n: int, cfg: StageConfig | None) -> dict[str, Any]:
        """The replica count of a stage partitioned by key: a change moves key groups, so every
        replica stops (drained: all it took is done, acknowledged and in its saved state), its
        state is re-dealt by key group (:mod:`streampipe.stages.repartition`), and the new count
        starts from it. The senders keep every replica fenced throughout, holding what they have
        for it; told the new replicas, they cut what they hold again for the new count, and send
        once every replica is READY. So each key's records and state meet at its new owner, and
        nothing is applied twice or skipped. Called with the lock held."""
        reps, sup = self.replicas, self.sup
        old, before = list(reps), len(reps)
        why = f"rescale {before} -> {n}: its keyed state is re-dealt"
        for rep in old:
            if not rep.live:                           # down (a crash, a backoff): its senders hold its share too
                sup.wiring.fence(rep, True)
        await asyncio.gather(*(self.stop_replica(r, reason=why, hold=True) for r in old))
        if n > before:
            for _ in range(before, n):
                self.add_replica(cfg or old[0].cfg)
        else:
            for rep in reps[n:]:
                sup.by_ident.pop(rep.ident, None)
            del reps[n:]
        self.refusal = ""
        if not await self.repartition(fail=False):
            for rep in reps[before:]:                  # refused: the old count again, from the old state
                sup.by_ident.pop(rep.ident, None)
            reps[:] = old
            for rep in old:
                sup.by_ident[rep.ident] = rep
        for rep in reps:
            rep.wanted_down = False                    # wanted again: the senders' edges list it
        sup.wiring.announce_ack_peers(self.name)       # the replicas' receivers take their batches
        sup.wiring.announce_endpoints(self.name)       # the senders cut again what they hold, for the new count
        for rep in reps:
            rep.waiting()
            await self.start_guarded(rep, f"start {rep.ident}")
        await settle(reps, reps[0].cfg.ready_timeout)
        for rep in reps:
            sup.wiring.fence(rep, False)
        after = len(reps)
        self.events.emit("scale", self.name, None, None, reason=f"{before} -> {after} replicas, keyed state re-dealt"
                         if after == n else f"refused, {before} replicas kept: {self.refusal}")
        if after != n:
            return {"ok": False, "error": self.refusal}
        return {"ok": True, "stage": self.name, "before": before, "after": n}

    async def remove(self, reason: str) -> None:
        """Drain and stop every replica for good (``apply`` removing the stage; nothing sends to it now)."""
        async with self.lock:
            for rep in self.replicas:
                rep.wanted_down = True
            await asyncio.gather(*(self.stop_replica(r, reason=reason) for r in self.replicas))
            for rep in self.replicas:
                self.sup.by_ident.pop(rep.ident, None)

    # -- stopping ----------------------------------------------------------------------------
    async def stop_replica(self, rep: Replica, grace: float | None = None, wanted: bool = True, reason: str = "",
                           hold: bool = False) -> None:
        """Stop a replica, SIGKILL it after the grace period; returns once it is reaped.
        ``hold``: its senders keep it fenced after it exits (a keyed rescale unfences it).

        A wanted stop of a running replica drains it: the replicas sending to it are told to send
        it nothing more (each answers with a FENCE behind its last batch), and it is told to stop
        once every FENCE is in, its batches are acknowledged downstream and its acks have gone
        upstream. Nothing it took is sent again, so nothing is processed twice. Any other stop
        (a hung or over-limit replica, one not READY yet) is a SIGTERM.
        """
        if rep.pid is None:
            if wanted:
                rep.cancel_start()
            return
        sup = self.sup
        drain = wanted and rep.live and sup.stage_sock is not None
        rep.stopping(wanted, reason)
        grace = rep.cfg.stop_grace if grace is None else grace
        if drain:
            sup.wiring.drains[rep.ident] = rep
            sup.tell(rep, "stop", senders=sup.wiring.fence(rep, True))
        else:
            rep.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(rep.exited.wait(), grace)
        except asyncio.TimeoutError:
            how = "did not drain" if drain else "still running"
            self.events.emit("kill", rep.stage, rep.index, rep.pid,
                             reason=f"{how} {grace:g}s after the stop (stop_grace): SIGKILL; what it had not acknowledged is sent again")
            rep.signal(signal.SIGKILL)
            try:
                await asyncio.wait_for(rep.exited.wait(), 5.0)
            except asyncio.TimeoutError:
                logger.error(f"{rep.ident} (pid {rep.pid}) did not die after SIGKILL")
        finally:
            if drain:
                sup.wiring.drains.pop(rep.ident, None)
                if not hold:
                    sup.wiring.fence(rep, False)

    async def stop(self) -> None:
        """Stop every replica (``down``): each drains, at once."""
        await asyncio.gather(*(self.stop_replica(r) for r in self.replicas))

    # -- health ------------------------------------------------------------------------------
    def check_health(self, now_m: float) -> None:
        """Read each running replica's process; replace one that is hung or over a limit (one
        found a zombie is reaped at once: its exit takes the normal path)."""
        for rep in self.replicas:
            if rep.probe is None or rep.pid is None or rep.kill_reason:
                continue
            rep.reading = rep.probe.read()
            if rep.reading.zombie:
                self.sup.reap()
                continue
            unhealthy = rep.health(now_m)
            if unhealthy:
                self.kill_unhealthy(rep, unhealthy[1], unhealthy[0])

    def kill_unhealthy(self, rep: Replica, reason: str, event: str) -> None:
        self.events.emit(event, rep.stage, rep.index, rep.pid, reason=reason)
        rep.last_error = reason
        if event == "hung":      # its Python stack to its .stderr first (faulthandler): `streampipe logs` shows where
            rep.signal(DUMP_STACK_SIGNAL)
        # no lock: a kill never starts anything, and a hung replica must not wait for a rolling restart
        self.sup.own(self.stop_replica(rep, grace=min(HUNG_KILL_GRACE_S, rep.cfg.stop_grace), wanted=False, reason=reason),
                     f"kill {rep.ident}", rep)

    # -- exits -------------------------------------------------------------------------------
    def task_failed(self, what: str, rep: Replica, exc: BaseException) -> None:
        """A task working for ``rep`` failed: the supervisor has logged it; the replica goes through its policy."""
        reason = f"{what}: {type(exc).__name__}: {exc}"
        self.events.emit("task-failed", rep.stage, rep.index, rep.pid, reason=reason)
        rep.last_error = reason
        if rep.pid is not None:
            # its process runs, but the work meant for it broke: kill it, its exit takes the normal path
            rep.kill_reason = reason
            rep.signal(signal.SIGKILL)
        elif not (rep.wanted_down or self.sup.stopping or rep.state in SETTLED):
            self.after_exit(rep, 1, 0.0, reason)

    def on_exit(self, rep: Replica, code: int) -> None:
        """``rep``'s process was reaped with exit status ``code``."""
        sup = self.sup
        if rep.pid is not None:
            try:   # whatever the stage started dies with it (its process group outlives it); not
                os.killpg(rep.pid, signal.SIGKILL)   # os.kill: the pid is reaped and may be reused
            except (ProcessLookupError, PermissionError):
                pass
        now = time.time()
        uptime = now - rep.started_at
        rep.last_exit = describe_exit(code)
        reason = rep.kill_reason or rep.last_exit
        if (rep.wanted_down or sup.stopping) and not rep.kill_reason:
            reason = f"stopped ({rep.last_exit})"
        if code != 0 and not rep.wanted_down:
            tail = self.stderr_tail(rep)
            if not rep.last_error or rep.kill_reason:
                rep.last_error = rep.kill_reason or tail or rep.last_exit
            elif tail and rep.last_error not in tail:
                rep.last_error = f"{rep.last_error}\n{tail}"
        pid = rep.pid
        rep.gone()
        sup.wiring.retell_drains()
        self.events.emit("exit", rep.stage, rep.index, pid, reason=reason, code=code, uptime_s=round(uptime, 3), t_exit=now)
        if code == 0 and rep.state != State.COMPLETED and self.is_source():
            saved = load_replica_state(sup.rd.state, rep.stage, rep.index) or {}   # its exit beat its last message
            if saved.get("completed"):
                rep.completed()
        if rep.state == State.COMPLETED:
            rep.settled.set()
            return
        self.after_exit(rep, code, uptime if rep.ready_at else 0.0, reason)

    def after_exit(self, rep: Replica, code: int, uptime: float, reason: str) -> None:
        """The replica is down (exited, or never started): stop, fail, or restart after a backoff."""
        after = rep.after_exit(code, uptime, self.sup.stopping, time.time())
        if after.event == "failed":
            self.events.emit("failed", rep.stage, rep.index, None, reason=after.reason, last_error=rep.last_error[-2000:])
        elif after.event == "backoff":
            self.events.emit("backoff", rep.stage, rep.index, None, reason=f"{after.reason} after {reason}")
        elif after.event:
            self.events.emit(after.event, rep.stage, rep.index, None, reason=after.reason)
        if after.restart:
            why = "fenced" if after.event == "fenced" else reason
            asyncio.get_running_loop().call_later(
                after.delay, lambda: self.sup.own(self.respawn(rep, why), f"respawn {rep.ident}", rep))

    async def respawn(self, rep: Replica, reason: str) -> None:
        """A respawn (after an exit and its backoff); any failure goes back through the policy."""
        async with self.lock:
            sup = self.sup
            if sup.stopping or rep.wanted_down or rep.pid is not None or rep not in self.replicas or sup.watchers.get(self.name) is not self:
                return    # stopped, scaled or applied away, or started again by a command meanwhile
            self.events.emit("restart", rep.stage, rep.index, None, reason=reason, restarts=rep.restarts)
            await sup.start_replica(rep)

    def stderr_tail(self, rep: Replica) -> str:
        path = self.sup.rd.logs / f"{rep.ident}.stderr"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 16384))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-STDERR_TAIL_LINES:])
