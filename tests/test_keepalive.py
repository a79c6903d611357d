"""A stage that waits on purpose inside a long call (a sink whose database is away) says so with
``context.keepalive(...)``: it is not taken for hung after ``heartbeat_timeout``, and ``status``
shows what it waits for. The same wait without it is replaced as hung (the test can fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Pipeline, wait_for

MODULE = '''
import time


class Patient:
    """A sink whose first batch waits ``wait_s`` for its "server", as a reconnect loop does."""
    def __init__(self, wait_s=4.0, keepalive=True):
        self.wait_s, self.keepalive, self.waited = wait_s, keepalive, False

    def process(self, batch):
        if not self.waited and not (self.context.run_dir / "waited").exists():
            until = time.monotonic() + self.wait_s
            while time.monotonic() < until:
                if self.keepalive:
                    self.context.keepalive("the test's server")
                time.sleep(0.05)
            (self.context.run_dir / "waited").write_text("1")
            self.waited = True
        with open(self.context.run_dir / "seen.txt", "a") as f:
            f.write("".join(f"{r['id']}\\n" for r in batch))
        return []
'''

PIPELINE = """\
pipeline: patience
defaults: {{heartbeat_timeout: 1.5}}
stages:
  generator: {{type: generator, options: {{count: 2000, rate: 1000, seed: 1}}}}
  sink:
    type: "patience:Patient"
    inputs: [generator]
    options: {{wait_s: 5.0, keepalive: {keepalive}}}
"""


def seen(p: Pipeline) -> list[int]:
    path = p.run_dir / "seen.txt"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("keepalive", [True, False])
def test_a_sink_waiting_with_keepalive_is_not_taken_for_hung(pipeline, tmp_path: Path, keepalive: bool) -> None:
    (tmp_path / "patience.py").write_text(MODULE)
    p = pipeline(PIPELINE.format(keepalive="true" if keepalive else "false"))
    p.up()
    if not keepalive:       # the same wait, silent: replaced as hung before it ends, again and again
        wait_for(lambda: [e for e in p.events("hung") if e.get("stage") == "sink"], timeout=60,
                 what="the silent sink replaced as hung")
        assert not (p.run_dir / "waited").exists()
        p.down()
        return
    wait_for(lambda: "the test's server" in p.row("sink").get("waiting", ""), timeout=30,
             what="status to say what the sink waits for")
    wait_for(lambda: (p.run_dir / "waited").exists(), timeout=60, what="the sink's wait to end")
    wait_for(lambda: set(seen(p)) >= set(range(2000)), timeout=90, what="every record at the sink")
    row = p.row("sink")
    hung = [e for e in p.events("hung") if e.get("stage") == "sink"]
    assert row["restarts"] == 0 and not hung, (row, hung)
    wait_for(lambda: p.row("sink").get("waiting", "") == "", timeout=10,
             what="status no longer saying it waits, once the wait is over")
    p.down()


LEAKY = '''
class Leaky:
    def setup(self):
        password = "hunter2-" + "x" * 3     # a local a traceback must not print
        raise ConnectionError("cannot reach the store", len(password))

    def process(self, batch):
        return batch
'''


@pytest.mark.timeout(120)
def test_tracebacks_in_logs_show_no_variable_values(pipeline, tmp_path: Path) -> None:
    """loguru's ``diagnose`` is off in every process: a stage that fails to start is logged with
    its traceback, and no local variable's value with it (no dumps of user data)."""
    (tmp_path / "leaky.py").write_text(LEAKY)
    p = pipeline("""\
        pipeline: leaky
        stages:
          generator: {type: generator, options: {count: 200, rate: 400, seed: 1}}
          leaky: {type: "leaky:Leaky", inputs: [generator], max_restarts: 0}
          sink: {type: consumer, inputs: [leaky]}
        """)
    p.up(expect=1)
    log = p.run_dir / "logs" / "leaky.0.jsonl"
    wait_for(lambda: log.exists() and "cannot reach the store" in log.read_text() and "Traceback" in log.read_text(),
             timeout=60, what="the failed start logged with its traceback")
    text = "".join(f.read_text(errors="replace") for f in (p.run_dir / "logs").glob("*"))
    assert "hunter2" not in text
    p.down()
