"""Helpers for tests that run stages with ``streampipe run-stage`` (no supervisor)."""

from __future__ import annotations

import collections
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import wait_for

RUN_STAGE = [sys.executable, "-m", "streampipe", "run-stage"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are answers too; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in ``text`` (None when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(part.split("=", 1) for part in line[len(name) + 1:line.index("}")].split(",") if part)
        if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


class Stages:
    """``run-stage`` processes of one pipeline folder; every one is stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, label: str, stage: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{label}.log", "wb")   # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([*(prefix or []), *RUN_STAGE, stage, "--config", str(self.folder / "services.yaml"), *args],
                                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[label] = proc
        return proc

    def log(self, label: str) -> str:
        return (self.folder / f"{label}.log").read_text(errors="replace")

    def wait_ready(self, label: str, timeout: float = 60) -> None:
        wait_for(lambda: ' - ready: pid ' in self.log(label) or self.procs[label].poll() is not None,
                 timeout=timeout, what=f"{label} ready")
        assert self.procs[label].poll() is None, f"{label} exited:\n{self.log(label)[-3000:]}"

    def stop(self, label: str, timeout: float = 30) -> int:
        proc = self.procs[label]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"{label} did not exit within {timeout}s of SIGTERM") from None

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                proc.wait(10)


def sink_ids(run_dir: Path) -> collections.Counter[Any]:
    path = run_dir / "output" / "records.jsonl"
    counts: collections.Counter[Any] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                counts[json.loads(line)["id"]] += 1
            except ValueError:
                pass   # a line being written
    return counts
