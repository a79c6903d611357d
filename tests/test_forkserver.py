"""Stages started from the preloaded fork server: same supervision, no orphans, fresh code."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil

from tests.conftest import alive, wait_for

STAMPER = """\
from streampipe import Stage

VERSION = {version}

class Stamper(Stage):
    def process(self, batch):
        return [{{**r, "code_version": VERSION}} for r in batch]
"""

CONFIG = """\
pipeline: fs
defaults: {backoff_initial: 0.05}
stages:
  generator: {type: generator, options: {rate: 500}}
  stamper: {type: "stamper:Stamper", inputs: [generator]}
  consumer: {type: consumer, inputs: [stamper]}
"""


def last_version(p) -> int | None:
    path = p.run_dir / "output" / "records.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)["code_version"]
        except ValueError:
            continue
    return None


def test_stages_are_forked_and_adopted_by_the_supervisor(pipeline, tmp_path: Path) -> None:
    (tmp_path / "stamper.py").write_text(STAMPER.format(version=1))
    p = pipeline(CONFIG)
    p.up()
    st = p.status()
    assert {r["spawn"] for r in st["stages"]} == {"fork-server"}
    for r in st["stages"]:
        proc = psutil.Process(r["pid"])
        assert proc.ppid() == st["supervisor_pid"], "a forked stage is the supervisor's own child"
        assert proc.num_threads() <= 4, "no thread crossed the fork (zmq's own I/O threads and the stderr rotator only)"
    assert psutil.Process(st["forkserver_pid"]).ppid() == st["supervisor_pid"]
    wait_for(lambda: last_version(p) == 1, timeout=30, what="stamped records")


def test_fork_server_death_is_survived(pipeline, tmp_path: Path) -> None:
    (tmp_path / "stamper.py").write_text(STAMPER.format(version=1))
    p = pipeline(CONFIG)
    p.up()
    st = p.status()
    stage_pids = {r["pid"] for r in st["stages"]}
    old_server = st["forkserver_pid"]
    os.kill(old_server, signal.SIGKILL)
    new_server = wait_for(lambda: (s := p.status()["forkserver_pid"]) not in (None, old_server) and s,
                          timeout=30, what="a new fork server")
    assert alive(new_server) and not alive(old_server)
    assert {r["pid"] for r in p.status()["stages"]} == stage_pids, "stages outlive the fork server"
    # and once it has preloaded (until then a respawn starts cold: nothing waits for it), new stages come from it
    wait_for(lambda: any(e["pid"] == new_server for e in p.events("forkserver")), timeout=60,
             what="the new fork server preloaded")
    old = p.row("stamper")["pid"]
    os.kill(old, signal.SIGKILL)
    row = wait_for(lambda: (r := p.row("stamper"))["pid"] not in (None, old) and r["state"] == "running" and r,
                   timeout=30, what="stamper respawned")
    assert row["spawn"] == "fork-server"
    assert psutil.Process(row["pid"]).ppid() == p.status()["supervisor_pid"]


def test_edited_stage_module_is_picked_up_on_restart(pipeline, tmp_path: Path) -> None:
    module = tmp_path / "stamper.py"
    module.write_text(STAMPER.format(version=1))
    p = pipeline(CONFIG)
    p.up()
    wait_for(lambda: last_version(p) == 1, timeout=30, what="version 1 records")
    module.write_text(STAMPER.format(version=2))
    st = module.stat()
    os.utime(module, (st.st_atime, st.st_mtime + 2))   # coarse-mtime file systems
    old = p.row("stamper")["pid"]
    os.kill(old, signal.SIGKILL)
    row = wait_for(lambda: (r := p.row("stamper"))["pid"] not in (None, old) and r["state"] == "running" and r,
                   timeout=30, what="stamper restarted")
    assert row["spawn"] == "cold", "a changed module is started cold, not from the stale preload"
    wait_for(lambda: last_version(p) == 2, timeout=30, what="records from the edited code")
    # the fork server reloads, and the next restart is fast again with the new code
    time.sleep(2.0)   # the reload preloads the new module
    old = p.row("stamper")["pid"]
    os.kill(old, signal.SIGKILL)
    row = wait_for(lambda: (r := p.row("stamper"))["pid"] not in (None, old) and r["state"] == "running" and r,
                   timeout=30, what="stamper restarted again")
    assert row["spawn"] == "fork-server"
    wait_for(lambda: last_version(p) == 2, timeout=30, what="still the edited code")


def test_supervisor_sigkill_leaves_nothing(pipeline, tmp_path: Path) -> None:
    (tmp_path / "stamper.py").write_text(STAMPER.format(version=1))
    p = pipeline(CONFIG + "  extra: {type: normalizer, inputs: [generator], spawn: cold}\n")
    p.up()
    st = p.status()
    pids = [r["pid"] for r in st["stages"]] + [st["forkserver_pid"]]
    assert {r["spawn"] for r in st["stages"]} == {"fork-server", "cold"}
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=3, interval=0.05, what="no process left")


def test_cold_and_forked_stage_processes_look_alike(pipeline, tmp_path: Path) -> None:
    (tmp_path / "stamper.py").write_text(STAMPER.format(version=1))
    p = pipeline(CONFIG.replace("stamper: {type", "stamper: {spawn: cold, type"))
    p.up()
    st = p.status()
    modes = {r["name"]: r["spawn"] for r in st["stages"]}
    assert modes["stamper"] == "cold" and modes["consumer"] == "fork-server"
    for r in st["stages"]:
        assert os.getpgid(r["pid"]) == r["pid"]
        assert psutil.Process(r["pid"]).ppid() == st["supervisor_pid"]
