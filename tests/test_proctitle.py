"""Process titles: `ps` shows every process of a pipeline by its role (issue 10)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def ps_args(pid: int) -> str:
    """What `ps -o args` shows for ``pid`` (its /proc/PID/cmdline, as top and htop show it)."""
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=10).stdout.strip()


def test_ps_shows_each_stage_replica_supervisor_and_fork_server(pipeline) -> None:
    config = yaml.safe_load((ROOT / "services.yaml").read_text())   # the default pipeline ...
    config["stages"]["log_extractor"]["spawn"] = "cold"             # ... with one stage cold-started
    p = pipeline(yaml.safe_dump(config))
    p.up()

    def every_pid() -> dict | None:
        st = p.status()
        return st if all(r["pid"] and r["state"] == "running" for r in st["stages"]) else None

    st = wait_for(every_pid, timeout=60, what="every replica running")
    assert len(st["stages"]) == 7
    for row in st["stages"]:
        assert ps_args(row["pid"]) == f"streampipe: {row['name']}.{row['replica']} [demo]", row
    assert ps_args(st["supervisor_pid"]) == "streampipe: supervisor [demo]"
    assert ps_args(st["forkserver_pid"]) == "streampipe: fork-server [demo]"
    assert p.events("start")[0]["reason"].startswith("fork-server spawn")
    assert p.down().returncode == 0
