"""The service monitor with real processes and real signals: respawn, failure, hung, limits, scale."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import alive, cli, wait_for

USER_STAGES = textwrap.dedent("""
    import os, time
    from streampipe import Source, Stage

    class Crasher(Source):
        def generate(self):
            for i in range(10):
                yield {"id": i}
            raise RuntimeError("kaput: the source broke")

    class Sleeper(Stage):
        def process(self, batch):
            if os.path.exists(os.path.join(str(self.context.run_dir), "hang")):
                time.sleep(3600)
            return batch

    class Hog(Stage):
        def setup(self):
            self.ballast = []
        def process(self, batch):
            if os.path.exists(os.path.join(str(self.context.run_dir), "grow")):
                self.ballast.append(bytearray(os.urandom(1)) * (64 << 20))
            return batch
""")

BASE = """\
pipeline: mon
defaults: {{backoff_initial: 0.05, backoff_max: 0.2, heartbeat_timeout: 2, poll_interval: 0.2}}
stages:
  generator: {{type: generator, options: {{rate: 500}}}}
  middle:
    type: {middle}
    inputs: [generator]
{extra}
  consumer: {{type: consumer, inputs: [middle]}}
"""


def write_stages(folder: Path) -> None:
    (folder / "userstages.py").write_text(USER_STAGES)


def config(middle: str = "normalizer", extra: str = "") -> str:
    return BASE.format(middle=middle, extra=textwrap.indent(textwrap.dedent(extra), "    ")).replace(
        "defaults: {backoff_initial: 0.05, backoff_max: 0.2, heartbeat_timeout: 2, poll_interval: 0.2}",
        "poll_interval: 0.2\ndefaults: {backoff_initial: 0.05, backoff_max: 0.2, heartbeat_timeout: 2}")


def test_sigkill_of_a_stage_is_respawned(pipeline) -> None:
    p = pipeline(config())
    p.up()
    old = p.row("middle")["pid"]
    os.kill(old, signal.SIGKILL)
    row = wait_for(lambda: (r := p.row("middle"))["pid"] not in (None, old) and r["state"] == "running" and r,
                   timeout=20, what="a new middle process")
    assert row["restarts"] == 1 and alive(row["pid"]) and not alive(old)
    exits = [e for e in p.events("exit") if e["stage"] == "middle"]
    assert exits and exits[-1]["reason"] == "killed by SIGKILL"
    assert [e for e in p.events("restart") if e["stage"] == "middle"]
    wait_for(lambda: p.row("consumer")["records_in"] > 200, timeout=20, what="data flowing after the respawn")


def test_crash_loop_ends_failed_with_its_error(pipeline, tmp_path: Path) -> None:
    write_stages(tmp_path)
    p = pipeline("""\
        pipeline: crash
        defaults: {backoff_initial: 0.05, backoff_max: 0.1, max_restarts: 3, restart_window: 60}
        stages:
          broken: {type: "userstages:Crasher"}
          consumer: {type: consumer, inputs: [broken]}
    """)
    p.up(expect=1)
    row = wait_for(lambda: (r := p.row("broken"))["state"] == "failed" and r, timeout=60, what="failed state")
    assert row["restarts"] == 3 and row["pid"] is None
    assert "kaput: the source broke" in row["last_error"]
    time.sleep(1.0)
    assert p.row("broken")["restarts"] == 3, "a failed stage stays down"
    assert p.row("consumer")["state"] == "running", "the others keep running"
    assert p.events("failed")


def test_start_error_shows_traceback_and_does_not_storm(pipeline, tmp_path: Path) -> None:
    """A stage that fails as it starts (a dependency it imports in setup: an import at the module's top
    is refused by `up` before anything starts, tests/test_cli_habits.py) fails after max_restarts."""
    (tmp_path / "badmod.py").write_text("import numpy\nclass Stage:\n    def setup(self):\n"
                                        "        import this_dependency_is_missing\n    def process(self, batch):\n"
                                        "        return batch\n")
    p = pipeline("""\
        pipeline: bad
        defaults: {backoff_initial: 0.05, max_restarts: 2}
        stages:
          generator: {type: generator, options: {rate: 100}}
          bad: {type: "badmod:Stage", inputs: [generator]}
    """)
    proc = p.up(expect=1)
    assert "this_dependency_is_missing" in proc.stderr
    row = p.row("bad")
    assert row["state"] == "failed" and row["restarts"] == 2
    assert "ModuleNotFoundError" in row["last_error"] and "Traceback" in row["last_error"]
    assert p.row("generator")["state"] in ("running", "blocked"), "its producer started anyway"


def test_restart_never_stays_down(pipeline) -> None:
    p = pipeline(config(extra="restart: never"))
    p.up()
    old = p.row("middle")["pid"]
    os.kill(old, signal.SIGTERM)
    wait_for(lambda: p.row("middle")["state"] == "stopped", timeout=20, what="stopped")
    time.sleep(1.0)
    row = p.row("middle")
    assert row["state"] == "stopped" and row["pid"] is None and row["restarts"] == 0


def test_hung_stage_is_detected_and_replaced(pipeline, tmp_path: Path) -> None:
    write_stages(tmp_path)
    p = pipeline(config("userstages:Sleeper"))
    p.up()
    old = p.row("middle")["pid"]
    (p.run_dir / "hang").touch()
    hung = wait_for(lambda: [e for e in p.events("hung") if e["stage"] == "middle"], timeout=30, what="a hung event")
    assert "no heartbeat" in hung[0]["reason"]
    (p.run_dir / "hang").unlink()
    row = wait_for(lambda: (r := p.row("middle"))["pid"] not in (None, old) and r["state"] == "running" and r,
                   timeout=30, what="the hung stage replaced")
    assert row["restarts"] >= 1 and not alive(old)


def test_blocked_stage_is_not_hung(pipeline, tmp_path: Path) -> None:
    """A fast producer in front of a stuck consumer waits on backpressure and keeps beating."""
    write_stages(tmp_path)
    p = pipeline("""\
        pipeline: blocked
        poll_interval: 0.2
        defaults: {heartbeat_timeout: 2, hwm: 2, max_inflight: 4}
        stages:
          generator: {type: generator, options: {rate: 0}}
          sink: {type: "userstages:Sleeper", inputs: [generator], heartbeat_timeout: 600}
    """)
    p.up()
    (p.run_dir / "hang").touch()
    wait_for(lambda: p.row("generator")["state"] == "blocked", timeout=30, what="generator blocked")
    time.sleep(3.0)   # longer than heartbeat_timeout
    row = p.row("generator")
    assert row["state"] == "blocked" and row["restarts"] == 0
    assert not [e for e in p.events("hung") if e["stage"] == "generator"]


def test_stage_over_memory_limit_is_restarted(pipeline, tmp_path: Path) -> None:
    write_stages(tmp_path)
    p = pipeline(config("userstages:Hog", extra="max_rss_mb: 150\nlimit_for: 0.5"))
    p.up()
    (p.run_dir / "grow").touch()
    ev = wait_for(lambda: [e for e in p.events("limit") if e["stage"] == "middle"], timeout=60, what="a limit event")
    assert "max_rss_mb 150" in ev[0]["reason"]
    (p.run_dir / "grow").unlink()
    row = wait_for(lambda: (r := p.row("middle"))["restarts"] >= 1 and r["state"] == "running" and r, timeout=30, what="restart")
    assert "max_rss_mb" in row["last_error"]


def test_scale_up_and_down_while_data_flows(pipeline) -> None:
    p = pipeline(config(extra="replicas: 1"))
    p.up()
    assert cli("scale", "middle", "3", "--config", str(p.config), cwd=p.folder, check=True).returncode == 0
    rows = p.rows("middle")
    assert len(rows) == 3 and all(alive(r["pid"]) for r in rows)
    p.remember()
    wait_for(lambda: all(r["records_in"] > 0 for r in p.rows("middle")), timeout=30, what="every new replica receiving")
    before = p.row("consumer")["records_in"]
    gone = [r["pid"] for r in p.rows("middle")[1:]]
    assert cli("scale", "middle", "1", "--config", str(p.config), cwd=p.folder, check=True).returncode == 0
    assert len(p.rows("middle")) == 1
    wait_for(lambda: not any(alive(pid) for pid in gone), timeout=20, what="removed replicas gone")
    wait_for(lambda: p.row("consumer")["records_in"] > before + 300, timeout=30, what="data flowing after scale down")


def test_rolling_restart(pipeline) -> None:
    p = pipeline(config(extra="replicas: 2"))
    p.up()
    old = {r["pid"] for r in p.rows("middle")}
    assert cli("restart", "middle", "--config", str(p.config), cwd=p.folder, check=True).returncode == 0
    new = {r["pid"] for r in p.rows("middle")}
    assert not (old & new) and all(alive(pid) for pid in new)
    assert all(r["state"] in ("running", "blocked") for r in p.rows("middle"))


def test_events_command_prints_history(pipeline) -> None:
    p = pipeline(config())
    p.up()
    os.kill(p.row("middle")["pid"], signal.SIGKILL)
    wait_for(lambda: p.events("restart"), timeout=20, what="restart event")
    out = cli("events", "--config", str(p.config), cwd=p.folder, check=True).stdout
    assert "killed by SIGKILL" in out and "restart" in out


@pytest.mark.parametrize("kind", ["fork-server", "cold"])
def test_every_spawn_mode_runs_the_chain(pipeline, kind: str) -> None:
    p = pipeline(config().replace("defaults: {", f"defaults: {{spawn: {kind}, "))
    p.up()
    assert {r["spawn"] for r in p.status()["stages"]} == {kind}
    wait_for(lambda: p.row("consumer")["records_in"] > 100, timeout=30, what="data")


def test_a_stage_s_own_children_die_with_it(pipeline, tmp_path: Path) -> None:
    (tmp_path / "parent.py").write_text(textwrap.dedent("""
        import subprocess
        from streampipe import Stage

        class Parent(Stage):
            def setup(self):
                self.child = subprocess.Popen(["sleep", "1000"])
                (self.context.run_dir / f"child.{self.child.pid}").touch()
    """))
    p = pipeline(config("parent:Parent"))
    p.up()
    child = int(next(p.run_dir.glob("child.*")).name.split(".")[1])
    assert alive(child)
    os.kill(p.row("middle")["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(child), timeout=10, what="the stage's child to die with it")
