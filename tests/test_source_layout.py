"""Sources across a change of ``replicas`` and replays of files with bad lines, through the real CLI.

The consumer runs with ``dedup: false`` here: it writes every record it receives, so a record the
source emitted twice shows up twice in its output and the tests see it.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from streampipe.stages.state import load_state
from tests.conftest import cli, wait_for

COUNT = 20000

LAYOUT = """\
pipeline: layout
stages:
  generator:
    type: generator
    replicas: {replicas}
    options: {{rate: {rate}, count: {count}, seed: 5}}
  consumer:
    type: consumer
    inputs: [generator]
    ack_timeout: 10
    options: {{dedup: false}}
"""


def set_replicas(p, replicas: int, rate: int = 25) -> None:
    """Slow (per replica) while the test stops the pipeline mid-stream, full speed (0) to finish it."""
    p.config.write_text(LAYOUT.format(replicas=replicas, count=COUNT, rate=rate))


def run_until(p, more: int) -> None:
    """Up, until ``more`` records more than now reached the sink, then down."""
    before = len(p.output_ids())
    p.up()
    wait_for(lambda: len(p.output_ids()) >= before + more, timeout=60, what=f"{more} more records at the sink")
    assert p.down().returncode == 0


@pytest.mark.timeout(900)   # several up/down cycles; a loaded machine takes ~10 s each
def test_source_replicas_1_2_1_across_down_up_keep_every_id_once(pipeline) -> None:
    p = pipeline(LAYOUT.format(replicas=1, count=COUNT, rate=25))
    run_until(p, 100)
    set_replicas(p, 2)
    p.up()
    assert [e["reason"] for e in p.events("repartition")] == [
        "generator: positions of 1 replicas repartitioned to 2 (generation 1)"]
    wait_for(lambda: all(r["records_out"] > 50 for r in p.rows("generator")), timeout=60, what="both replicas emitting")
    refused = cli("scale", "generator", "3", "--config", str(p.config), cwd=p.folder)
    assert refused.returncode == 1 and "`streampipe down` and `streampipe up`" in refused.stderr
    assert "repartitioned exactly" in refused.stderr
    assert p.down().returncode == 0
    assert len(p.output_ids()) < COUNT, "the test meant to stop the stream before its end"
    set_replicas(p, 1, rate=0)
    p.up()
    wait_for(lambda: p.row("generator")["state"] == "completed", timeout=60, what="the generator to complete")
    wait_for(lambda: len(p.output_ids()) >= COUNT, timeout=30, what="every record at the sink")
    assert len(p.events("repartition")) == 2
    ids = p.output_ids()
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} ids reached the sink twice, e.g. {twice[:10]}"
    assert sorted(ids) == list(range(COUNT))
    saved = load_state(p.run_dir / "state" / "generator.0.msgpack")
    assert saved is not None and saved["generation"] == 2 and saved["completed"] is True
    # a completed source stays completed, whatever replicas says next
    assert p.down().returncode == 0
    set_replicas(p, 3, rate=0)
    p.up()
    wait_for(lambda: [r["state"] for r in p.rows("generator")] == ["completed"] * 3, timeout=60, what="three completed replicas")
    assert len(p.output_ids()) == COUNT


@pytest.mark.timeout(600)   # several up/down cycles; a loaded machine takes ~10 s each
def test_a_source_that_cannot_repartition_fails_with_what_to_do(pipeline, tmp_path: Path) -> None:
    (tmp_path / "mycounter.py").write_text(textwrap.dedent("""\
        from streampipe import Source

        class Numbers(Source):
            def __init__(self, **options):
                super().__init__(**options)
                self.i = self.context.replica

            def generate(self):
                while True:
                    yield {"id": self.i}
                    self.i += self.context.replicas

            def snapshot(self):
                return {"i": self.i}

            def restore(self, state):
                self.i = state["i"]
    """))
    text = """\
        pipeline: user
        stages:
          numbers: {{type: "mycounter:Numbers", replicas: {replicas}, max_batch: 10}}
          consumer: {{type: consumer, inputs: [numbers]}}
    """
    p = pipeline(text.format(replicas=1))
    p.up()
    wait_for(lambda: len(p.output_ids()) > 100, timeout=30, what="records at the sink")
    assert p.down().returncode == 0
    p.config.write_text(textwrap.dedent(text.format(replicas=2)))
    proc = cli("up", "--detach", "--config", str(p.config), cwd=p.folder, timeout=120)
    p.remember()
    assert proc.returncode == 1
    assert "Set `replicas: 1` back" in proc.stderr
    rows = p.rows("numbers")
    assert [(r["state"], r["restarts"], r["pid"]) for r in rows] == [("failed", 0, None)] * 2
    assert "no `repartition(states, replicas)` classmethod" in rows[0]["last_error"]
    assert p.row("consumer")["state"] == "running"
    table = cli("status", "--config", str(p.config), cwd=p.folder)
    assert "failed" in table.stdout


def write_replay(path: Path, lines: int) -> tuple[list[int], list[int]]:
    """``lines`` lines, some of them bad in each way; returns the good ids and the bad line numbers."""
    good, bad, out = [], [], []
    for n in range(1, lines + 1):
        kind = n % 37
        if kind == 5:
            out.append(b'{"id": %d, "x": [1.0' % n)          # bad JSON
        elif kind == 11:
            out.append(b"[%d, 2, 3]" % n)                     # JSON, not an object
        elif kind == 23:
            out.append(b'{"id": %d, "x": "\xff\xfe"}' % n)    # not UTF-8
        elif kind == 31:
            out.append(b"")                                   # a blank line is skipped, not an error
            continue
        else:
            out.append(json.dumps({"id": n, "x": [float(n)], "y": n % 2}).encode())
            good.append(n)
            continue
        bad.append(n)
    path.write_bytes(b"\n".join(out) + b"\n")
    return good, bad


@pytest.mark.timeout(600)   # several up/down cycles; a loaded machine takes ~10 s each
def test_replay_dead_letters_bad_lines_and_delivers_every_good_one_once(pipeline, tmp_path: Path) -> None:
    good, bad = write_replay(tmp_path / "input.jsonl", 6000)
    text = """\
        pipeline: replay
        stages:
          generator: {{type: generator, options: {{file: input.jsonl, rate: {rate}}}}}
          consumer:
            type: consumer
            inputs: [generator]
            ack_timeout: 10
            options: {{dedup: false}}
    """
    p = pipeline(text.format(rate=40))
    run_until(p, 100)                    # down in the middle of the file, then on to its end
    assert len(p.output_ids()) < len(good) / 2, "the test meant to stop the replay in its middle"
    p.config.write_text(textwrap.dedent(text.format(rate=0)))
    p.up()
    wait_for(lambda: p.row("generator")["state"] == "completed", timeout=60, what="the replay to complete")
    wait_for(lambda: len(p.output_ids()) >= len(good), timeout=30, what="every good line at the sink")
    assert p.row("generator")["restarts"] == 0
    ids = p.output_ids()
    assert sorted(ids) == good, f"twice: {[i for i, n in Counter(ids).items() if n > 1][:10]}"
    dead = [json.loads(line) for line in (p.run_dir / "deadletter" / "generator.jsonl").read_text().splitlines()]
    assert sorted(d["record"]["line"] for d in dead) == bad
    assert all(d["record"]["file"].endswith("input.jsonl") and d["error"].startswith(f"input.jsonl:{d['record']['line']}: ")
               for d in dead)
    reasons = {d["record"]["line"] % 37: d["error"].split(": ", 2)[1] for d in dead}
    assert reasons == {5: "bad JSON", 11: "a JSON list, not an object", 23: "undecodable bytes at column 20"}


def test_validate_refuses_a_replayed_file_with_replicas(tmp_path: Path) -> None:
    (tmp_path / "input.jsonl").write_text('{"id": 1}\n')
    config = tmp_path / "services.yaml"
    config.write_text(textwrap.dedent("""\
        pipeline: replay
        stages:
          generator:
            type: generator
            replicas: 2
            options: {file: input.jsonl}
          consumer: {type: consumer, inputs: [generator]}
    """))
    proc = cli("validate", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "services.yaml:5" in proc.stderr and "stages.generator.replicas" in proc.stderr
    assert "replay 'input.jsonl' 2 times" in proc.stderr
