"""A supervisor that cannot be wedged or fooled, with real processes and real signals.

Named after what users hit (issue 11): fire-and-forget tasks that left a replica stuck with no
event, ``restart`` racing ``scale``, a reused pid in a stale pid file, files growing without
bound, and a transform whose state after a crash did not match what it had acknowledged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from streampipe._rotating import files_of, rotated_files
from tests.conftest import CLI, alive, cli, wait_for

CHAIN = """\
pipeline: guard
poll_interval: 0.2
defaults: {{backoff_initial: 0.05, backoff_max: 0.3, heartbeat_timeout: 5{extra_defaults}}}
stages:
  generator: {{type: generator, options: {{rate: 500}}}}
  middle:
    type: normalizer
    inputs: [generator]
    replicas: 2
  consumer: {{type: consumer, inputs: [middle]}}
"""


def chain(extra_defaults: str = "") -> str:
    return CHAIN.format(extra_defaults=extra_defaults)


FAULTS_DIR = Path(__file__).resolve().parent / "faults"   # its sitecustomize.py makes the named supervisor loops fail


def fault_env(points: str) -> dict[str, str]:
    """The environment in which the supervisor loops named in ``points`` fail (tests/faults/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "STREAMPIPE_TEST_FAULTS": points}


@pytest.fixture
def decoy() -> subprocess.Popen[bytes]:
    """A live process that is not a supervisor, with "streampipe" and "launcher" in its command line."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "streampipe", "launcher"])
    yield proc
    proc.kill()
    proc.wait(10)


@pytest.mark.timeout(300)   # several starts of a pipeline on a loaded 2-core machine
def test_stale_pid_file_naming_a_live_unrelated_process(pipeline, decoy: subprocess.Popen[bytes]) -> None:
    p = pipeline(chain())
    p.run_dir.mkdir(mode=0o700)
    started = psutil.Process(decoy.pid).create_time()
    stale = [f"{decoy.pid}\n",                                          # the old format: a bare pid
             f"{decoy.pid} {started + 1.0!r} {p.run_dir.resolve()}\n",   # its pid, another start time
             f"{decoy.pid} {started!r} /somewhere/else\n"]               # the decoy itself, another run dir
    for text in stale:
        (p.run_dir / "supervisor.pid").write_text(text)
        refused = cli("down", "--config", str(p.config), cwd=p.folder)     # nothing of ours runs: nothing to stop, exit 0
        assert refused.returncode == 0 and "nothing to stop: no pipeline is running" in refused.stderr
        p.up()
        st = p.status()
        assert st["supervisor_pid"] != decoy.pid
        assert (p.run_dir / "supervisor.pid").read_text().split()[0] == str(st["supervisor_pid"])
        assert p.down().returncode == 0
        wait_for(lambda pid=st["supervisor_pid"]: not alive(pid), timeout=30, what="the supervisor to exit")
        assert decoy.poll() is None and alive(decoy.pid), "down signalled a process that is not the supervisor"


def stage_processes(supervisor_pid: int, forkserver_pid: int | None) -> set[int]:
    """Every stage process: the supervisor's children (fork-server stages are adopted), less the fork server."""
    kids = psutil.Process(supervisor_pid).children()
    return {c.pid for c in kids if c.pid != forkserver_pid and c.status() != psutil.STATUS_ZOMBIE}


