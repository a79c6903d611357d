"""SIGKILL -> READY: how fast a killed stage is back, streampipe (cold / fork server) vs supervisord.

    python benchmarks/respawn.py [--kills 10] [--settle 0.5] [--timeout 60]

Variants, all in one run:

streampipe (the real CLI on a temp services.yaml: generator at ``--rate`` records/s -> normalizer
-> trainer, ``delivery: at-least-once``), once with ``spawn: cold`` and once with
``spawn: fork-server`` for every stage:
    ``plain``    SIGKILL the normalizer (imports numpy, pyzmq, msgpack)
    ``trainer``  SIGKILL the trainer (imports scikit-learn; loads its last checkpoint in setup)
The restart policy would otherwise dominate: by default a stage restarted more than 5 times in
60 s is marked failed, and quick successive exits back off (0.1 s doubling). So the benchmark's
services.yaml sets ``max_restarts: 1000``, ``backoff_initial: 0`` and ``min_uptime: 0``: every
restart is immediate and what is measured is detection + spawn + start-up.

supervisord (installed with pip into a throwaway venv under /tmp, created on first use), same
program: ``python -m streampipe.stages`` with the same stage spec (normalizer, trainer), ``autorestart=true``,
``startsecs=0``. The benchmark itself binds the stage's control socket, so the READY signal is the
very message a stage sends streampipe's supervisor when ``setup()`` has returned. These stages get
no input records (nothing feeds them), so the comparison is on start-up alone.

Kill time: ``time.time()`` just before ``os.kill(pid, SIGKILL)`` in the benchmark. READY time: the
``t_ready`` of the supervisor's ``ready`` event for the new pid in ``events.jsonl`` (streampipe),
or ``time.time()`` when the benchmark's control socket receives ``ready`` from the new pid
(supervisord). Every kill waits for the replacement to be READY (bounded by ``--timeout``) and then
``--settle`` seconds before the next. For streampipe the table also shows kill -> exit noticed
(``t_exit``) and kill -> new process spawned (``t_spawn``).

The last stdout line is one JSON object with the medians and p90s in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq
from _common import (
    BENCH_DIR,
    PYTHON,
    REPO,
    THREAD_ENV,
    Pipeline,
    err,
    median,
    out,
    percentile,
    pid_alive,
    rnd,
    stop_pids,
    wait_until,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

VENV = Path(tempfile.gettempdir()) / "streampipe-bench-supervisord-venv"
SUPERVISORD_STOP_S = 20.0     # supervisord stops its programs (stopwaitsecs 5) then exits
TRAINER_TYPE = "trainer" if (REPO / "stages" / "trainer.py").exists() else "bench_stages:SklearnStage"
# A cold stage is `python -m streampipe.stages` with its spec in $STREAMPIPE_SPEC; under supervisord the spec
# comes from a file (a JSON value in supervisord's `environment=` would need fragile escaping).
RUN_STAGE = """import os, runpy, sys
os.environ["STREAMPIPE_SPEC"] = open(sys.argv[1]).read()
sys.argv = [sys.argv[0]]
runpy.run_module("streampipe.stages", run_name="__main__", alter_sys=True)
"""


Sample = dict[str, Any]     # one kill: ready_ms, exit_ms and spawn_ms (NaN where not known)

# -- streampipe --------------------------------------------------------------------------------

def streampipe_config(spawn: str, rate: float) -> dict[str, Any]:
    return {
        "pipeline": f"bench-respawn-{spawn}",
        "delivery": "at-least-once",
        "defaults": {"spawn": spawn, "restart": "always", "max_restarts": 1000, "restart_window": 60,
                     "backoff_initial": 0, "min_uptime": 0},
        "stages": {
            "generator": {"type": "generator", "options": {"rate": rate, "seed": 7}},
            "normalizer": {"type": "normalizer", "inputs": ["generator"]},
            "trainer": {"type": TRAINER_TYPE, "inputs": ["normalizer"]},
        },
    }


def kill_streampipe(pipe: Pipeline, stage: str, settle: float, timeout: float) -> Sample:
    def current() -> dict[str, Any] | None:
        ready = pipe.events.find(event="ready", stage=stage)
        return ready[-1] if ready and pid_alive(ready[-1]["pid"]) else None

    old = wait_until(current, timeout, f"{stage} to be READY")
    time.sleep(settle)
    t_kill = time.time()
    os.kill(old["pid"], signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        if pipe.events.find(event="failed", stage=stage):
            raise RuntimeError(f"streampipe marked {stage} failed: {pipe.events.find(event='failed', stage=stage)[-1]}")
        new = [e for e in pipe.events.find(event="ready", stage=stage) if e["pid"] != old["pid"] and e["t_ready"] > t_kill]
        return new[0] if new else None

    new = wait_until(replaced, timeout, f"a new {stage} to be READY after the kill")
    exits = [e for e in pipe.events.find(event="exit", stage=stage) if e["t_exit"] >= t_kill]
    starts = [e for e in pipe.events.find(event="start", stage=stage) if e["pid"] == new["pid"]]
    return {"ready_ms": (new["t_ready"] - t_kill) * 1000.0,
            "exit_ms": (exits[0]["t_exit"] - t_kill) * 1000.0 if exits else float("nan"),
            "spawn_ms": (starts[0]["t_spawn"] - t_kill) * 1000.0 if starts else float("nan")}


# -- supervisord -------------------------------------------------------------------------------

def ensure_supervisord(fresh: bool) -> Path:
    exe = VENV / "bin" / "supervisord"
    if fresh or not exe.exists():
        err.print(f"creating {VENV} and installing supervisor into it ...")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "supervisor"],
                       check=True, timeout=600)
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    err.print(f"supervisord {version} from {exe}", highlight=False)
    return exe


class Supervisord:
    """supervisord running ``python -m streampipe.stages`` for a plain stage and a trainer; we hold their control socket."""

    PROGRAMS = {"plain": "normalizer", "trainer": TRAINER_TYPE}

    def __init__(self, exe: Path) -> None:
        from streampipe.stages.spec import StageSpec

        self.exe = exe
        self.dir = Path(tempfile.mkdtemp(prefix="streampipe-supervisord-"))
        run = self.dir / "run"
        run.mkdir(mode=0o700)
        (self.dir / "bench_stages.py").write_text((BENCH_DIR / "bench_stages.py").read_text())
        (self.dir / "run_stage.py").write_text(RUN_STAGE)
        self.control = f"ipc://{run}/control"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.control)
        self.ready: dict[str, list[tuple[int, float]]] = {p: [] for p in self.PROGRAMS}   # (pid, t_ready)
        self.pids: set[int] = set()
        env = ",".join(f'{k}="{v}"' for k, v in {**THREAD_ENV, "PYTHONPATH": str(REPO)}.items())
        conf = ["[supervisord]", "nodaemon=true", f"logfile={self.dir}/supervisord.log", f"pidfile={self.dir}/supervisord.pid",
                f"childlogdir={self.dir}", "loglevel=info", ""]
        for prog, type_ in self.PROGRAMS.items():
            spec = StageSpec(name=prog, replica=0, replicas=1, type=type_, options={}, run_dir=str(run),
                             config_dir=str(self.dir), control=self.control, input=f"ipc://{run}/{prog}.in",
                             ack=f"ipc://{run}/{prog}.ack", edges=[], supervisor_pid=0, delivery="at-least-once")
            (self.dir / f"{prog}.json").write_text(spec.to_json())
            conf += [f"[program:{prog}]", f"command={PYTHON} {self.dir}/run_stage.py {self.dir}/{prog}.json",
                     f"directory={self.dir}", f"environment={env}", "autostart=true", "autorestart=true", "startsecs=0",
                     "startretries=1000", "stopsignal=TERM", "stopwaitsecs=5", "stopasgroup=true", "killasgroup=true",
                     "redirect_stderr=true", f"stdout_logfile={self.dir}/{prog}.log", ""]
        (self.dir / "supervisord.conf").write_text("\n".join(conf))
        self.proc = subprocess.Popen([str(exe), "-n", "-c", str(self.dir / "supervisord.conf")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "supervisord.stderr", "wb"))

    def pump(self, wait_ms: int) -> None:
        """Read stage messages for up to ``wait_ms`` (returns at the first batch); stamp READYs on receipt."""
        if not self.sock.poll(wait_ms):
            return
        while True:
            try:
                ident, raw = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.time()
            msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            prog = ident.decode().partition(".")[0]
            if msg.get("pid"):
                self.pids.add(msg["pid"])
            if msg.get("op") == "ready" and prog in self.ready:
                self.ready[prog].append((msg["pid"], now))

    def kill(self, prog: str, settle: float, timeout: float) -> Sample:
        def current() -> tuple[int, float] | None:
            self.pump(50)
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited ({self.proc.returncode}); see {self.dir}")
            r = self.ready[prog]
            return r[-1] if r and pid_alive(r[-1][0]) else None

        old_pid, _ = wait_until(current, timeout, f"{prog} under supervisord to be READY", interval=0)
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self.pump(20)
        t_kill = time.time()
        os.kill(old_pid, signal.SIGKILL)

        def replaced() -> tuple[int, float] | None:
            self.pump(50)
            new = [r for r in self.ready[prog] if r[0] != old_pid and r[1] > t_kill]
            return new[0] if new else None

        _, t_ready = wait_until(replaced, timeout, f"a new {prog} under supervisord to be READY", interval=0)
        return {"ready_ms": (t_ready - t_kill) * 1000.0, "exit_ms": float("nan"), "spawn_ms": float("nan")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SUPERVISORD_STOP_S)
            except subprocess.TimeoutExpired:
                err.print("[yellow]warning:[/] supervisord did not stop in time: SIGKILL")
                self.proc.kill()
                self.proc.wait(timeout=10)
        left = [p for p in self.pids if pid_alive(p)]
        if left:
            err.print(f"[yellow]warning:[/] supervisord left {left} running; killing them")
            stop_pids(left, grace=3.0)
        self.sock.close(linger=0)
        self.ctx.term()


# -- the benchmark -----------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs per variant")
    p.add_argument("--settle", type=float, default=0.5, help="seconds a replacement runs before the next kill")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on every wait (READY after a kill, ...)")
    p.add_argument("--rate", type=float, default=200.0, help="generator records/s in the streampipe pipelines")
    p.add_argument("--fresh-venv", action="store_true", help="recreate the supervisord venv")
    p.add_argument("--no-supervisord", action="store_true")
    a = p.parse_args()

    results: dict[str, list[Sample]] = {}
    variants = [("plain", "cold"), ("trainer", "cold"), ("plain", "fork"), ("trainer", "fork")]
    if not a.no_supervisord:
        variants += [("plain", "supervisord"), ("trainer", "supervisord")]
    exe = None if a.no_supervisord else ensure_supervisord(a.fresh_venv)
    err.print(f"trainer stage: type {TRAINER_TYPE!r}", highlight=False)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        task = progress.add_task("respawn", total=a.kills * len(variants))

        def run_kills(name: str, kill: Any) -> None:
            results[name] = []
            for i in range(a.kills):
                progress.update(task, description=f"{name}: kill {i + 1}/{a.kills}")
                results[name].append(kill())
                progress.advance(task)
            rs = [s["ready_ms"] for s in results[name]]
            progress.console.print(f"  {name:<22} kill -> READY median {median(rs):7.1f} ms  "
                                   f"(each: {' '.join(f'{x:.0f}' for x in rs)})", highlight=False)

        for spawn, label in (("cold", "cold"), ("fork-server", "fork")):
            with Pipeline(streampipe_config(spawn, a.rate), tag=f"respawn-{label}") as pipe:
                try:
                    for stage, kind in (("normalizer", "plain"), ("trainer", "trainer")):
                        run_kills(f"{kind}_{label}", lambda s=stage: kill_streampipe(pipe, s, a.settle, a.timeout))
                finally:
                    modes = {e.get("spawn") for e in pipe.events.find(event="start") if e["stage"] != "generator"}
                    if modes != {spawn}:
                        err.print(f"[yellow]warning:[/] asked spawn {spawn}, stages started as {modes}")
            pipe.cleanup()
        if exe is not None:
            sv = Supervisord(exe)
            try:
                for kind in ("plain", "trainer"):
                    run_kills(f"{kind}_supervisord", lambda k=kind: sv.kill(k, a.settle, a.timeout))
            finally:
                sv.stop()

    table = Table(title=f"SIGKILL -> READY, {a.kills} kills each (ms)", title_justify="left", header_style="bold")
    for col in ("variant", "median", "p90", "min", "max", "kill->exit seen (median)", "kill->spawned (median)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    figures: dict[str, Any] = {}
    for name, samples in results.items():
        rs = [s["ready_ms"] for s in samples]
        ex, sp = median([s["exit_ms"] for s in samples]), median([s["spawn_ms"] for s in samples])
        table.add_row(name, f"{median(rs):.1f}", f"{percentile(rs, 90):.1f}", f"{min(rs):.1f}", f"{max(rs):.1f}",
                      "-" if ex != ex else f"{ex:.1f}", "-" if sp != sp else f"{sp:.1f}")
        figures[f"{name}_ms"] = rnd(median(rs), 1)
        figures[f"{name}_p90_ms"] = rnd(percentile(rs, 90), 1)
    out.print(table)
    figures.update(kills=a.kills, trainer_type=TRAINER_TYPE)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
