"""The real pipeline, as a user runs it: up, status, down, Ctrl-C, SIGKILL of the supervisor."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import alive, cli, wait_for

CHAIN = """\
pipeline: chain
stages:
  generator:
    type: generator
    options: {rate: 2000, seed: 3, malformed_every: 500}
  normalizer:
    type: normalizer
    inputs: [generator]
    replicas: 2
  consumer:
    type: consumer
    inputs: [normalizer]
"""


def test_up_status_down(pipeline) -> None:
    p = pipeline(CHAIN)
    p.up()
    st = p.status()
    assert [(r["name"], r["replica"]) for r in st["stages"]] == [("generator", 0), ("normalizer", 0), ("normalizer", 1), ("consumer", 0)]
    assert all(r["state"] in ("running", "blocked") and alive(r["pid"]) for r in st["stages"])
    assert {"name", "replica", "pid", "state", "uptime_s", "restarts", "cpu_percent", "rss_bytes", "records_in",
            "records_out", "errors", "last_error"} <= set(st["stages"][0])
    first = p.row("consumer")["records_in"]
    wait_for(lambda: p.row("consumer")["records_in"] > first + 500, timeout=30, what="consumer counters to grow")
    assert all(r["rss_bytes"] > 0 for r in p.status()["stages"])
    wait_for(lambda: len(p.output_ids()) > 500, timeout=30, what="records in the consumer's output")
    # the table renders too
    table = cli("status", "--config", str(p.config), cwd=p.folder)
    assert table.returncode == 0 and "normalizer" in table.stdout and "running" in table.stdout
    # and so does --json, what the tests otherwise ask in-process
    as_json = json.loads(cli("status", "--json", "--config", str(p.config), cwd=p.folder, check=True).stdout)
    assert {(r["name"], r["replica"]) for r in as_json["stages"]} == {(r["name"], r["replica"]) for r in p.status()["stages"]}
    # malformed records went to the dead-letter file and the normalizer kept running
    dead = wait_for(lambda: (p.run_dir / "deadletter" / "normalizer.jsonl").exists() and
                    (p.run_dir / "deadletter" / "normalizer.jsonl").read_text().splitlines(), timeout=30, what="dead letters")
    entry = json.loads(dead[0])
    assert entry["record"]["x"] == "not-a-vector" and "expected vector" in entry["error"]
    assert all(r["restarts"] == 0 and r["state"] in ("running", "blocked") for r in p.rows("normalizer"))
    assert sum(r["errors"] for r in p.rows("normalizer")) >= 1
    pids = [r["pid"] for r in p.status()["stages"]]
    proc = p.down()
    assert proc.returncode == 0, proc.stderr
    assert not any(alive(pid) for pid in pids)
    # every record the generator produced reached the output once (malformed ones excepted)
    ids = p.output_ids()
    assert len(ids) == len(set(ids))
    assert set(range(max(ids) + 1)) - set(ids) <= {i for i in range(max(ids) + 1) if (i + 1) % 500 == 0}
    # no pipeline: one line and exit 1
    gone = cli("status", "--config", str(p.config), cwd=p.folder)
    assert gone.returncode == 1 and "no pipeline running" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_everything(pipeline) -> None:
    p = pipeline(CHAIN)
    fg = p.up_foreground()
    pids = [r["pid"] for r in p.status()["stages"]]
    fg.send_signal(signal.SIGINT)
    assert fg.wait(60) == 0
    assert not any(alive(pid) for pid in pids)
    assert not (p.run_dir / "supervisor.pid").exists()


def test_supervisor_sigkill_takes_stages_down(pipeline) -> None:
    p = pipeline(CHAIN)
    p.up()
    st = p.status()
    pids = [r["pid"] for r in st["stages"]] + [st["forkserver_pid"]]
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=3, interval=0.05, what="every stage to die with its supervisor")
    # and `up` again on the same run directory works
    p.up()
    assert all(r["state"] in ("running", "blocked") for r in p.status()["stages"])


def test_user_stage_runs_in_the_pipeline(pipeline, tmp_path: Path) -> None:
    (tmp_path / "mystages.py").write_text(textwrap.dedent("""
        from streampipe import Stage

        class Enricher(Stage):
            def __init__(self, tag="hello", **options):
                super().__init__(**options)
                self.tag = tag

            def process(self, batch):
                return [{**r, "tag": self.tag, "x_sum": sum(r["x"])} for r in batch]

        class Lookup(Stage):
            async def process(self, batch):
                import asyncio
                await asyncio.sleep(0.001)      # an I/O-bound call, say
                return [{**r, "looked_up": True} for r in batch]
    """))
    p = pipeline("""\
        pipeline: user
        stages:
          generator: {type: generator, options: {rate: 1000}}
          normalizer: {type: normalizer, inputs: [generator]}
          enricher:
            type: mystages:Enricher
            inputs: [normalizer]
            options: {tag: enriched}
          lookup: {type: "mystages:Lookup", inputs: [enricher]}
          consumer: {type: consumer, inputs: [lookup]}
    """)
    p.up()
    wait_for(lambda: len(p.output_ids()) > 100, timeout=30, what="enriched records")
    line = json.loads((p.run_dir / "output" / "records.jsonl").read_text().splitlines()[0])
    assert line["tag"] == "enriched" and isinstance(line["x_sum"], float) and line["looked_up"] is True
    refused = cli("scale", "generator", "2", "--config", str(p.config), cwd=p.folder)
    assert refused.returncode == 1 and "is a source" in refused.stderr


@pytest.mark.parametrize("transport,delivery", [("ipc", "at-least-once"), ("tcp", "at-most-once")])
def test_finite_source_completes_and_is_not_restarted(pipeline, transport: str, delivery: str) -> None:
    p = pipeline(f"""\
        pipeline: finite
        transport: {transport}
        delivery: {delivery}
        stages:
          generator: {{type: generator, options: {{count: 3000}}}}
          normalizer: {{type: normalizer, inputs: [generator], replicas: 2}}
          consumer: {{type: consumer, inputs: [normalizer]}}
    """)
    p.up()
    wait_for(lambda: p.row("generator")["state"] == "completed", timeout=60, what="generator completed")
    assert sorted(p.output_ids()) == list(range(3000))
    time.sleep(1.0)
    assert p.row("generator")["restarts"] == 0 and p.row("generator")["pid"] is None
    # a new `up` on the same run dir does not emit the finite stream again
    assert p.down().returncode == 0
    p.up()
    wait_for(lambda: p.row("generator")["state"] == "completed", timeout=60, what="generator completed again")
    time.sleep(0.5)
    assert sorted(p.output_ids()) == list(range(3000))


def test_stage_children_share_its_process_group(pipeline) -> None:
    p = pipeline(CHAIN)
    p.up()
    for r in p.status()["stages"]:
        assert os.getpgid(r["pid"]) == r["pid"], "each stage leads its own process group"
        assert psutil.Process(r["pid"]).ppid() == p.status()["supervisor_pid"]


def test_run_dir_too_deep_for_unix_socket_paths(pipeline, tmp_path: Path) -> None:
    """Regression: socket paths over 107 bytes. Sockets then live in a short folder under /tmp."""
    deep = tmp_path.joinpath(*["a_rather_long_folder_name_for_sockets"] * 4)
    deep.mkdir(parents=True)
    p = pipeline("""\
        pipeline: deep
        stages:
          generator: {type: generator, options: {count: 500}}
          consumer: {type: consumer, inputs: [generator]}
    """, folder=deep)
    p.up()
    assert (p.run_dir / "sock").is_symlink() and len(str(p.run_dir / "sock")) > 107
    wait_for(lambda: len(p.output_ids()) == 500, timeout=30, what="records through the deep run dir")
