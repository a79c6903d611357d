"""The run directory: everything one running pipeline owns, in one folder of mode 0700.

    <run dir>/
      supervisor.pid      "<pid> <start time> <run dir>": the supervisor's identity (see supervisor())
      sock/               ipc socket files: control, stages, i.<stage>.<r>, a.<stage>.<r>
      logs/               <stage>.<r>.jsonl (loguru), <stage>.<r>.stderr, supervisor.jsonl
      events.jsonl        supervisor events
      state/              stage snapshots (source positions, sink dedup marks)
      deadletter/         <stage>.jsonl: records a stage could not process, with the error
      checkpoints/        trainer models
      metrics.jsonl       evaluator metrics
      output/             the consumer's default output

Unix socket paths are limited to 107 bytes. When ``<run dir>/sock`` would be longer, the
sockets live in a short private folder under ``/tmp`` and ``sock`` is a symlink to it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import psutil

from streampipe.launcher.errors import AlreadyRunning
from streampipe.stages.state import atomic_write

_SUN_PATH_MAX = 100   # 107 bytes minus room for the longest socket name we add
START_TIME_TOLERANCE_S = 0.005   # half a kernel clock tick (1/100 s): the start time is counted in ticks


class RunDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()

    # -- paths -------------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def sock(self) -> Path:
        return self.path / "sock"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def state(self) -> Path:
        return self.path / "state"

    def endpoint(self, name: str) -> str:
        # the real folder, not the symlink: ZeroMQ passes the path to bind() as it is
        folder = self.sock.resolve() if self.sock.is_symlink() else self.sock
        return f"ipc://{folder / name}"

    @property
    def control(self) -> str:
        return self.endpoint("control")

    @property
    def stages(self) -> str:
        return self.endpoint("stages")

    # -- lifecycle ---------------------------------------------------------------------------
    def supervisor(self) -> psutil.Process | None:
        """The live supervisor owning this directory, or None.

        A pid alone names a process only until it exits: the kernel hands it out again. The pid
        file records the pid, the process's start time (psutil ``create_time``, from the kernel's
        start tick) and the run directory; a process counts as the supervisor only if all three
        match. The returned :class:`psutil.Process` keeps that identity: psutil checks it again
        before every signal, so a supervisor that exited is never mistaken for its pid's next
        owner. A pid file of the older format (a bare pid) carries no start time and is stale.
        """
        try:
            pid_text, started_text, run_dir = self.pid_file.read_text().rstrip("\n").split(" ", 2)
            pid, started = int(pid_text), float(started_text)
        except (OSError, ValueError):
            return None
        if Path(run_dir) != self.path:
            return None
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) > START_TIME_TOLERANCE_S or proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return proc

    def supervisor_pid(self) -> int | None:
        """The pid of the live supervisor owning this directory, or None (see :meth:`supervisor`)."""
        proc = self.supervisor()
        return proc.pid if proc is not None else None

    def claim(self) -> None:
        """Create the directory (0700), refuse if a live supervisor owns it, clean stale sockets."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        other = self.supervisor_pid()
        if other is not None and other != os.getpid():
            raise AlreadyRunning(f"a pipeline is already running in {self.path} (supervisor pid {other}); "
                                 f"`streampipe down --run-dir {self.path}` stops it")
        for sub in (self.logs, self.state):
            sub.mkdir(exist_ok=True)
        self._make_sock_dir()
        me = psutil.Process()
        atomic_write(self.pid_file, f"{me.pid} {me.create_time()!r} {self.path}\n".encode())

    def _make_sock_dir(self) -> None:
        if self.sock.is_symlink() or self.sock.exists():
            target = self.sock.resolve()
            if target.is_dir():
                for f in target.iterdir():
                    if f.is_socket() or f.name.startswith(("i.", "a.")) or f.name in ("control", "stages"):
                        f.unlink(missing_ok=True)
                return
            self.sock.unlink()
        if len(str(self.sock)) + 24 <= _SUN_PATH_MAX:
            self.sock.mkdir(mode=0o700)
            return
        digest = hashlib.sha1(str(self.path).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"streampipe-{os.getuid()}" / digest
        short.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(short.parent, 0o700)
        os.chmod(short, 0o700)
        self.sock.symlink_to(short)

    def release(self) -> None:
        """Remove the pid file and socket files (the rest stays for `status`, `logs`, `report`)."""
        if (me := self.supervisor()) is not None and me.pid == os.getpid():
            self.pid_file.unlink(missing_ok=True)
        target = self.sock.resolve() if self.sock.exists() else None
        if target is not None and target.is_dir():
            for f in target.iterdir():
                if f.is_socket():
                    f.unlink(missing_ok=True)
