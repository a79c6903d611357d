"""Health of a running stage replica: psutil readings, resource limits, heartbeat liveness.

:class:`Probe` takes psutil readings of one process. :class:`Judge` is pure: fed with readings,
heartbeat times and a clock, it says whether a replica must be replaced and why:

- ``hung``: READY, alive, but no heartbeat for ``heartbeat_timeout`` seconds. Heartbeats are
  sent from the stage's processing loop (never from a helper thread), so silence means the loop
  is stuck. A stage blocked on backpressure still beats (and reports ``blocked``).
- over a limit: RSS above ``max_rss_mb`` or CPU above ``max_cpu_percent`` continuously for
  ``limit_for`` seconds (a single spike is not a reason to kill).

>>> j = Judge(heartbeat_timeout=2.0, max_rss_mb=100, limit_for=1.0)
>>> j.verdict(now=10.0, last_beat=9.0, reading=Reading(rss_bytes=50 << 20)) is None
True
>>> j.verdict(now=10.0, last_beat=7.5, reading=Reading())
'hung: no heartbeat for 2.5s (heartbeat_timeout 2s)'
>>> j.verdict(now=11.0, last_beat=11.0, reading=Reading(rss_bytes=200 << 20)) is None  # first sight
True
>>> j.verdict(now=12.5, last_beat=12.5, reading=Reading(rss_bytes=200 << 20))
'rss 200 MB over max_rss_mb 100 for 1.5s'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil


@dataclass
class Reading:
    alive: bool = True
    zombie: bool = False
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    num_fds: int = 0
    num_threads: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Probe:
    """psutil readings of one process (CPU % is measured between two calls, as top does)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.proc: psutil.Process | None = psutil.Process(pid)
            self.proc.cpu_percent(None)
        except psutil.Error:
            self.proc = None

    def read(self) -> Reading:
        if self.proc is None:
            return Reading(alive=False)
        try:
            with self.proc.oneshot():
                status = self.proc.status()
                if status == psutil.STATUS_ZOMBIE:
                    return Reading(alive=False, zombie=True)
                return Reading(cpu_percent=self.proc.cpu_percent(None), rss_bytes=self.proc.memory_info().rss,
                               num_fds=self.proc.num_fds(), num_threads=self.proc.num_threads())
        except psutil.ZombieProcess:
            return Reading(alive=False, zombie=True)
        except psutil.Error:
            return Reading(alive=False)


class Judge:
    """Decides, from readings and heartbeats, whether a replica must be replaced."""

    def __init__(self, heartbeat_timeout: float = 10.0, max_rss_mb: float | None = None,
                 max_cpu_percent: float | None = None, limit_for: float = 3.0) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.max_rss_mb, self.max_cpu_percent, self.limit_for = max_rss_mb, max_cpu_percent, limit_for
        self._over_since: dict[str, float] = {}

    def verdict(self, now: float, last_beat: float | None, reading: Reading) -> str | None:
        if last_beat is not None and now - last_beat > self.heartbeat_timeout and reading.alive:
            return f"hung: no heartbeat for {now - last_beat:.1f}s (heartbeat_timeout {self.heartbeat_timeout:g}s)"
        checks = []
        if self.max_rss_mb is not None:
            rss_mb = reading.rss_bytes / 2**20
            checks.append(("rss", rss_mb > self.max_rss_mb, f"rss {rss_mb:.0f} MB over max_rss_mb {self.max_rss_mb:g}"))
        if self.max_cpu_percent is not None:
            checks.append(("cpu", reading.cpu_percent > self.max_cpu_percent,
                           f"cpu {reading.cpu_percent:.0f}% over max_cpu_percent {self.max_cpu_percent:g}"))
        for key, over, text in checks:
            if not over:
                self._over_since.pop(key, None)
                continue
            since = self._over_since.setdefault(key, now)
            if now - since >= self.limit_for:
                self._over_since.pop(key, None)
                return f"{text} for {now - since:.1f}s"
        return None
