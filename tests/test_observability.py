"""Logs, facts, Prometheus metrics and the diagram, on a real running pipeline."""

from __future__ import annotations

import json
import socket
import textwrap
import urllib.request
from pathlib import Path

from streampipe.launcher.config import load_config
from streampipe.launcher.graph import to_mermaid
from tests.conftest import cli, wait_for

PICKY = textwrap.dedent("""
    from streampipe import Stage

    class Picky(Stage):
        def process(self, batch):
            out = []
            for r in batch:
                if r["id"] % 50 == 7:
                    raise ValueError(f"crafted record {r['id']} refused")
                out.append(r)
            return out
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_exception_reaches_log_facts_and_metrics(pipeline, tmp_path: Path) -> None:
    (tmp_path / "picky.py").write_text(PICKY)
    p = pipeline("""\
        pipeline: obs
        stages:
          generator: {type: generator, options: {rate: 1000}}
          picky: {type: "picky:Picky", inputs: [generator]}
          consumer: {type: consumer, inputs: [picky]}
          log_extractor: {type: log_extractor, options: {window_s: 1, summary_every_s: 0.5}}
    """)
    port = free_port()
    proc = cli("up", "--detach", "--config", str(p.config), "--metrics-port", str(port), cwd=p.folder, timeout=120)
    assert proc.returncode == 0, proc.stderr
    p.remember()
    # the stage's log holds the exception with its traceback
    log = p.run_dir / "logs" / "picky.0.jsonl"
    line = wait_for(lambda: next((json.loads(x) for x in log.read_text().splitlines() if "crafted record" in x), None),
                    timeout=30, what="the failure in the stage log")
    exc = line["record"]["exception"]
    assert exc["type"] == "ValueError" and "crafted record" in exc["value"]
    assert "Traceback" in line["text"] or "raise ValueError" in line["text"]
    assert line["record"]["extra"]["stage"] == "picky"
    # the extractor counts that exception type for that stage
    summary_path = p.run_dir / "logfacts-summary.json"
    summary = wait_for(lambda: (s := json.loads(summary_path.read_text())) and
                       any(e["stage"] == "picky" and e["type"] == "ValueError" and e["count"] >= 2 for e in s["exceptions"]) and s,
                       timeout=30, what="ValueError counted in the facts")
    fact = next(e for e in summary["exceptions"] if e["stage"] == "picky")
    assert "crafted record" in fact["sample"]["traceback"] or "ValueError" in fact["sample"]["traceback"]
    out = cli("logs", "--summary", "--config", str(p.config), cwd=p.folder, check=True).stdout
    assert "picky" in out and "ValueError" in out
    # logs: merged, filtered by stage and level
    logs = cli("logs", "picky", "--level", "ERROR", "--config", str(p.config), cwd=p.folder, check=True).stdout
    assert "crafted record" in logs and "consumer" not in logs
    # metrics: expected names, values that grow while data flows
    first = wait_for(lambda: scrape(port), timeout=15, what="the metrics endpoint")
    key = 'streampipe_records_in_total{pipeline="obs",replica="0",stage="consumer"}'
    assert key in first and 'streampipe_up{pipeline="obs",replica="0",stage="picky"}' in first
    assert first['streampipe_up{pipeline="obs",replica="0",stage="picky"}'] == 1.0
    assert first['streampipe_errors_total{pipeline="obs",replica="0",stage="picky"}'] >= 1
    assert any(k.startswith("streampipe_batch_latency_seconds_bucket") for k in first)
    assert first['streampipe_rss_bytes{pipeline="obs",replica="0",stage="consumer"}'] > 0
    wait_for(lambda: scrape(port)[key] > first[key], timeout=15, what="records_in to grow")


def test_crash_at_start_is_in_the_log_and_status(pipeline, tmp_path: Path) -> None:
    # (a module that fails to import is refused before anything starts: test_cli_habits.py checks that)
    (tmp_path / "crashy.py").write_text("class Sink:\n    def setup(self):\n"
                                        "        raise RuntimeError('configuration missing: set CRASHY_URL')\n"
                                        "    def process(self, batch):\n        return batch\n")
    p = pipeline("""\
        pipeline: crash
        defaults: {max_restarts: 1, backoff_initial: 0.05}
        stages:
          generator: {type: generator, options: {rate: 100}}
          sink: {type: "crashy:Sink", inputs: [generator]}
    """)
    p.up(expect=1)
    assert "configuration missing" in p.row("sink")["last_error"]
    logs = cli("logs", "sink", "--config", str(p.config), cwd=p.folder, check=True).stdout
    assert "configuration missing: set CRASHY_URL" in logs


def test_graph_of_the_default_pipeline() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "services.yaml")
    text = to_mermaid(cfg)
    for name in cfg.stages:
        assert name in text
    for edge in cfg.edges():
        assert edge.src in text and edge.dest in text
    assert text.count("-->") + text.count("-.->") >= len(cfg.edges())
    proc = cli("graph", "--config", str(root / "services.yaml"), "--format", "dot", check=True)
    assert "digraph" in proc.stdout
