"""``status`` as an operator reads it (issue 27), through the real CLI of a real pipeline.

- After ``streampipe scale``, what runs is not what services.yaml says: ``status`` marks the
  stage's replicas and says so under the table (``--json``: ``drift``), ``apply --dry-run`` shows
  that applying the file scales it back, ``apply`` does, and a file that records the running
  count clears the drift without touching a process.
- A replica with no process (a source that completed, a stage that failed for good) shows no
  figures of a process that is gone: ``-`` for cpu, rss and rate (``--json``: null).
- Rows keep one order, the config's stages then replica index, whatever restarts or is added.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from tests.conftest import Pipeline, cli, wait_for

SCALED = """\
pipeline: drift
stages:
  gen: {type: generator, options: {rate: 200, seed: 1}}
  summer: {type: normalizer, inputs: [gen]}
  sink: {type: consumer, inputs: [summer]}
"""


def status_json(p: Pipeline) -> dict[str, Any]:
    proc = cli("status", "--json", "--config", str(p.config), cwd=p.folder, check=True)
    return json.loads(proc.stdout)


def table_rows(text: str) -> list[dict[str, str]]:
    """The body rows of a status table (as a pipe sees it) by header."""
    header = next(ln for ln in text.splitlines() if ln.startswith("┃"))
    names = [c.strip() for c in header.strip("┃").split("┃")]
    return [dict(zip(names, (c.strip() for c in ln.strip("│").split("│")))) for ln in text.splitlines() if ln.startswith("│")]


def replicas(p: Pipeline, stage: str) -> list[int]:
    return [r["pid"] for r in p.rows(stage) if r["state"] == "running"]


def test_scale_shows_drift_in_status_and_apply_scales_back_or_records_it(pipeline) -> None:
    p = pipeline(SCALED)
    p.up()
    cli("scale", "summer", "3", "--config", str(p.config), cwd=p.folder, check=True)
    st = status_json(p)
    assert st["drift"] == {"summer": {"running": 3, "configured": 1}}
    table = cli("status", "--config", str(p.config), cwd=p.folder, check=True).stdout
    rows = table_rows(table)
    assert [(r["stage"], r["r"]) for r in rows] == [("gen", "0"), ("summer", "0*"), ("summer", "1*"), ("summer", "2*"),
                                                    ("sink", "0")], table
    assert "* summer: running 3 replicas, services.yaml says 1 (streampipe apply scales it back to 1)" in table

    # the dry run says what applying the unchanged file would do, and changes nothing
    dry = cli("apply", "--dry-run", "--config", str(p.config), cwd=p.folder, check=True).stdout
    assert "scale" in dry and "3 -> 1 replicas" in " ".join(dry.split()), dry
    assert "nothing to change" not in dry
    assert len(p.rows("summer")) == 3 and status_json(p)["drift"]

    # applying it scales back: the file's count runs, and nothing drifts
    cli("apply", "--config", str(p.config), cwd=p.folder, check=True)
    wait_for(lambda: len(p.rows("summer")) == 1, timeout=60, what="summer back to 1 replica")
    assert status_json(p)["drift"] == {}
    assert "*" not in "".join(r["r"] for r in table_rows(cli("status", "--config", str(p.config), cwd=p.folder,
                                                                 check=True).stdout))

    # scaled again, and the file edited to the running count: apply records it, no process changes
    cli("scale", "summer", "2", "--config", str(p.config), cwd=p.folder, check=True)
    wait_for(lambda: len(replicas(p, "summer")) == 2, timeout=60, what="two summer replicas running")
    pids = replicas(p, "summer")
    assert status_json(p)["drift"] == {"summer": {"running": 2, "configured": 1}}
    p.config.write_text(SCALED.replace("inputs: [gen]}", "inputs: [gen], replicas: 2}"))
    dry = cli("apply", "--dry-run", "--config", str(p.config), cwd=p.folder, check=True).stdout
    assert "record" in dry and "2 replicas, as `streampipe scale` set them" in " ".join(dry.split()), dry
    cli("apply", "--config", str(p.config), cwd=p.folder, check=True)
    assert status_json(p)["drift"] == {}
    assert replicas(p, "summer") == pids, "recording the count restarts nothing"
    assert "nothing to change" in cli("apply", "--dry-run", "--config", str(p.config), cwd=p.folder, check=True).stdout


ROWS = """\
pipeline: rows
stages:
  gen: {type: generator, options: {count: 300, rate: 0, seed: 2}}
  other: {type: generator, options: {rate: 50, seed: 3}, max_restarts: 0}
  norm: {type: normalizer, inputs: [gen, other], replicas: 2}
  sink: {type: consumer, inputs: [norm]}
