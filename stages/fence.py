"""Fencing: at most one live process per stage replica, whatever the timing.

A replica takes an exclusive ``flock`` on ``<run dir>/state/<stage>.<r>.lock`` first thing,
before it reads its state or binds a socket, and holds it for its whole life (the kernel drops
it when the process dies, however it dies). A second process for the same replica (a fork
server's late answer to a spawn the supervisor gave up on, a second ``run-stage`` on the same
run directory) finds the lock taken and exits at once with :data:`FENCED_EXIT`, having bound
nothing and written nothing. The holder writes its pid into the file, so the supervisor can tell
who holds it (:func:`holder`).

The lock file is opened ``O_CLOEXEC``: a program the stage execs does not inherit it (a child it
forks does, and dies with the stage's process group).

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> fd = hold(d, "counter.0")
>>> fd is not None and hold(d, "counter.0") is None and holder(d, "counter.0") == os.getpid()
True
>>> os.close(fd); holder(d, "counter.0") is None
True
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

FENCED_EXIT = 75   # EX_TEMPFAIL: "another process is this replica"; not a crash, not counted as one


def lock_path(run_dir: Path | str, ident: str) -> Path:
    return Path(run_dir) / "state" / f"{ident}.lock"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def hold(run_dir: Path | str, ident: str) -> int | None:
    """Take the replica's lock for the life of this process: its fd, or None if another holds it."""
    path = lock_path(run_dir, ident)
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


_held: list[int] = []   # the fd of this process's lock: open until the process exits


def claim(run_dir: Path | str, ident: str) -> bool:
    """Hold ``ident``'s lock for the life of this process; False (and a line on stderr) if taken."""
    fd = hold(run_dir, ident)
    if fd is None:
        other = holder(run_dir, ident)
        print(f"streampipe: {ident} is already running (pid {other or '?'} holds {lock_path(run_dir, ident)}); "
              f"this process (pid {os.getpid()}) exits with status {FENCED_EXIT} without binding anything",
              file=sys.stderr, flush=True)
        return False
    _held.append(fd)
    return True


def holder(run_dir: Path | str, ident: str) -> int | None:
    """The pid holding the replica's lock, or None when nobody does.

    Probing takes the lock for an instant: call it only when no process of this replica is
    meant to be starting (the supervisor does, before it starts one). A holder that has not
    written its pid yet reads as 0.
    """
    path = lock_path(run_dir, ident)
    try:
        fd = _open(path)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
