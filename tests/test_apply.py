"""`streampipe apply`: a changed services.yaml applied to a running pipeline, nothing lost, nothing
else restarted; a bad or refused file changes nothing; `--dry-run` only prints the plan."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest

from tests.conftest import cli, wait_for

pytestmark = pytest.mark.timeout(300)

COUNT = 60000    # at 200 records/s: 300 s, still flowing while the apply runs however loaded the machine (each
                 # CLI call imports typer, pydantic, ...); then an apply lifts the rate and the rest flows at once

MODULE = """
    from streampipe import Stage

    class Tag(Stage):
        def __init__(self, tag="a", **options):
            super().__init__(**options)
            self.tag = tag

        def process(self, batch):
            return [{**r, "tag": self.tag} for r in batch]

    class Enrich(Stage):
        def process(self, batch):
            return [{**r, "enriched": True} for r in batch]
"""

BEFORE = f"""\
    pipeline: live
    stages:
      gen: {{type: generator, options: {{rate: 200, count: {COUNT}}}}}
      norm: {{type: normalizer, inputs: [gen], replicas: 2}}
      mark: {{type: "mystages:Tag", inputs: [norm], options: {{tag: a}}}}
      audit: {{type: consumer, inputs: [mark], options: {{output: output/audit.jsonl}}}}
      sink: {{type: consumer, inputs: [mark]}}
"""

# mark's options change, norm scales 2 -> 3, enrich goes between mark and sink, audit goes
AFTER = f"""\
    pipeline: live
    stages:
      gen: {{type: generator, options: {{rate: 200, count: {COUNT}}}}}
      norm: {{type: normalizer, inputs: [gen], replicas: 3}}
      mark: {{type: "mystages:Tag", inputs: [norm], options: {{tag: b}}}}
      enrich: {{type: "mystages:Enrich", inputs: [mark]}}
      sink: {{type: consumer, inputs: [enrich]}}
"""


def pids(p) -> dict[str, int | str | None]:
    """Each replica's pid; a completed one (the finite source, at the end) keeps the pid it ran with."""
    return {f"{r['name']}.{r['replica']}": r["pid"] or ("completed" if r["state"] == "completed" else None)
            for r in p.status()["stages"]}


def digests(p) -> dict[str, str]:
    return {r["name"]: r["config"] for r in p.status()["stages"]}


def unchanged(before: dict[str, int | str | None], now: dict[str, int | str | None]) -> bool:
    return set(before) == set(now) and all(now[k] in (before[k], "completed") for k in before)


