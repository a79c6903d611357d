"""CLI habits a user brings from docker compose, pm2 and kubectl (issue 27), through the real entry point."""

from __future__ import annotations

import os
from pathlib import Path

import streampipe
from tests.conftest import cli


def test_version() -> None:
    proc = cli("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"streampipe {streampipe.__version__}", proc


def test_flags_show_no_value_in_help() -> None:
    """A flag takes no value: no ``<bool>`` beside it (typer 0.2x prints one), options keep theirs."""
    for args in (("--help",), ("up", "--help"), ("deadletter", "replay", "--help"), ("export", "systemd", "--help")):
        text = cli(*args, check=True).stdout
        assert "<bool>" not in text and "--help" in text, args
    assert "<path>" in cli("up", "--help", check=True).stdout      # --config keeps its value's type


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


def _leftovers(run_dir: Path) -> list[int]:
    """Processes still running with the run directory on their command line (none, once up returned)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]


def _processes_of(folder: Path) -> list[str]:
    """Processes working in ``folder`` or naming it (a supervisor, fork server or stage of its pipeline)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cwd = proc.cwd()
        except psutil.Error:
            cwd = ""
        if proc.pid != os.getpid() and (cwd == str(folder) or str(folder) in " ".join(proc.info["cmdline"] or [])):
            found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])}")
    return found


def test_up_exit_when_done_runs_a_batch_job_to_completion(tmp_path: Path) -> None:
    """`up --exit-when-done` returns 0 once every source completed and what it sent is done: every
    record is at the sink when it returns, and nothing of the pipeline runs on."""
    (tmp_path / "services.yaml").write_text(
        "pipeline: batch\nstages:\n"
        "  gen: {type: generator, replicas: 2, options: {count: 3000, rate: 0, seed: 4}}\n"
        "  norm: {type: normalizer, inputs: [gen]}\n"
        "  sink: {type: consumer, inputs: [norm]}\n")
    proc = cli("up", "--exit-when-done", cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    ids = [json.loads(line)["id"] for line in (tmp_path / ".streampipe" / "output" / "records.jsonl").read_text().splitlines()]
    assert sorted(ids) == list(range(3000))
    events = [json.loads(line) for line in (tmp_path / ".streampipe" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "done" and "every source completed" in e["reason"] for e in events)
    exits = [e for e in events if e["event"] == "exit"]
    assert exits and all(isinstance(e["pid"], int) for e in exits), "an exit event names the pid that exited"
    assert _leftovers(tmp_path / ".streampipe") == []


def test_up_exit_when_done_fails_when_a_stage_fails_for_good(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("class Broken:\n    def setup(self):\n        raise RuntimeError('no')\n"
                                        "    def process(self, batch):\n        return batch\n")
    (tmp_path / "services.yaml").write_text(
        "pipeline: broken\nstages:\n"
        "  gen: {type: generator, options: {rate: 100}}\n"
        "  bad: {type: 'broken:Broken', inputs: [gen], max_restarts: 1}\n"
        "  sink: {type: consumer, inputs: [bad]}\n")
    proc = cli("up", "--exit-when-done", cwd=tmp_path, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed: bad.0" in proc.stderr
    assert _leftovers(tmp_path / ".streampipe") == []


BROKEN_IMPORT = '''\
from streampipe import Stage

LIMIT = int("ten")


class Tag(Stage):
    def process(self, batch):
        return batch
'''


def test_a_module_that_fails_to_import_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """validate, up and up --detach import the stage modules in a child first (issue 27: validate
    passed, then `up --detach` exited 1, printed the traceback twice and left the supervisor and the
    other stages running): each exits 2 naming services.yaml's line, the module's file:line and the
    error, prints the user's traceback once, and nothing of the pipeline runs."""
    (tmp_path / "mystages.py").write_text(BROKEN_IMPORT)
    (tmp_path / "services.yaml").write_text(
        "pipeline: broken\nstages:\n"
        "  gen: {type: generator, options: {rate: 100}}\n"
        "  tag: {type: 'mystages:Tag', inputs: [gen]}\n"
        "  sink: {type: consumer, inputs: [tag]}\n")
    where = ("services.yaml:4: stages.tag.type: module 'mystages' fails to import: mystages.py:3: "
             "ValueError: invalid literal for int() with base 10: 'ten'")
    for args in (["validate"], ["up"], ["up", "--detach"]):
        proc = cli(*args, cwd=tmp_path, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, (args, out)
        assert where in out, (args, out)
        assert out.count("Traceback (most recent call last)") == 1 and out.count('LIMIT = int("ten")') == 1, (args, out)
        assert "introspect.py" not in out and "importlib" not in out, (args, out)
        assert _processes_of(tmp_path) == [] and not (tmp_path / ".streampipe" / "events.jsonl").exists(), args
    (tmp_path / "mystages.py").write_text(BROKEN_IMPORT.replace('int("ten")', "int('10')"))
    assert cli("validate", cwd=tmp_path, timeout=120).returncode == 0
