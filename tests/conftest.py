"""Shared fixtures: a real pipeline in a temp folder, driven through the real CLI.

Every wait is bounded (``wait_for``), every process a test starts is stopped at teardown, and
teardown fails the test if any process of the pipeline (supervisor, fork server, stage) is
still alive or a zombie.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from streampipe.launcher.cli import resolve_run_dir
from streampipe.launcher.control import request
from streampipe.launcher.errors import StreampipeError
from streampipe.monitor.events import read_events

CLI = [sys.executable, "-m", "streampipe"]

# a user's module, written beside a test's services.yaml (as ``paced.py``): a finite source that
# yields ``record(i)`` for i < ``total()`` at about ``rate`` a second, resuming at its position
PACED_SOURCE = '''
import time
from streampipe import Source


class Paced(Source):
    def __init__(self, count: int, rate: float = 3000, **options):
        super().__init__(**options)
        self.count, self.rate, self.next = count, rate, 0

    def total(self):
        return self.count

    def setup(self):
        self.started, self.base = time.monotonic(), self.next

    def generate(self):
        while self.next < self.total():
            if self.next - self.base > (time.monotonic() - self.started) * self.rate:
                yield None
                continue
            self.next += 1
            yield self.record(self.next - 1)

    def snapshot(self):
        return {"next": self.next}

    def restore(self, state):
        self.next = state["next"]
'''


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition",
             detail: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``,
    with what ``detail()`` says of the state then (what is missing, a log's tail)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing we wait for may not exist yet
            last_exc = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else "")
                + (f"\n{detail()}" if detail is not None else ""))


def cli(*args: str, cwd: Path | None = None, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"streampipe {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ready_pid(p: Pipeline, stage: str, replica: int = 0) -> int | None:
    """The pid of a replica's latest process, from its own log (no CLI round trip: the machine may be slow)."""
    path = p.run_dir / "logs" / f"{stage}.{replica}.jsonl"
    pids = [json.loads(x)["record"]["process"]["id"] for x in path.read_text().splitlines() if '"ready: pid' in x]
    return pids[-1] if pids else None


class Pipeline:
    """A pipeline written to ``tmp/services.yaml`` and run with ``streampipe up --detach``."""

    def __init__(self, folder: Path, yaml_text: str) -> None:
        self.folder = folder
        self.config = folder / "services.yaml"
        self.config.write_text(textwrap.dedent(yaml_text))
        self.run_dir = folder / ".streampipe"
        self.seen_pids: set[int] = set()
        self.foreground: subprocess.Popen[str] | None = None

    # -- driving -----------------------------------------------------------------------------
    def up(self, expect: int = 0, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        proc = cli("up", "--detach", "--config", str(self.config), cwd=self.folder, timeout=timeout)
        if proc.returncode != expect:
            pytest.fail(f"up --detach exited {proc.returncode} (expected {expect}):\n{proc.stdout}\n{proc.stderr}")
        self.remember()
        return proc

    def up_foreground(self) -> subprocess.Popen[str]:
        self.foreground = subprocess.Popen([*CLI, "up", "--config", str(self.config)], cwd=self.folder,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: self.status_or_none() and all(r["state"] == "running" for r in self.status()["stages"]),
                 timeout=120, what="every stage running")
        self.remember()
        return self.foreground

    def status_or_none(self) -> dict[str, Any] | None:
        """What ``streampipe status --json`` prints, asked in-process over the control socket: tests
        poll it, and a CLI process per poll (~1 CPU-second of imports) starved the stages under test."""
        try:
            st = request(resolve_run_dir(None, self.config), "status", timeout=30)
        except StreampipeError:
            return None
        st.pop("ok", None)
        return json.loads(json.dumps(st, default=str))

    def status(self) -> dict[str, Any]:
        st = self.status_or_none()
        if st is None:
            pytest.fail("streampipe status failed: no pipeline running")
        for r in st["stages"]:
            if r["pid"]:
                self.seen_pids.add(r["pid"])
        if st.get("forkserver_pid"):
            self.seen_pids.add(st["forkserver_pid"])
        self.seen_pids.add(st["supervisor_pid"])
        return st

    def remember(self) -> None:
        if self.status_or_none() is not None:
            self.status()

    def rows(self, stage: str) -> list[dict[str, Any]]:
        return [r for r in self.status()["stages"] if r["name"] == stage]

    def row(self, stage: str, replica: int = 0) -> dict[str, Any]:
        return next(r for r in self.rows(stage) if r["replica"] == replica)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_events(self.run_dir / "events.jsonl") if kind is None or e["event"] == kind]

    def output_ids(self, name: str = "output/records.jsonl") -> list[int]:
        return [r["id"] for r in self.output_records(name)]

    def output_records(self, name: str = "output/records.jsonl") -> list[dict[str, Any]]:
        path = self.run_dir / name
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line being written right now
        return records

    def down(self) -> subprocess.CompletedProcess[str]:
        return cli("down", "--config", str(self.config), cwd=self.folder, timeout=120)

    # -- teardown ----------------------------------------------------------------------------
    @staticmethod
    def assert_no_zombies(supervisor_pid: int) -> None:
        """Every exited stage has been reaped by the supervisor (allowing it a moment to do so)."""
        def zombies() -> list[int]:
            try:
                return [c.pid for c in psutil.Process(supervisor_pid).children() if c.status() == psutil.STATUS_ZOMBIE]
            except psutil.Error:
                return []
        wait_for(lambda: not zombies(), timeout=5, what=f"the supervisor to reap its zombie children {zombies()}")

    def kill_everything(self) -> list[str]:
        """Stop whatever is left; return the pids that had to be killed (should be none)."""
        left = []
        if self.foreground is not None and self.foreground.poll() is None:
            self.foreground.send_signal(signal.SIGINT)
            try:
                self.foreground.wait(60)
            except subprocess.TimeoutExpired:
                self.foreground.kill()
                self.foreground.wait(10)
        elif (st := self.status_or_none()) is not None:
            self.remember()
            self.assert_no_zombies(st["supervisor_pid"])
            self.down()
        if self.foreground is not None and self.foreground.stdout is not None:
            self.foreground.stdout.close()
        for pid in self.seen_pids:
            if alive(pid):
                try:
                    left.append(f"{pid} {psutil.Process(pid).status()} {' '.join(psutil.Process(pid).cmdline())[:200]}")
                except psutil.Error:
                    left.append(str(pid))
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        return left


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Callable[[str], Pipeline]]:
    made: list[Pipeline] = []

    def make(yaml_text: str, folder: Path | None = None) -> Pipeline:
        p = Pipeline(folder or tmp_path, yaml_text)
        made.append(p)
        return p

    yield make
    leftovers = []
    for p in made:
        leftovers += p.kill_everything()
    zombies = [c.pid for c in psutil.Process().children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]
    assert not leftovers, f"processes outlived the pipeline: {leftovers}"
    assert not zombies, f"zombie processes left: {zombies}"
