"""CLI habits a user brings from docker compose, pm2 and kubectl (issue 27), through the real entry point."""

from __future__ import annotations

from pathlib import Path

import streampipe
from tests.conftest import cli


def test_version() -> None:
    proc = cli("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"streampipe {streampipe.__version__}", proc


def test_down_with_nothing_running_is_done(tmp_path: Path) -> None:
    (tmp_path / "services.yaml").write_text("pipeline: idle\nstages:\n  gen: {type: generator}\n  sink: {type: consumer, inputs: [gen]}\n")
    proc = cli("down", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc
    assert "nothing to stop: no pipeline is running in" in proc.stderr
    assert not (tmp_path / ".streampipe").exists(), "down made nothing"


def test_logs_tail_and_grep_through_the_cli(tmp_path: Path) -> None:
    from tests.test_logs import _messages, _run_dir

    run = _run_dir(tmp_path)
    proc = cli("logs", "--run-dir", str(run), "--tail", "2", "--grep", "norm", timeout=60)
    assert proc.returncode == 0, proc
    assert _messages(proc.stdout) == ["norm1 one", "norm bad"]
    missing = cli("logs", "nosuch", "--run-dir", str(run), timeout=60)
    assert missing.returncode == 1 and "stages with logs: generator, normalizer, supervisor" in " ".join(missing.stderr.split())
