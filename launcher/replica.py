"""One stage replica as the supervisor sees it: its process, state, counters and policies.

The supervisor (:mod:`streampipe.launcher.supervisor`) keeps one :class:`Replica` per replica of
every stage; :mod:`streampipe.launcher.apply` starts new ones and waits for them with
:func:`settle`, as the supervisor does. Both import this module; it imports neither, so the
supervisor and apply need no import inside a function to reach each other.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from streampipe.launcher.config import StageConfig
from streampipe.monitor.health import Judge, Probe, Reading
from streampipe.monitor.policy import RestartPolicy


@dataclass
class Replica:
    stage: str
    index: int
    cfg: StageConfig
    policy: RestartPolicy
    judge: Judge
    pid: int | None = None
    state: str = "stopped"
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

    @property
    def ident(self) -> str:
        return f"{self.stage}.{self.index}"

    @property
    def config_digest(self) -> str:
        """Eight hex digits of the stage config this replica runs under (``status``: what an apply changed)."""
        return hashlib.sha1(self.cfg.model_dump_json().encode()).hexdigest()[:8]

    def status(self, now: float) -> dict[str, Any]:
        hb = self.hb
        return {
            "name": self.stage, "replica": self.index, "type": self.cfg.type, "pid": self.pid, "state": self.state,
            "uptime_s": round(now - self.started_at, 1) if self.pid and self.started_at else 0.0,
            "restarts": self.restarts, "cpu_percent": round(self.reading.cpu_percent, 1),
            "rss_bytes": self.reading.rss_bytes, "num_fds": self.reading.num_fds,
            "num_threads": self.reading.num_threads,
            "records_in": hb.get("records_in", 0), "records_out": hb.get("records_out", 0),
            "rate": round(self.rate, 1), "errors": hb.get("errors", 0),
            "dead_letters": hb.get("dead_letters", 0), "dead_letters_dropped": hb.get("dead_letters_dropped", 0),
            "edges_out": hb.get("edges_out", {}), "resent": hb.get("resent", 0), "malformed": hb.get("malformed", 0),
            "blocked": bool(hb.get("blocked", False)), "queue": hb.get("queue", 0),
            "latency_ms": hb.get("latency_ms", 0.0), "latency_buckets": hb.get("latency_buckets", []),
            "last_error": self.last_error, "last_exit": self.last_exit,
            "backoff_s": round(max(0.0, self.backoff_until - now), 2) if self.state == "backoff" else 0.0,
            "spawn": self.spawn_mode, "stats": hb.get("stats", {}),
            "unreachable": hb.get("unreachable", []), "insecure": hb.get("insecure", ""), "denied": hb.get("denied", 0),
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
