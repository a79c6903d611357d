"""Helpers shared by the benchmarks: statistics, a pipeline run through the real CLI, file tails.

Nothing here measures anything by itself; ``throughput.py`` and ``respawn.py`` do. Progress and
tables go to stderr / stdout through rich; each benchmark's last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from streampipe.stages.runtime import pid_alive as process_exists

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable

CLI_TIMEOUT_S = 240.0         # `up --detach` waits up to 180 s for READY itself; `down` ~30 s + grace
EXIT_GRACE_S = 2.0            # `down` may return while the supervisor is still exiting: allow it this
POLL_S = 0.05                 # file / event polling: fine enough for a few-second run, cheap on CPU
# One BLAS thread per process, as streampipe gives its stages (launcher.spawn.THREAD_ENV).
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # progress and notes; stdout keeps the tables and the JSON line
out = Console(width=None if sys.stdout.isatty() else 160)


# -- statistics ---------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]   # drop NaN
    return statistics.median(vals) if vals else float("nan")


def rnd(x: float, nd: int = 3) -> float | None:
    """JSON-friendly rounding (NaN -> None)."""
    return None if x != x else round(x, nd)


# -- waiting ------------------------------------------------------------------------------------

def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = POLL_S) -> Any:
    """Call ``pred`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    if not process_exists(pid):
        return False
    try:   # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM the given pids (ours), SIGKILL what is left after ``grace``; return the killed ones."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.02)
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


# -- CPU time ----------------------------------------------------------------------------------

def children_cpu_s() -> float:
    """User + system CPU of every child this process has waited for (and of theirs, recursively):
    the difference around a run whose processes are all our children and all reaped is that
    run's CPU, start-up included."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tree_cpu_s(pids: list[int]) -> float:
    """User + system CPU so far of the live processes ``pids`` and all their descendants, each
    counted once, plus what they have reaped (``children_*``: a restarted stage's earlier life)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs[root.pid] = root
            procs.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    total = 0.0
    for proc in procs.values():
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


# -- output files -------------------------------------------------------------------------------

def exactly_once(paths: list[Path], count: int) -> dict[str, Any]:
    """Whether the JSON-lines files ``paths`` hold every id ``0 .. count-1`` exactly once.

    ``lost``: ids missing; ``duplicated``: lines beyond the first for an id; ``unexpected``:
    lines whose id is out of range or missing.
    """
    import numpy as np
    import orjson

    ids: list[int] = []
    unexpected = 0
    for path in paths:
        if not path.exists():
            continue
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                i = orjson.loads(line).get("id")
                if type(i) is int and 0 <= i < count:
                    ids.append(i)
                else:
                    unexpected += 1
    seen = np.bincount(np.asarray(ids, dtype=np.int64), minlength=count)
    lost = int((seen == 0).sum())
    duplicated = int((seen[seen > 1] - 1).sum())
    return {"ok": lost == 0 and duplicated == 0 and unexpected == 0, "lost": lost,
            "duplicated": duplicated, "unexpected": unexpected}


def output_span(paths: list[Path]) -> float:
    """Seconds from the ``t`` of the earliest first record to the last write of any of ``paths``
    (their mtime): the throughput clock of every variant."""
    import orjson

    firsts, lasts = [], []
    for path in paths:
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                firsts.append(float(orjson.loads(f.readline())["t"]))
            lasts.append(os.stat(path).st_mtime)
    return max(lasts) - min(firsts)


# -- files written by running processes ---------------------------------------------------------

class LineCounter:
    """Counts complete lines of a file another process appends to, reading only the new bytes."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.lines
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        self.lines += whole.count(b"\n")
        return self.lines


class EventTail:
    """The supervisor's ``events.jsonl``, read incrementally (no CLI process per poll)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call (also appended to ``self.events``)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        new = [json.loads(line) for line in whole.splitlines() if line.strip()]
        self.events.extend(new)
        return new

    def find(self, **match: Any) -> list[dict[str, Any]]:
        self.poll()
        return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]


# -- a pipeline run through the real CLI --------------------------------------------------------

def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# The CLI of the interpreter running the benchmark, as a module: works from an unactivated
# virtualenv, where `streampipe` is not on PATH (and never picks another install's script).
CLI = [sys.executable, "-m", "streampipe"]


def cli(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``streampipe ARGS``; raise with its output when it fails."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`streampipe {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


class Pipeline:
    """A ``services.yaml`` in a fresh temp folder (``bench_stages.py`` beside it), run detached.

    ``with Pipeline(cfg) as p:`` runs ``streampipe up --detach`` and, on the way out, ``streampipe
    down``; if the supervisor still exists after that, it and the stages it listed are killed,
    so a benchmark never leaves a process behind.
    """

    def __init__(self, config: dict[str, Any], tag: str = "bench", run_dir_name: str = "run") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"streampipe-{tag}-"))
        self.config_path = self.dir / "services.yaml"
        self.run_dir = self.dir / run_dir_name
        shutil.copy(BENCH_DIR / "bench_stages.py", self.dir / "bench_stages.py")
        write_yaml(self.config_path, config)
        self.events = EventTail(self.run_dir / "events.jsonl")
        self.supervisor_pid: int | None = None
        self.late_exits: dict[int, str] = {}    # pids still alive (for a moment) when `down` returned

    def __enter__(self) -> Pipeline:
        try:
            cli("up", "--detach", "--config", str(self.config_path), "--run-dir", str(self.run_dir))
        except BaseException:
            self._read_pid()
            self.close()
            raise
        self._read_pid()
        return self

    def _read_pid(self) -> None:
        try:
            self.supervisor_pid = int((self.run_dir / "supervisor.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def pids(self) -> list[int]:
        """The supervisor, the fork server(s) and every stage process started so far."""
        events = self.events.find(event="start") + self.events.find(event="forkserver")
        return [p for p in dict.fromkeys([self.supervisor_pid, *(e.get("pid") for e in events)]) if p]

    def cpu_s(self) -> float:
        """User + system CPU so far of the supervisor and all its processes (call it before ``down``)."""
        return tree_cpu_s(self.pids())

    def close(self) -> None:
        stage_pids = {e["pid"] for e in self.events.find(event="start") if e.get("pid")}
        fork = {e["pid"] for e in self.events.find(event="forkserver") if e.get("pid")}
        try:
            cli("down", "--run-dir", str(self.run_dir), timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if self.supervisor_pid and pid_alive(self.supervisor_pid):
                err.print(f"[yellow]warning:[/] streampipe down failed ({exc}); killing the supervisor")
        ours = [p for p in [self.supervisor_pid, *stage_pids, *fork] if p]
        first = {p: _cmdline(p) for p in ours if pid_alive(p)}
        deadline = time.monotonic() + EXIT_GRACE_S
        while time.monotonic() < deadline and any(pid_alive(p) for p in ours):
            time.sleep(0.01)
        self.late_exits = first
        if first and not any(pid_alive(p) for p in ours):
            err.print(f"[dim]note: still exiting when `streampipe down` returned: {first}[/]", highlight=False)
        left = [p for p in ours if pid_alive(p)]
        if left:
            killed = stop_pids(left, grace=3.0)
            err.print(f"[yellow]warning:[/] processes outlived `streampipe down` by {EXIT_GRACE_S:g}s: "
                      f"{ {p: first.get(p) for p in left} } (SIGKILLed {killed})")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
