"""Restart policy: what to do when a stage replica exits. Pure: events and a clock in, decisions out.

The shape is Erlang/OTP's restart intensity plus Kubernetes' CrashLoopBackOff, scaled for a
developer's laptop:

- ``restart``: ``always`` restarts any exit; ``on-failure`` only a non-zero exit or a signal;
  ``never`` leaves the replica down.
- backoff: the first restart is immediate, then ``backoff_initial`` doubling (``backoff_factor``)
  up to ``backoff_max``. A replica that stayed up ``min_uptime`` seconds before it exited starts
  again from an immediate restart (systemd's backoff never resets; ours does).
- intensity: more than ``max_restarts`` restarts inside ``restart_window`` seconds and the
  replica is ``failed``: it stays down with its last error shown. A replica that never reported
  READY counts the same, so an import error does not become a restart storm.

>>> p = RestartPolicy(restart="always", backoff_initial=0.1, backoff_max=1.0, max_restarts=3, restart_window=60)
>>> [p.on_exit(now=t, code=1, uptime=0.5).delay for t in (0, 1, 2)]
[0.0, 0.1, 0.2]
>>> p.on_exit(now=3, code=1, uptime=0.5).action
'fail'
>>> RestartPolicy(restart="on-failure").on_exit(now=0, code=0, uptime=1).action
'stop'
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

Action = Literal["restart", "stop", "fail"]


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0
    reason: str = ""


def describe_exit(code: int) -> str:
    """``-9`` -> ``"killed by SIGKILL"``, ``1`` -> ``"exit status 1"``."""
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class RestartPolicy:
    def __init__(self, restart: str = "always", backoff_initial: float = 0.1, backoff_max: float = 5.0,
                 backoff_factor: float = 2.0, min_uptime: float = 10.0, max_restarts: int = 5,
                 restart_window: float = 60.0) -> None:
        self.restart = restart
        self.backoff_initial, self.backoff_max, self.backoff_factor = backoff_initial, backoff_max, backoff_factor
        self.min_uptime, self.max_restarts, self.restart_window = min_uptime, max_restarts, restart_window
        self.recent: deque[float] = deque()     # times of restarts inside the window
        self.streak = 0                          # consecutive quick exits (drives the backoff)

    def on_exit(self, now: float, code: int, uptime: float, wanted: bool = False) -> Decision:
        """A replica exited with ``code`` (negative = signal) after ``uptime`` seconds.

        ``wanted`` is True when the supervisor itself stopped it (down, scale, restart command).
        """
        what = describe_exit(code)
        if wanted:
            return Decision("stop", reason=f"stopped ({what})")
        if self.restart == "never" or (self.restart == "on-failure" and code == 0):
            return Decision("stop", reason=f"{what}; restart: {self.restart}")
        if uptime >= self.min_uptime:
            self.streak = 0
        while self.recent and now - self.recent[0] > self.restart_window:
            self.recent.popleft()
        if len(self.recent) >= self.max_restarts:
            return Decision("fail", reason=f"{what}; {len(self.recent)} restarts in {self.restart_window:g}s (max_restarts {self.max_restarts})")
        delay = 0.0 if self.streak == 0 else min(self.backoff_max, self.backoff_initial * self.backoff_factor ** (self.streak - 1))
        self.streak += 1
        self.recent.append(now)
        return Decision("restart", delay=delay, reason=what)

    def reset(self) -> None:
        """Forget history (a manual restart of a failed stage)."""
        self.recent.clear()
        self.streak = 0