def records(p) -> list[dict]:
    path = p.run_dir / "output" / "records.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def test_apply_changes_a_running_pipeline_and_loses_nothing(pipeline, tmp_path: Path) -> None:
    write(tmp_path / "mystages.py", MODULE)
    p = pipeline(BEFORE)
    p.up()
    wait_for(lambda: len(p.output_ids()) > 400, timeout=60, what="records at the sink")
    before, first = pids(p), digests(p)

    # --dry-run prints the plan, nothing changes
    write(p.config, AFTER)
    dry = cli("apply", "--dry-run", "--config", str(p.config), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    for word in ("add", "enrich", "remove", "audit", "scale", "2 -> 3", "rolling restart", "mark"):
        assert word in dry.stdout, dry.stdout
    assert unchanged(before, pids(p))
    assert not p.events("apply")

    done = cli("apply", "--config", str(p.config), cwd=tmp_path, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    after = pids(p)
    assert set(after) == {"gen.0", "norm.0", "norm.1", "norm.2", "mark.0", "enrich.0", "sink.0"}
    for same in ("gen.0", "norm.0", "norm.1", "sink.0"):      # unchanged: never restarted
        assert after[same] == before[same], same              # (and the source still ran: the stream flowed)
    assert after["mark.0"] != before["mark.0"]
    assert digests(p)["mark"] != first["mark"] and digests(p)["gen"] == first["gen"]    # status: what each runs
    assert all(r["state"] in ("running", "blocked", "completed") for r in p.status()["stages"])

    # after it, a bad file: exit 2 with file:line: field, nothing changes
    write(tmp_path / "bad.yaml", AFTER.replace("replicas: 3", "replicas: 0"))
    bad = cli("apply", "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "bad.yaml:4: stages.norm.replicas" in bad.stderr
    # a pipeline-wide setting: refused, exit 2, nothing changes
    write(tmp_path / "refused.yaml", AFTER.replace("pipeline: live", "pipeline: live\n    delivery: at-most-once"))
    refused = cli("apply", "--config", str(tmp_path / "refused.yaml"), "--run-dir", str(p.run_dir), cwd=tmp_path)
    assert refused.returncode == 2 and "delivery: 'at-least-once' -> 'at-most-once' cannot change" in refused.stderr
    assert unchanged(after, pids(p))

    # the source at full speed: it restarts from its committed position (a changed source, rolling)
    write(p.config, AFTER.replace("rate: 200", "rate: 0"))
    fast = cli("apply", "--config", str(p.config), cwd=tmp_path, timeout=280)
    assert fast.returncode == 0, fast.stdout + fast.stderr
    wait_for(lambda: p.row("gen")["state"] == "completed", timeout=240, what="the stream to end")
    wait_for(lambda: len(set(p.output_ids())) >= COUNT, timeout=60, what="every record at the sink")
    ids = p.output_ids()
    assert sorted(ids) == list(range(COUNT))                  # every id, exactly once
    rows = records(p)
    assert {r["tag"] for r in rows} == {"a", "b"}             # old options before, new after
    assert any(r.get("enriched") for r in rows) and not all(r.get("enriched") for r in rows)
    assert all(r["tag"] == "b" and r.get("enriched") for r in rows if r["id"] >= COUNT - 100)   # the end: new path
    reasons = [e["reason"] for e in p.events("apply")]
    assert any(r.startswith("added") for r in reasons) and "removed" in reasons and "inputs" in "".join(reasons)
    assert any(r.startswith("scaled 2 -> 3") for r in reasons) and any(r.startswith("rolling restart") for r in reasons)
    assert [e for e in p.events("scale") if e["stage"] == "norm"]


def test_sighup_applies_the_config_file_and_a_bad_one_changes_nothing(pipeline, tmp_path: Path) -> None:
    write(tmp_path / "mystages.py", MODULE)
    p = pipeline("""\
        pipeline: hup
        stages:
          gen: {type: generator, options: {rate: 200}}
          mark: {type: "mystages:Tag", inputs: [gen], options: {tag: a}}
          sink: {type: consumer, inputs: [mark]}
    """)
    p.up()
    before = pids(p)
    sup = p.status()["supervisor_pid"]
    write(p.config, p.config.read_text().replace("tag: a", "tag: [oops"))   # invalid YAML
    os.kill(sup, signal.SIGHUP)
    wait_for(lambda: any("refused" in e["reason"] for e in p.events("apply")), timeout=60, what="the refusal event")
    assert unchanged(before, pids(p))
    write(p.config, p.config.read_text().replace("tag: [oops", "tag: b"))
    os.kill(sup, signal.SIGHUP)
    wait_for(lambda: any(e["reason"].startswith("applied") for e in p.events("apply")), timeout=120, what="the apply")
    after = pids(p)
    assert after["gen.0"] == before["gen.0"] and after["sink.0"] == before["sink.0"] and after["mark.0"] != before["mark.0"]
    wait_for(lambda: records(p)[-1]["tag"] == "b", timeout=30, what="records of the new options")


def test_up_watch_restarts_a_stage_whose_module_changed_and_applies_the_config(pipeline, tmp_path: Path) -> None:
    count = 60000     # at 200 records/s: flowing however loaded the machine, until the apply lifts the rate
    write(tmp_path / "mystages.py", MODULE)
    p = pipeline(f"""\
        pipeline: watch
        stages:
          gen: {{type: generator, options: {{rate: 200, count: {count}}}}}
          mark: {{type: "mystages:Tag", inputs: [gen], replicas: 2, options: {{tag: a}}}}
          sink: {{type: consumer, inputs: [mark]}}
    """)
    up = cli("up", "--detach", "--watch", "--config", str(p.config), cwd=tmp_path, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    p.remember()
    wait_for(lambda: len(p.output_ids()) > 200, timeout=60, what="records at the sink")
    before = pids(p)

    # the stage's code changes: its replicas restart one by one with it; nothing else restarts
    write(tmp_path / "mystages.py", MODULE.replace('"tag": self.tag}', '"tag": self.tag, "code": 2}'))
    wait_for(lambda: all(pids(p)[f"mark.{i}"] != before[f"mark.{i}"] for i in (0, 1)), timeout=120,
             what="both mark replicas restarted")
    wait_for(lambda: any(r.get("code") == 2 for r in records(p)), timeout=60, what="records made by the new code")
    after = pids(p)
    assert after["gen.0"] == before["gen.0"] and after["sink.0"] == before["sink.0"]
    assert any("mystages.py changed" in e["reason"] for e in p.events("apply"))

    # the config changes: applied as by `streampipe apply` (the source runs at full speed from its committed position)
    write(p.config, p.config.read_text().replace("tag: a", "tag: b").replace("rate: 200", "rate: 0"))
    wait_for(lambda: any(e["reason"].startswith("applied") for e in p.events("apply")), timeout=120, what="the apply")
    wait_for(lambda: p.row("gen")["state"] == "completed", timeout=120, what="the stream to end")
    wait_for(lambda: len(set(p.output_ids())) >= count, timeout=60, what="every record at the sink")
    assert sorted(p.output_ids()) == list(range(count))      # every id, exactly once
    rows = records(p)
    assert rows[-1]["tag"] == "b" and rows[-1]["code"] == 2
