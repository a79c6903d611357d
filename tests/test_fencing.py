"""Fencing: at most one live process per stage replica, even when the fork server answers late."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from streampipe.stages import fence
from streampipe.stages.spec import StageSpec
from tests.conftest import alive, wait_for
from tests.test_unwedged import fault_env

N = 3000
CONFIG = f"""\
pipeline: fence
defaults: {{backoff_initial: 0.05}}
stages:
  generator: {{type: generator, options: {{rate: 1000, count: {N}}}}}
  consumer: {{type: consumer, inputs: [generator]}}
"""


def processes_named(title: str) -> list[int]:
    """Live (not zombie) processes whose title (cmdline) is ``title``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and " ".join(proc.info["cmdline"] or []).strip() == title:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


class Census(threading.Thread):
    """Counts, every 20 ms, the live processes that name a replica; keeps the most seen at once."""

    def __init__(self, title: str) -> None:
        super().__init__(daemon=True)
        self.title, self.most, self.pids, self.scans = title, 0, set(), 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            pids = processes_named(self.title)
            self.most = max(self.most, len(pids))
            self.pids.update(pids)
            self.scans += 1
            self.halt.wait(0.02)


def stopped_fork_servers(pipeline: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] == psutil.STATUS_STOPPED and " ".join(p.info["cmdline"] or []).strip() == f"streampipe: fork-server [{pipeline}]"]


def test_a_spawn_answered_after_its_timeout_makes_no_second_process(pipeline, monkeypatch) -> None:
    # the fork server SIGSTOPs itself right after forking consumer.0 and before answering: the
    # supervisor's spawn times out while that stage already runs (issue 21: two consumer.0)
    for key, value in fault_env("forkserver-stop:consumer.0").items():   # tests/faults/sitecustomize.py
        monkeypatch.setenv(key, value)
    p = pipeline(CONFIG)
    census = Census("streampipe: consumer.0 [fence]")
    census.start()
    try:
        p.up()
        for pid in stopped_fork_servers("fence"):   # the stalled server, if it is still there, wakes up
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: len(p.output_ids()) >= N and p.row("generator")["state"] == "completed", timeout=90,
                 what="the whole stream written")
        time.sleep(1.0)   # anything late has had time to show up
    finally:
        census.halt.set()
        census.join(5)
    assert census.scans > 50 and census.most == 1, f"{census.most} processes were consumer.0 at once (pids {census.pids})"
    fenced = p.events("fenced")
    assert fenced and fenced[0]["pid"] in census.pids, "the late fork-server child was found holding the lock and killed"
    assert not alive(fenced[0]["pid"])
    assert processes_named("streampipe: consumer.0 [fence]") == [p.row("consumer")["pid"]]
    assert sorted(p.output_ids()) == list(range(N)), "every id exactly once"
    assert p.row("consumer")["restarts"] == 0


def test_a_second_process_for_a_replica_exits_before_binding(pipeline) -> None:
    p = pipeline(CONFIG)
    p.up()
    row = p.row("consumer")
    # the same replica started by hand (or by a second run-stage) on the same run directory
    spec = StageSpec(name="consumer", replica=0, replicas=1, type="consumer", options={}, run_dir=str(p.run_dir),
                     config_dir=str(p.folder), control="", input=f"ipc://{p.run_dir}/sock/i.consumer.0", ack="ipc:///nonexistent/a")
    twin = subprocess.run([sys.executable, "-m", "streampipe.stages"], env={**os.environ, "STREAMPIPE_SPEC": spec.to_json()},
                          capture_output=True, text=True, timeout=60)
    assert twin.returncode == fence.FENCED_EXIT, twin.stderr
    assert f"consumer.0 is already running (pid {row['pid']} holds" in twin.stderr
    assert p.row("consumer")["pid"] == row["pid"] and p.row("consumer")["state"] == "running"
    wait_for(lambda: len(p.output_ids()) >= N, timeout=60, what="the whole stream written")
    assert sorted(p.output_ids()) == list(range(N)), "the twin took nothing"


FAILS_AT_ONCE = """\
pipeline: quick-death
defaults: {restart: never, ready_timeout: 300}
stages:
  generator: {type: generator, options: {rate: 100, count: 100}}
  picky: {type: "picky:Picky", inputs: [generator]}
  consumer: {type: consumer, inputs: [picky]}
"""


def test_a_stage_that_dies_before_its_middle_process_exits_is_still_reaped(pipeline, monkeypatch) -> None:
    # the fork server's middle process waits 1 s before it answers and exits, and the stage's
    # setup fails at once: the stage dies while it is still the middle's child. The middle must
    # not ignore SIGCHLD (the server does), or the kernel reaps the stage at once and the
    # supervisor waits ready_timeout (300 s) for a process long gone.
    for key, value in fault_env("middle-slow:picky.0").items():   # tests/faults/sitecustomize.py
        monkeypatch.setenv(key, value)
    p = pipeline(FAILS_AT_ONCE)
    (p.folder / "picky.py").write_text("from streampipe import Stage\n\n\nclass Picky(Stage):\n"
                                       "    def setup(self):\n        raise RuntimeError('not today')\n\n"
                                       "    def process(self, batch):\n        return batch\n")
    t0 = time.monotonic()
    p.up(timeout=90)         # (a stage that exits with restart: never is stopped, not failed: up says 0)
    row = wait_for(lambda: (r := p.row("picky")) and r["state"] == "stopped" and r, timeout=30,
                   what="picky's exit heard")
    assert "not today" in row["last_error"], row
    assert time.monotonic() - t0 < 60, "the supervisor heard of the exit only at ready_timeout"
    assert [e for e in p.events("start") if e["stage"] == "picky"][0]["spawn"] == "fork-server"