@pytest.mark.timeout(300)
def test_restart_racing_scale_leaves_no_stray_replica(pipeline) -> None:
    p = pipeline(chain(", stop_grace: 1"))    # a draining replica stops within a second
    p.up()
    for n in (3, 1, 2):
        results: list[subprocess.CompletedProcess[str]] = []
        threads = [threading.Thread(target=lambda args=args, out=results: out.append(cli(*args, "--config", str(p.config), cwd=p.folder, timeout=300)))
                   for args in (("restart", "middle"), ("scale", "middle", str(n)), ("restart", "middle"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(320)
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        rows = wait_for(lambda n=n: (rows := p.rows("middle")) and len(rows) == n and all(r["state"] == "running" for r in rows) and rows,
                        timeout=60, what=f"{n} middle replicas running")
        st = p.status()
        known = {r["pid"] for r in st["stages"] if r["pid"]}
        wait_for(lambda st=st, known=known: stage_processes(st["supervisor_pid"], st["forkserver_pid"]) == known, timeout=10,
                 what=f"the supervisor's children {stage_processes(st['supervisor_pid'], st['forkserver_pid'])} to be the stages in status {known}")
        assert len(rows) == n
    everything = stage_processes(st["supervisor_pid"], st["forkserver_pid"]) | {st["supervisor_pid"]}
    assert p.down().returncode == 0
    wait_for(lambda: not any(alive(pid) for pid in everything), timeout=30, what="every process gone after down")


@pytest.mark.timeout(300)   # several starts of a pipeline on a loaded 2-core machine
def test_a_respawn_that_fails_is_an_event_and_the_replica_recovers(pipeline) -> None:
    p = pipeline(chain(", spawn: cold, max_restarts: 1000"))
    p.up()
    victim = p.row("middle", 1)["pid"]
    stderr = p.run_dir / "logs" / "middle.1.stderr"
    stderr.rename(stderr.with_name("middle.1.old"))
    stderr.mkdir()       # a real fault: the respawn cannot open the replica's output file
    os.kill(victim, signal.SIGKILL)
    failed = wait_for(lambda: [e for e in p.events("task-failed") if e["stage"] == "middle" and e["replica"] == 1],
                      timeout=30, what="a task-failed event for middle.1")
    assert "cannot start middle.1" in failed[0]["reason"] and "Is a directory" in failed[0]["reason"]
    row = wait_for(lambda: (r := p.row("middle", 1))["state"] in ("backoff", "starting") and r["last_error"] and r,
                   timeout=20, what="middle.1 waiting to be started again, with its error")
    assert "cannot start middle.1" in row["last_error"] and row["pid"] is None
    stderr.rmdir()
    row = wait_for(lambda: (r := p.row("middle", 1))["state"] == "running" and r, timeout=30, what="middle.1 running again")
    assert alive(row["pid"]) and row["pid"] != victim
    assert p.row("middle", 0)["restarts"] == 0


@pytest.mark.timeout(300)   # several starts of a pipeline on a loaded 2-core machine
def test_a_failing_supervisor_loop_is_reported_and_restarted(pipeline, monkeypatch) -> None:
    for name, value in fault_env("stages,control,health,history").items():
        monkeypatch.setenv(name, value)
    p = pipeline(chain())
    p.up()
    loops = wait_for(lambda: {e["reason"].split()[0] for e in p.events("task-failed")} >= {"stages", "control", "health", "history"}
                     and p.events("task-failed"), timeout=30, what="each loop's failure as an event")
    assert all("restarting it" in e["reason"] for e in loops)
    before = p.row("consumer")["records_in"]
    wait_for(lambda: p.row("consumer")["records_in"] > before + 500, timeout=30, what="data flowing on")
    assert not p.events("hung") and all(r["restarts"] == 0 for r in p.status()["stages"])
    wait_for(lambda: (p.run_dir / "status-history.jsonl").exists(), timeout=30, what="status history written again")


@pytest.mark.timeout(300)   # several starts of a pipeline on a loaded 2-core machine
def test_a_loop_failing_for_good_stops_the_supervisor_loudly(pipeline) -> None:
    p = pipeline(chain())
    env = {**os.environ, **fault_env("history*")}
    proc = subprocess.Popen([*CLI, "up", "--config", str(p.config)], cwd=p.folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p.foreground = proc
    out, _ = proc.communicate(timeout=110)
    assert proc.returncode == 1, out
    assert "history loop failed 5 times" in out
    failures = [e for e in p.events("task-failed") if e["reason"].startswith("history loop")]
    assert len(failures) == 6 and "giving up" in failures[-1]["reason"]
    assert [e for e in p.events("supervisor") if "stopping" in e["reason"]]
    started = {e["pid"] for e in p.events("start")}
    assert started and not any(alive(pid) for pid in started)


COUNTER = textwrap.dedent("""
    from streampipe import Stage

    class Counter(Stage):
        \"\"\"Counts the records it has seen; the count is its state.\"\"\"
        def __init__(self, **options):
            super().__init__(**options)
            self.n = 0
        def process(self, batch):
            self.n += len(batch)
            return batch
        def snapshot(self):
            return {"n": self.n}
        def restore(self, state):
            self.n = state["n"]
        def stats(self):
            return {"n": self.n}
""")


def sizes(files: list[Path]) -> list[int]:
    """The sizes of ``files`` still there: the stages write on while the test looks, and a rotation
    may delete the oldest between the listing and its stat (a CI run once failed on that)."""
    out = []
    for f in files:
        try:
            out.append(f.stat().st_size)
        except FileNotFoundError:
            pass
    return out


@pytest.mark.timeout(300)   # several starts of a pipeline on a loaded 2-core machine
def test_a_transform_killed_restores_the_state_it_acknowledged(pipeline, tmp_path: Path) -> None:
    (tmp_path / "counting.py").write_text(COUNTER)
    total = 12_000
    p = pipeline(f"""\
        pipeline: counting
        # ack_timeout 10: a batch is resent after a kill, not because a loaded machine acked it late
        # (a resend of a batch the counter did process is counted again: state is at-least-once)
        defaults: {{backoff_initial: 0.05, backoff_max: 0.3, max_restarts: 50, ack_timeout: 10}}
        stages:
          generator: {{type: generator, options: {{rate: 2000, count: {total}}}}}
          counter: {{type: "counting:Counter", inputs: [generator]}}
          consumer: {{type: consumer, inputs: [counter]}}
    """)
    p.up()
    for kill in range(3):
        wait_for(lambda kill=kill: len(p.output_ids()) > 2500 * (kill + 1), timeout=60, what="the stream to flow on")
        os.kill(p.row("counter")["pid"], signal.SIGKILL)
        wait_for(lambda kill=kill: p.row("counter")["state"] == "running" and p.row("counter")["restarts"] == kill + 1,
                 timeout=30, what="the counter running again")
    wait_for(lambda: len(set(p.output_ids())) == total, timeout=120, what="every record at the sink")
    # acknowledged batches are in the saved state, and the batches resent after each kill were
    # not in it: each record is counted once, across three SIGKILLs. The last resends come after
    # ack_timeout (10 s), then 20 s if that one reached the counter while it restarted: the sink
    # may have every record (the killed counter sent them on) well before the count is complete.
    wait_for(lambda: p.row("counter")["stats"].get("n", 0) >= total, timeout=100, what=f"the count to reach {total}")
    n = p.row("counter")["stats"].get("n")     # read when the check is made, not when the wait began
    assert n == total, f"the counter counted {n} records, not {total}"


@pytest.mark.timeout(300)   # several starts of a pipeline on a loaded 2-core machine
def test_files_stay_bounded_and_status_shows_dropped_dead_letters(pipeline, tmp_path: Path) -> None:
    (tmp_path / "chatty.py").write_text(textwrap.dedent("""
        from streampipe import Stage

        class Chatty(Stage):
            def process(self, batch):
                for r in batch:
                    print("processing", r.get("id"), "x" * 80)
                return batch
    """))
    p = pipeline("""\
        pipeline: bounded
        logging: {file_max_mb: 0.02, retention: 2}
        stages:
          generator: {type: generator, options: {rate: 3000, malformed_every: 3}}
          normalizer: {type: normalizer, inputs: [generator]}
          chatty: {type: "chatty:Chatty", inputs: [normalizer]}
          consumer: {type: consumer, inputs: [chatty]}
    """)
    p.up()
    dead = p.run_dir / "deadletter" / "normalizer.jsonl"
    row = wait_for(lambda: (r := p.row("normalizer"))["dead_letters_dropped"] > 0 and r, timeout=60,
                   what="dead letters dropped by retention")
    table = cli("status", "--config", str(p.config), cwd=p.folder)
    assert "dead_dropped=" in table.stdout
    chatty = p.run_dir / "logs" / "chatty.0.stderr"
    wait_for(lambda: len(rotated_files(chatty)) == 2, timeout=60, what="chatty's stderr rotated twice")
    limit = int(0.02 * 2**20)
    for path, slack in ((dead, 4096), (chatty, 256 * 1024)):   # stderr is checked 5 times a second
        files = files_of(path)
        assert len(files) <= 3, files
        assert all(size < limit + slack for size in sizes(files))
    assert row["dead_letters"] > row["dead_letters_dropped"]
    logs = cli("logs", "chatty", "--config", str(p.config), cwd=p.folder)
    assert logs.returncode == 0 and logs.stdout.count("processing") > 100
    assert all(r["restarts"] == 0 for r in p.status()["stages"])
