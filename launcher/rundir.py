"""The run directory: everything one running pipeline owns, in one folder of mode 0700.

    <run dir>/
      supervisor.pid      "<pid> <start time> <run dir>": the supervisor's identity (see supervisor())
      sock/               ipc socket files: control, stages, i.<stage>.<r>, a.<stage>.<r> (or a link to the fallback folder, below)
      sock.fallback       "<path> <device> <inode>" of that fallback folder, when there is one
      logs/               <stage>.<r>.jsonl (loguru), <stage>.<r>.stderr, supervisor.jsonl
      events.jsonl        supervisor events
      state/              stage snapshots (source positions, sink dedup marks); <stage>.<r>.lock, held by the live replica
      deadletter/         <stage>.jsonl: records a stage could not process, with the error; <stage>.replayed:
                          the keys of those `streampipe deadletter replay` settled
      checkpoints/        trainer models
      metrics.jsonl       evaluator metrics
      output/             the consumer's default output

Unix socket paths are limited to 107 bytes. When ``<run dir>/sock`` would be longer, the
sockets live in a fallback folder under the temp dir that nobody else can own: made fresh by
``mkdtemp`` (mode 0700, a random name), ``sock`` is a symlink to it and ``sock.fallback``
records its device and inode. Every use checks, with ``lstat`` (no link followed), that the
link points to exactly that folder and that the folder is ours and closed to everyone else
(:meth:`RunDir.sock_folder`); anything else is refused (:class:`UnsafeSocketDir`), never
followed. ``up`` replaces a folder that fails the check with a fresh one; a clean exit of the
supervisor (``down``) removes it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from streampipe.launcher.errors import AlreadyRunning, StreampipeError, UnsafeSocketDir
from streampipe.stages.state import atomic_write, remove_interrupted_writes

if TYPE_CHECKING:
    from loguru import Logger


def _log() -> Logger:
    """loguru, imported when something is logged: `status` reads a run dir without it (tests/test_layering.py)."""
    from loguru import logger

    return logger

SUN_PATH_MAX = 107        # bytes of a unix socket path (sun_path is 108 with its NUL)
SOCKET_NAME_DEFAULT = 30  # the longest socket name assumed when the stage names are not known
FALLBACK_PREFIX = "streampipe-"   # mkdtemp adds 8 random characters: /tmp/streampipe-k3j_9xq2
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

    @property
    def sock_record(self) -> Path:
        return self.path / "sock.fallback"

    def endpoint(self, name: str) -> str:
        # the real folder, not the symlink: ZeroMQ passes the path to bind() as it is
        path = self.sock_folder() / name
        if not _fits(path.parent, len(name.encode())):   # a stage added by `apply` with a longer name than at `up`
            raise StreampipeError(f"socket path {path} is over the {SUN_PATH_MAX} bytes of a unix socket path: "
                                  f"`streampipe down` and `up` again (the socket folder is chosen for the longest name)")
        return f"ipc://{path}"

    def sock_folder(self) -> Path:
        """The folder of the socket files, checked (``lstat``, no link followed) before every use.

        ``<run dir>/sock`` is a folder of ours, mode 0700; or a symlink to the fallback folder
        ``sock.fallback`` records (same path, device and inode), itself a folder of ours, mode
        0700. Raises :class:`UnsafeSocketDir` otherwise: a folder someone else made, opened, or
        put in place of ours is never used.
        """
        try:
            st = os.lstat(self.sock)
        except FileNotFoundError:
            raise UnsafeSocketDir(f"{self.sock} does not exist (the run directory was not set up by `streampipe up`)") from None
        if not stat.S_ISLNK(st.st_mode):
            _check_private(self.sock, st)
            return self.sock
        target = Path(os.readlink(self.sock))
        recorded = self._recorded()
        if recorded is None or recorded[0] != target:
            raise UnsafeSocketDir(f"{self.sock} points to {target}, not to the folder this run directory made "
                                  f"({recorded[0] if recorded else 'none recorded in ' + str(self.sock_record)})")
        try:
            tst = os.lstat(target)
        except FileNotFoundError:
            raise UnsafeSocketDir(f"the socket folder {target} is gone (removed by a temp cleaner?); "
                                  f"`streampipe up` makes a new one") from None
        _check_private(target, tst)
        if (tst.st_dev, tst.st_ino) != recorded[1:]:
            raise UnsafeSocketDir(f"{target} is not the folder this run directory made (another folder now has its name)")
        return target

    def _recorded(self) -> tuple[Path, int, int] | None:
        try:
            path, dev, ino = self.sock_record.read_text().rstrip("\n").rsplit(" ", 2)
            return Path(path), int(dev), int(ino)
        except (OSError, ValueError):
            return None

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

    def claim(self, longest_socket: int = SOCKET_NAME_DEFAULT) -> None:
        """Create the directory (0700), refuse if a live supervisor owns it, clean stale sockets.

        ``longest_socket``: the bytes of the longest socket file name it will hold
        (:func:`longest_socket_name`); the socket folder is chosen so that each path fits.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        other = self.supervisor_pid()
        if other is not None and other != os.getpid():
            raise AlreadyRunning(f"a pipeline is already running in {self.path} (supervisor pid {other}); "
                                 f"`streampipe down --run-dir {self.path}` stops it")
        for sub in (self.logs, self.state):
            sub.mkdir(exist_ok=True)
        for left in remove_interrupted_writes(self.path):
            _log().info(f"removed {left}: the temp file of a write interrupted by a kill")
        self._make_sock_dir(longest_socket)
        me = psutil.Process()
        atomic_write(self.pid_file, f"{me.pid} {me.create_time()!r} {self.path}\n".encode())

    def _make_sock_dir(self, longest: int) -> None:
        if os.path.lexists(self.sock):
            try:
                folder = self.sock_folder()
                _clean_sockets(folder)
                if _fits(folder, longest):
                    return
                self.release()                 # too long for these stage names: a folder that fits instead
            except UnsafeSocketDir as exc:
                if not self.sock.is_symlink():
                    raise
                _log().warning(f"not using the old socket folder: {exc}; making a new one")
                self.sock.unlink()
                self.sock_record.unlink(missing_ok=True)
        if not os.path.lexists(self.sock) and _fits(self.sock, longest):
            self.sock.mkdir(mode=0o700)
            os.chmod(self.sock, 0o700)
            return
        if self.sock.is_dir() and not self.sock.is_symlink():
            self.sock.rmdir()                  # an in-place folder too long for these names (emptied above)
        short = Path(tempfile.mkdtemp(prefix=FALLBACK_PREFIX))   # 0700, a name nobody can guess
        if not _fits(short, longest):
            short.rmdir()
            raise StreampipeError(f"socket paths in {short.parent} would exceed the {SUN_PATH_MAX} bytes of a unix socket "
                                  f"path for a {longest}-byte socket name: set TMPDIR to a shorter folder, or shorten "
                                  f"the stage names")
        st = os.lstat(short)
        atomic_write(self.sock_record, f"{short} {st.st_dev} {st.st_ino}\n".encode())
        self.sock.symlink_to(short)

    def release(self) -> None:
        """Remove the pid file and socket files (the rest stays for `status`, `logs`, `report`)."""
        if (me := self.supervisor()) is not None and me.pid == os.getpid():
            self.pid_file.unlink(missing_ok=True)
        try:
            folder = self.sock_folder()
        except UnsafeSocketDir:
            return     # not ours to clean
        _clean_sockets(folder)
        if folder != self.sock:       # the fallback folder under the temp dir: nothing of it is left behind
            try:
                folder.rmdir()
            except OSError as exc:
                _log().warning(f"socket folder {folder} not removed: {exc}")
                return
            self.sock.unlink(missing_ok=True)
            self.sock_record.unlink(missing_ok=True)


def longest_socket_name(stages: list[str]) -> int:
    """Bytes of the longest socket file name of these stages: ``i.<stage>.<replica>``, replicas
    up to 64 (``a.`` is as long), or ``control`` / ``stages``."""
    return max([len("control"), len("stages"), *(len(f"i.{name}.63".encode()) for name in stages)])


def _fits(folder: Path, longest: int) -> bool:
    return len(str(folder).encode()) + 1 + longest <= SUN_PATH_MAX


def _check_private(path: Path, st: os.stat_result) -> None:
    """Refuse a socket folder that is not a real folder of ours, closed to group and others."""
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketDir(f"{path} is not a folder")
    if st.st_uid != os.getuid():
        raise UnsafeSocketDir(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()}): refusing to use it")
    if st.st_mode & 0o077:
        raise UnsafeSocketDir(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a socket folder must be 0700")


def _clean_sockets(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_socket() or f.name.startswith(("i.", "a.")) or f.name in ("control", "stages"):
            f.unlink(missing_ok=True)
