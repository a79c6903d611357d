"""Starting stage processes: cold (``python -m streampipe.stages``) or from the preloaded fork server.

Either way the stage is a child of the supervisor (the fork server's grandchildren are adopted
by the supervisor, a child subreaper), in its own session and process group, with stdout and
stderr appended to ``<run dir>/logs/<stage>.<r>.stderr``. The supervisor reaps every stage with
``waitpid`` on SIGCHLD, whichever way it was started.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import sys
from pathlib import Path

from loguru import logger

from streampipe.launcher import forkserver
from streampipe.stages.spec import ENV_VAR, StageSpec

FORKSERVER_READY_TIMEOUT_S = 120.0   # preloading scikit-learn takes ~2 s; a loaded CI box far more
SPAWN_REPLY_TIMEOUT_S = 10.0
_PR_SET_CHILD_SUBREAPER = 36

# One BLAS thread per stage: stages are processes already, and a forked process must not
# inherit a thread pool (OpenBLAS starts one at import unless told not to).
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def become_subreaper() -> bool:
    """Adopt orphaned descendants (the fork server's grandchildren), so we can reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**THREAD_ENV, **os.environ, **(extra or {})}
    # the stage must import *this* streampipe, even when it runs from a source checkout
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def spawn_cold(argv: list[str], stderr_path: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> int:
    """posix_spawn a Python module in a new session; stdout+stderr appended to ``stderr_path``."""
    stderr_path.parent.mkdir(parents=True, exist_ok=True)
    actions: list[tuple] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(stderr_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    for target, fd in enumerate(pass_fds, start=3):
        os.set_inheritable(fd, True)
        if fd != target:
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
    return os.posix_spawn(sys.executable, [sys.executable, *argv], env, file_actions=actions, setsid=True)


def spawn_stage_cold(spec: StageSpec, stderr_path: Path) -> int:
    return spawn_cold(["-m", "streampipe.stages"], stderr_path, child_env({ENV_VAR: spec.to_json()}))


class ForkServer:
    """The supervisor's handle on one fork server process."""

    def __init__(self, types: list[str], config_dir: Path, log_path: Path, pipeline: str = "pipeline") -> None:
        self.types, self.config_dir, self.log_path, self.pipeline = types, config_dir, log_path, pipeline
        self.pid: int | None = None
        self.modules: dict[str, list] = {}
        self.failed: dict[str, str] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self.ready = False

    async def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = child_env({forkserver.ENV_VAR: json.dumps({"types": self.types, "config_dir": str(self.config_dir),
                                                         "supervisor_pid": os.getpid(), "pipeline": self.pipeline})})
        try:
            self.pid = spawn_cold(["-m", "streampipe.launcher.forkserver"], self.log_path, env, pass_fds=(child.fileno(),))
        finally:
            child.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        line = await asyncio.wait_for(self._reader.readline(), FORKSERVER_READY_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"fork server exited while preloading; see {self.log_path}")
        hello = json.loads(line)
        self.modules, self.failed = hello.get("modules", {}), hello.get("failed", {})
        self.ready = True
        for name, error in self.failed.items():
            logger.warning(f"fork server could not preload {name}: {error} (its stages start cold)")

    def changed(self, module: str) -> bool:
        """True when ``module`` was not preloaded or its file changed since the preload."""
        entry = self.modules.get(module)
        if entry is None:
            return True
        path, mtime = entry
        try:
            return os.stat(path).st_mtime != mtime
        except OSError:
            return True

    async def spawn(self, spec: StageSpec, stderr_path: Path) -> int:
        if not self.ready or self._writer is None or self._reader is None:
            raise RuntimeError("fork server is not running")
        async with self._lock:
            self._next_id += 1
            request = {"id": self._next_id, "spec": spec.to_json(), "stderr": str(stderr_path)}
            self._writer.write((json.dumps(request) + "\n").encode())
            await self._writer.drain()
            reply: dict = {}
            while reply.get("id") != request["id"]:   # skip a late answer to an earlier request
                try:
                    line = await asyncio.wait_for(self._reader.readline(), SPAWN_REPLY_TIMEOUT_S)
                except asyncio.TimeoutError:
                    self.ready = False
                    raise RuntimeError(f"no answer in {SPAWN_REPLY_TIMEOUT_S:g}s") from None
                if not line:
                    self.ready = False
                    raise RuntimeError("fork server closed its socket")
                reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fork server: {reply['error']}")
        return int(reply["pid"])

    def lost(self) -> None:
        """The server process exited (the supervisor reaped it)."""
        self.ready = False
        self.pid = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def kill(self) -> None:
        """SIGKILL a wedged or broken server and its pre-forked middle process (its process group:
        a request it still holds must never become a stage later); the supervisor reaps it and
        starts another. A stage already forked has its own session and is fenced by its lock."""
        self.ready = False
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()       # EOF: the server's loop ends and it exits
            self._writer = None
        self.ready = False