"""
FIGURES = ("cpu_percent", "rss_bytes", "num_fds", "num_threads", "rate")


def test_a_replica_with_no_process_shows_no_figures_and_rows_keep_their_order(pipeline) -> None:
    p = pipeline(ROWS)
    p.up()
    wait_for(lambda: p.row("gen")["state"] == "completed" and p.row("gen")["pid"] is None, timeout=60,
             what="gen completed", detail=lambda: str(p.row("gen")))
    os.kill(p.row("other")["pid"], signal.SIGKILL)             # max_restarts: 0: it fails for good
    wait_for(lambda: p.row("other")["state"] == "failed", timeout=60, what="other failed", detail=lambda: str(p.row("other")))
    wait_for(lambda: all(r["rate"] is not None for r in p.rows("norm") + p.rows("sink")), timeout=30, what="running figures")

    st = status_json(p)
    for r in st["stages"]:
        if r["name"] in ("gen", "other"):
            assert all(r[k] is None for k in FIGURES), r
        else:
            assert r["state"] == "running" and all(isinstance(r[k], (int, float)) for k in FIGURES), r
            assert r["rss_bytes"] > 0
    table = table_rows(cli("status", "--wide", "--config", str(p.config), cwd=p.folder, check=True).stdout)
    for row in table:
        if row["stage"] in ("gen", "other"):
            assert (row["cpu%"], row["rss"], row["fds"], row["thr"], row["rate/s"]) == ("-",) * 5, row
        else:
            assert row["cpu%"] != "-" and row["rss"] != "-" and row["rate/s"] != "-", row

    order = [("gen", 0), ("other", 0), ("norm", 0), ("norm", 1), ("sink", 0)]
    assert [(r["name"], r["replica"]) for r in st["stages"]] == order
    # a replica restarted (SIGKILLed, started again) keeps its row
    old = p.row("norm", 0)["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: p.row("norm", 0)["restarts"] == 1 and p.row("norm", 0)["state"] == "running", timeout=60,
             what="norm.0 restarted", detail=lambda: str(p.row("norm", 0)))
    assert [(r["name"], r["replica"]) for r in status_json(p)["stages"]] == order
    # a stage added by apply takes its place in the file's order, not the bottom
    p.config.write_text(ROWS.replace("  sink:", "  tap: {type: consumer, inputs: [norm], options: {output: output/tap.jsonl}}\n  sink:"))
    cli("apply", "--config", str(p.config), cwd=p.folder, check=True)
    wait_for(lambda: p.row("tap")["state"] == "running", timeout=60, what="tap running")
    rows = [(r["name"], r["replica"]) for r in status_json(p)["stages"]]
    assert rows == [("gen", 0), ("other", 0), ("norm", 0), ("norm", 1), ("tap", 0), ("sink", 0)], rows
    assert [r["stage"] for r in table_rows(cli("status", "--config", str(p.config), cwd=p.folder, check=True).stdout)] == \
        ["gen", "other", "norm", "norm", "tap", "sink"]


def test_prometheus_has_no_sample_for_a_process_that_is_gone() -> None:
    """/metrics follows: a replica with no process has no cpu or rss sample (rather than a stale one)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from streampipe.launcher.metrics import PipelineCollector

    rows = [{"name": "gen", "replica": 0, "state": "completed", "cpu_percent": None, "rss_bytes": None, "rate": None},
            {"name": "sink", "replica": 0, "state": "running", "cpu_percent": 4.0, "rss_bytes": 123, "rate": 9.0}]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(lambda: {"pipeline": "m", "stages": rows}))
    samples = {(s.name, s.labels.get("stage")): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples[("streampipe_rss_bytes", "sink")] == 123 and samples[("streampipe_cpu_percent", "sink")] == 4
    assert ("streampipe_up", "gen") in samples
    assert ("streampipe_rss_bytes", "gen") not in samples and ("streampipe_cpu_percent", "gen") not in samples
