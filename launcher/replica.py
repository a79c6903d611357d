"""One stage replica as the supervisor sees it: its process, state, counters and policies.

The supervisor (:mod:`streampipe.launcher.supervisor`) keeps one :class:`Replica` per replica of
every stage; :mod:`streampipe.launcher.apply` starts new ones and waits for them with
:func:`settle`, as the supervisor does. Both import this module; it imports neither, so the
supervisor and apply need no import inside a function to reach each other.

A replica's :class:`State` changes only through its own methods (``spawned``, ``beat``,
``ready``, ``stopping``, ``gone`` and ``after_exit``, ...), so what each state means is said
once, here, and tested without a process (``tests/test_replica.py``)::

    stopped/starting --spawned--> starting --ready--> running <--beat--> blocked
                                      |                  |  +--stopping--> stopping
                                      +-------gone-------+------------------+
                                      v
              after_exit: restart (starting, or backoff first) | stopped | failed
    a source that reached its end: completed (kept through its exit)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from streampipe.launcher import fencing
from streampipe.launcher.config import StageConfig
from streampipe.monitor.health import Judge, Probe, Reading
from streampipe.monitor.policy import Decision, RestartPolicy
from streampipe.stages import fence


class State(str, Enum):
    """What ``status`` shows for a replica (a ``str``: the JSON and the CLI see plain names)."""

    STARTING = "starting"     # spawned, or about to be, and not READY yet
    RUNNING = "running"       # READY and beating
    BLOCKED = "blocked"       # READY, and its outputs are full (backpressure)
    BACKOFF = "backoff"       # exited; restarted once its backoff delay has passed
    STOPPING = "stopping"     # told to stop (drained, or SIGTERM), not gone yet
    STOPPED = "stopped"       # down on purpose, or its policy says not to restart it
    FAILED = "failed"         # down for good: too many restarts, or it cannot start
    COMPLETED = "completed"   # a source at the end of its stream, and what it sent is done


LIVE = frozenset({State.RUNNING, State.BLOCKED})                   # READY and taking work
SETTLED = frozenset({State.COMPLETED, State.FAILED, State.STOPPED})  # nothing more will happen unless told


@dataclass(frozen=True)
class AfterExit:
    """What the supervisor does once a replica is down: ``restart`` after ``delay`` s, or nothing."""

    restart: bool
    delay: float = 0.0
    event: str = ""           # the event to emit ("" for none)
    reason: str = ""


@dataclass
class Replica:
    stage: str
    index: int
    cfg: StageConfig
    policy: RestartPolicy
    judge: Judge
    pid: int | None = None
    state: State = State.STOPPED
    started_at: float = 0.0
    ready_at: float | None = None
    restarts: int = 0
    last_exit: str = ""
    last_error: str = ""
    last_beat: float | None = None
    hb: dict[str, Any] = field(default_factory=dict)
    reading: Reading = field(default_factory=Reading)
    probe: Probe | None = None
    kill_reason: str = ""        # why the supervisor is killing it (hung, limit, ...)
    wanted_down: bool = False    # the supervisor stopped it on purpose: do not restart
    backoff_until: float = 0.0
    spawn_mode: str = ""
    fenced: int = 0              # fenced exits in a row (see launcher/fencing.py)
    rate: float = 0.0
    _rate_mark: tuple[float, int] = (0.0, 0)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)   # ready, failed or completed

    @classmethod
    def of(cls, stage: str, index: int, sc: StageConfig) -> Replica:
        """A replica of ``stage`` with the restart policy and health judge its config asks for."""
        policy = RestartPolicy(restart=sc.restart, backoff_initial=sc.backoff_initial, backoff_max=sc.backoff_max,
                               backoff_factor=sc.backoff_factor, min_uptime=sc.min_uptime,
                               max_restarts=sc.max_restarts, restart_window=sc.restart_window)
        judge = Judge(heartbeat_timeout=sc.heartbeat_timeout, max_rss_mb=sc.max_rss_mb,
                      max_cpu_percent=sc.max_cpu_percent, limit_for=sc.limit_for)
        return cls(stage=stage, index=index, cfg=sc, policy=policy, judge=judge)

    @property
    def ident(self) -> str:
        return f"{self.stage}.{self.index}"

    @property
    def live(self) -> bool:
        return self.state in LIVE

    # -- transitions -------------------------------------------------------------------------
    def waiting(self) -> None:
        """About to be started (it waits its turn: the fork server, a repartition); ``up --detach`` waits for it."""
        self.state = State.STARTING

    def spawned(self, pid: int, mode: str, probe: Probe | None = None) -> None:
        """A new process runs it; everything heard from the previous one is forgotten."""
        self.pid, self.state, self.started_at, self.spawn_mode = pid, State.STARTING, time.time(), mode
        self.ready_at, self.last_beat, self.hb, self.kill_reason, self.wanted_down = None, None, {}, "", False
        self.exited.clear()
        self.settled.clear()
        self.probe = probe

    def beat(self, msg: dict[str, Any], now: float) -> None:
        """A heartbeat: counters, the records/s over the last second or more, blocked or not."""
        self.last_beat = time.monotonic()
        prev_t, prev_n = self._rate_mark
        n = int(msg.get("records_in", 0))
        if prev_t and now - prev_t >= 1.0:
            self.rate = max(0.0, (n - prev_n) / (now - prev_t))
            self._rate_mark = (now, n)
        elif not prev_t:
            self._rate_mark = (now, n)
        self.hb = msg
        if self.live:
            self.state = State.BLOCKED if msg.get("blocked") else State.RUNNING
        if msg.get("last_error"):
            self.last_error = msg["last_error"]

    def ready(self, now: float) -> None:
        self.ready_at, self.last_beat, self.fenced = now, time.monotonic(), 0
        if self.state == State.STARTING:
            self.state = State.RUNNING
        self.settled.set()

    def completed(self) -> None:
        self.state = State.COMPLETED
        self.settled.set()

    def failed(self, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        self.state = State.FAILED
        self.settled.set()

    def cancel_start(self) -> bool:
        """A wanted stop of a replica with no process: one waiting to start (or in backoff) stays down."""
        if self.state in (State.BACKOFF, State.STARTING):
            self.wanted_down, self.state = True, State.STOPPED
            return True
        return False

    def stopping(self, wanted: bool, reason: str) -> None:
        self.wanted_down = self.wanted_down or wanted
        self.kill_reason = reason
        if self.state != State.COMPLETED:
            self.state = State.STOPPING

    def gone(self) -> None:
        """Its process is gone (reaped): nothing it measured stays on show (cpu, rss, rate)."""
        self.pid, self.probe = None, None
        self.reading, self.rate, self._rate_mark = Reading(), 0.0, (0.0, 0)
        self.exited.set()

    def health(self, now_m: float) -> tuple[str, str] | None:
        """``(event, reason)`` if it must be replaced: ``hung`` (not READY by ``ready_timeout``, or no
        heartbeat for ``heartbeat_timeout``) or ``limit`` (over ``max_rss_mb`` / ``max_cpu_percent``);
        judged on the last :attr:`reading` (``now_m`` is monotonic, as ``last_beat`` is)."""
        if self.state == State.STARTING and time.time() - self.started_at > self.cfg.ready_timeout:
            return "hung", f"not READY after ready_timeout {self.cfg.ready_timeout:g}s"
        if not self.live:
            return None
        verdict = self.judge.verdict(now_m, self.last_beat, self.reading)
        if verdict:
            return ("hung" if verdict.startswith("hung") else "limit"), verdict
        return None

    def after_exit(self, code: int, uptime: float, stopping: bool, now: float) -> AfterExit:
        """Down (exited, or never started): restart (now or after a backoff), stop, or fail, by its
        policy; a fenced exit (it lost its lock to a stale process and bound nothing) is retried
        soon and not counted, up to ``fencing.FENCED_RETRIES`` in a row."""
        wanted = self.wanted_down or stopping
        if code == fence.FENCED_EXIT and not wanted and self.fenced < fencing.FENCED_RETRIES:
            self.fenced += 1
            self.state = State.STARTING
            return AfterExit(True, fencing.FENCED_RETRY_DELAY_S, "fenced",
                             "another process held the replica's lock; starting it again")
        decision: Decision = self.policy.on_exit(now, code, uptime, wanted=wanted)
        if decision.action == "stop":
            self.state = State.STOPPED
            self.settled.set()
            return AfterExit(False, event="" if wanted else "stopped", reason=decision.reason)
        if decision.action == "fail":
            self.failed()
            return AfterExit(False, event="failed", reason=decision.reason)
        self.restarts += 1
        self.state = State.STARTING      # about to be started again (or in backoff first)
        if decision.delay > 0:
            self.state, self.backoff_until = State.BACKOFF, now + decision.delay
            return AfterExit(True, decision.delay, "backoff", f"restart in {decision.delay:.2f}s")
        return AfterExit(True, 0.0)

    def retune(self, sc: StageConfig) -> None:
        """Run under ``sc`` from now on: its supervisor settings go to the restart policy and the
        health judge in place (their counts and history stay)."""
        self.cfg = sc
        policy, judge = self.policy, self.judge
        policy.restart, policy.backoff_initial, policy.backoff_max = sc.restart, sc.backoff_initial, sc.backoff_max
        policy.backoff_factor, policy.min_uptime = sc.backoff_factor, sc.min_uptime
        policy.max_restarts, policy.restart_window = sc.max_restarts, sc.restart_window
        judge.heartbeat_timeout, judge.max_rss_mb = sc.heartbeat_timeout, sc.max_rss_mb
        judge.max_cpu_percent, judge.limit_for = sc.max_cpu_percent, sc.limit_for

    def signal(self, sig: int) -> None:
        """Send ``sig`` to its process and whatever that started (its process group), if it runs."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    @property
    def config_digest(self) -> str:
        """Eight hex digits of the stage config this replica runs under (``status``: what an apply changed)."""
        return hashlib.sha1(self.cfg.model_dump_json().encode()).hexdigest()[:8]

    @property
    def measured(self) -> bool:
        """Whether a process of it runs to be measured: cpu, rss, fds, threads and rate are its
        (None in ``status`` otherwise: a completed, failed, stopped or backing-off replica shows ``-``)."""
        return self.pid is not None and self.state not in SETTLED

    def status(self, now: float) -> dict[str, Any]:
        hb, reading, measured = self.hb, self.reading, self.measured
        return {
            "name": self.stage, "replica": self.index, "type": self.cfg.type, "pid": self.pid, "state": self.state.value,
            "uptime_s": round(now - self.started_at, 1) if self.pid and self.started_at else 0.0,
            "restarts": self.restarts, "cpu_percent": round(reading.cpu_percent, 1) if measured else None,
            "rss_bytes": reading.rss_bytes if measured else None, "num_fds": reading.num_fds if measured else None,
            "num_threads": reading.num_threads if measured else None,
            "records_in": hb.get("records_in", 0), "records_out": hb.get("records_out", 0),
            "rate": round(self.rate, 1) if measured else None, "errors": hb.get("errors", 0),
            "dead_letters": hb.get("dead_letters", 0), "dead_letters_dropped": hb.get("dead_letters_dropped", 0),
            "edges_out": hb.get("edges_out", {}), "resent": hb.get("resent", 0), "malformed": hb.get("malformed", 0),
            "blocked": bool(hb.get("blocked", False)), "queue": hb.get("queue", 0),
            "latency_ms": hb.get("latency_ms", 0.0), "latency_buckets": hb.get("latency_buckets", []),
            "last_error": self.last_error, "last_exit": self.last_exit,
            "backoff_s": round(max(0.0, self.backoff_until - now), 2) if self.state == State.BACKOFF else 0.0,
            "spawn": self.spawn_mode, "stats": hb.get("stats", {}),
            "ended": hb.get("finished") is True,    # its stream ended (a source: its last record was pulled)
            "unreachable": hb.get("unreachable", []), "waiting": hb.get("waiting", ""), "insecure": hb.get("insecure", ""), "denied": hb.get("denied", 0),
            "config": self.config_digest,
        }



async def settle(reps: list[Replica], timeout: float) -> None:
    """Wait until every replica is READY, failed or completed, or ``timeout`` passed."""
    waits = [asyncio.ensure_future(r.settled.wait()) for r in reps]
    try:
        await asyncio.wait(waits, timeout=timeout)
    finally:
        for w in waits:
            w.cancel()
