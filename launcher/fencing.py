"""The supervisor's side of fencing (:mod:`streampipe.stages.fence`): one process per replica.

Before the supervisor starts a replica, it makes sure no other process holds that replica's
lock: a stale one (typically the fork server's late answer to a spawn that timed out, forked
after the supervisor had given up on it) is SIGKILLed and the supervisor waits, bounded, until
the kernel has released the lock. Only then is the new process made. A replica that exits with
:data:`~streampipe.stages.fence.FENCED_EXIT` lost that race to a stale process that took the
lock in between: it bound nothing, so it is started again at once (the stale holder is killed
first, by the same check) and the exit is not counted by its restart policy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil

from streampipe.launcher.errors import StageError
from streampipe.stages import fence

CLEAR_TIMEOUT_S = 5.0     # a SIGKILLed holder releases its lock within ms; a loaded box may take a while
CLEAR_POLL_S = 0.01
FENCED_RETRIES = 10       # fenced exits in a row before one counts as an ordinary exit (a holder we cannot kill)
FENCED_RETRY_DELAY_S = 0.05


def holds(pid: int, path: Path) -> bool:
    """True when process ``pid`` has ``path`` open (so it is the lock's holder, not a reused pid)."""
    try:
        return any(Path(f.path) == path for f in psutil.Process(pid).open_files())
    except psutil.Error:
        return False


def kill_holder(pid: int) -> None:
    """SIGKILL a stale replica process and what it started (a stage leads its own process group)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def clear(run_dir: Path, ident: str, timeout: float = CLEAR_TIMEOUT_S) -> list[int]:
    """Kill whatever process holds ``ident``'s lock and wait until it is free; return the pids killed.

    Call only while no process of the replica is meant to run (the probe takes the lock for an
    instant). Raises :class:`StageError` when the lock is still held after ``timeout``.
    """
    path = fence.lock_path(run_dir, ident)
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while (pid := fence.holder(run_dir, ident)) is not None:
        if pid and pid not in killed and holds(pid, path):
            kill_holder(pid)
            killed.append(pid)
        if time.monotonic() > deadline:
            raise StageError(f"cannot start {ident}: pid {pid or '?'} holds {path} and did not let go in {timeout:g}s")
        await asyncio.sleep(CLEAR_POLL_S)
    return killed
