"""End of stream through transforms: a finite stream's end reaches every stage, a stage's
``finish()`` makes its last records (a window closes the windows still open), and the pipeline
ends, exactly, through SIGKILLs of the replicas around the end.

Real processes: ``streampipe up``, a user's finite source, a stateless hop with 2 replicas, a
window with 2 replicas partitioned by key, consumers; the reference windows the records the hop
passed on, after the fact, every window closed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from streampipe.stages.api import Stage
from streampipe.stages.builtins.window import Window
from streampipe.stages.runtime import StageRuntime
from streampipe.stages.spec import EdgeSpec, StageSpec
from streampipe.stages.state import load_state
from streampipe.testing import run_stage
from tests.conftest import CLI, PACED_SOURCE, cli, wait_for
from tests.test_window import AGG, MODULE, reference
from tests.test_window import PIPELINE as WINDOWS

HOP = textwrap.dedent('''
    import time


    class Tag:
        """A stateless hop whose finish() waits for the test's word (a file), so the test kills it there."""

        def process(self, batch):
            return [{**r, "hop": 1} for r in batch]

        def finish(self):
            deadline = time.monotonic() + 300      # bounded: a test that failed before its word ends anyway
            while not (self.context.config_dir / "go").exists() and time.monotonic() < deadline:
                self.context.keepalive("finish() waits for the test")
                time.sleep(0.05)
            return []
''')

# test_window's pipeline with a hop whose finish() is slow
PIPELINE = WINDOWS.replace('"clickstream:tag"', '"hop:Tag"').replace("KIND", "tumbling").replace("SHAPE", "size: 0.25")


def log_lines(run_dir: Path, ident: str, needle: str) -> int:
    path = run_dir / "logs" / f"{ident}.jsonl"
    return sum(needle in line for line in path.read_text().splitlines()) if path.exists() else 0


def pids_of(run_dir: Path) -> list[str]:
    """Processes still running with the run directory on their command line, or in it."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and str(run_dir.parent) in " ".join(proc.info["cmdline"] or []) + proc.cwd():
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:160]}")
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(420)
def test_a_finite_stream_closes_every_window_once_and_the_pipeline_ends_through_sigkills_around_the_end(pipeline) -> None:
    count = 20000
    p = pipeline(PIPELINE.replace("COUNT", str(count)))
    for name, text in (("paced", PACED_SOURCE), ("clickstream", MODULE), ("hop", HOP)):
        (p.folder / f"{name}.py").write_text(text)
    proc = subprocess.Popen([*CLI, "up", "--exit-when-done", "--config", str(p.config)], cwd=p.folder,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p.foreground = proc
    try:
        wait_for(lambda: p.status_or_none() and p.row("per_user", 0)["stats"].get("emitted", 0) > 20, timeout=120,
                 what="windows emitted")
        p.remember()
        os.kill(p.row("per_user", 0)["pid"], signal.SIGKILL)                  # mid-stream
        wait_for(lambda: all(r["state"] == "completed" for r in p.rows("clicks")), timeout=180, what="the source completed")
        # the source has completed: its end of stream is saved by both hops, which are now in finish()
        wait_for(lambda: log_lines(p.run_dir, "tag.0", "input ended") >= 1, timeout=60, what="tag.0 finishing")
        p.remember()
        os.kill(p.row("tag", 0)["pid"], signal.SIGKILL)          # before its end of stream went out
        os.kill(p.row("per_user", 1)["pid"], signal.SIGKILL)     # before it heard any end of stream
        (p.folder / "go").write_text("")
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            p.remember()
    assert proc.returncode == 0, out
    assert "every source completed and every stage ended its stream" in out
    assert pids_of(p.run_dir) == [], "nothing of the pipeline runs on"

    # tag.0 ran finish() again in its next process: it needed the source's end of stream again and had it saved
    assert log_lines(p.run_dir, "tag.0", "input ended") == 2 and log_lines(p.run_dir, "tag.0", "stream ended") == 1
    records = p.output_records("output/records.jsonl")
    assert sorted(Counter(r["id"] for r in records)) == list(range(count))
    expected = reference(records, "tumbling", size=0.25, lateness=3.0, ended=True)
    results = p.output_records("output/windows.jsonl")
    ids = Counter(r["id"] for r in results)
    assert not [i for i, c in ids.items() if c > 1], "a window written twice"
    got = {r["id"]: {k: v for k, v in r.items() if k in ("id", "user", "window_start", "window_end", *AGG)} for r in results}
    assert got == expected
    assert len(expected) > len(reference(records, "tumbling", size=0.25, lateness=3.0)) + 20, \
        "the windows the watermark never passed are there too"


CHAIN = """
pipeline: chain
defaults: {heartbeat_timeout: 60}
stages:
  gen: {type: generator, replicas: 2, options: {count: 3000, rate: 0, seed: 3}}
  a: {type: "chain:double", inputs: [gen]}
  b: {type: "chain:Total", inputs: [a], replicas: 2}
  out: {type: consumer, inputs: [b], options: {output: output/totals.jsonl}}
"""

CHAIN_MODULE = textwrap.dedent('''
    def double(record):
        return {**record, "x2": 2}


    class Total:
        """A user's plain class: counts what it is given, says the total when the input ends."""

        own_ids = True

        def __init__(self):
            self.n = 0

        def process(self, batch):
            self.n += len(batch)
            return []

        def snapshot(self):
            return {"n": self.n}

        def restore(self, state):
            self.n = state.get("n", 0)

        def finish(self):
            return [{"id": self.context.replica, "total": self.n}]
''')


@pytest.mark.timeout(300)
def test_a_chain_of_two_transforms_passes_the_end_on_and_an_ended_replica_killed_needs_it_no_more(pipeline) -> None:
    p = pipeline(CHAIN)
    (p.folder / "chain.py").write_text(CHAIN_MODULE)
    p.up()

    def ended() -> bool:
        return all(r["ended"] for r in p.status()["stages"] if r["name"] != "gen")

    wait_for(lambda: all(r["state"] == "completed" for r in p.rows("gen")) and ended(), timeout=120,
             what="every stage ended its stream")
    totals = p.output_records("output/totals.jsonl")
    assert sorted(r["id"] for r in totals) == [0, 1] and sum(r["total"] for r in totals) == 3000
    assert log_lines(p.run_dir, "a.0", "input ended") == 1 and log_lines(p.run_dir, "b.1", "input ended") == 1

    for stage in ("b", "a"):        # ended: a new process restores that, and runs no finish() again
        old = p.row(stage, 0)["pid"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda stage=stage, old=old: p.row(stage, 0)["pid"] not in (None, old) and p.row(stage, 0)["ended"],
                 timeout=60, what=f"{stage}.0 back, ended")
    assert log_lines(p.run_dir, "b.0", "input ended") == 1 and log_lines(p.run_dir, "a.0", "input ended") == 1
    assert ended()
    p.down()
    assert len(p.output_records("output/totals.jsonl")) == 2


@pytest.mark.timeout(300)
def test_a_completed_source_says_so_again_so_a_replica_added_since_lets_the_next_run_end(tmp_path: Path) -> None:
    """A source that completed in an earlier run sends its end of stream again on the next ``up``:
    after a change 1 -> 2 of its replicas, its new replica (completed from the start) is a sender
    the hop never heard from, and the batch job still ends."""
    config = tmp_path / "services.yaml"
    yaml = ("pipeline: rerun\nstages:\n"
            "  gen: {type: generator, replicas: N, options: {count: 2000, rate: 0, seed: 5}}\n"
            "  hop: {type: 'chain:double', inputs: [gen]}\n"
            "  sink: {type: consumer, inputs: [hop]}\n")
    (tmp_path / "chain.py").write_text(CHAIN_MODULE)
    for replicas in (1, 2):
        config.write_text(yaml.replace("N", str(replicas)))
        proc = cli("up", "--exit-when-done", cwd=tmp_path, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "every stage ended its stream" in proc.stderr
        assert pids_of(tmp_path / ".streampipe") == []
    ids = [json.loads(line)["id"] for line in (tmp_path / ".streampipe" / "output" / "records.jsonl").read_text().splitlines()]
    assert sorted(ids) == list(range(2000))
    assert log_lines(tmp_path / ".streampipe", "gen.1", "say so downstream") == 1


class Counting(Stage):
    """A stateful transform: counts what it takes, says the count when its input ends."""

    def __init__(self) -> None:
        super().__init__()
        self.n, self.finished = 0, 0

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.n += len(batch)
        return []

    def snapshot(self) -> dict[str, Any]:
        return {"n": self.n}

    def restore(self, state: dict[str, Any]) -> None:
        self.n = state.get("n", 0)

    def finish(self) -> list[dict[str, Any]]:
        self.finished += 1
        return [{"id": 0, "total": self.n}]


def test_a_stateful_replica_confirms_an_eos_only_once_it_is_saved_and_finishes_once_every_sender_ended(tmp_path: Path) -> None:
    """In process, real sockets: EOS from one of two senders while a batch of the other is not in
    the saved state yet waits for the save at the ack point that covers it; the second EOS (the
    state at rest) is saved at once; then finish() runs once, its record goes out, and nothing is
    saved between finish() and the end (a crash there finds the state from before finish())."""
    ctx = zmq.Context.instance()
    sup = ctx.socket(zmq.ROUTER)
    sup.bind(f"ipc://{tmp_path}/stages")
    peers = [f"ipc://{tmp_path}/a.up.0", f"ipc://{tmp_path}/a.up.1"]
    spec = StageSpec(name="count", replica=0, replicas=1, type="x:Counting", options={}, run_dir=str(tmp_path),
                     config_dir=str(tmp_path), control=f"ipc://{tmp_path}/stages", input=f"ipc://{tmp_path}/i",
                     ack=f"ipc://{tmp_path}/a", edges=[EdgeSpec("default>sink", "default", "sink", [f"ipc://{tmp_path}/s"])],
                     ack_peers=peers)
    rt = StageRuntime(spec, Counting())
    rt.bind()
    try:
        def msg(sender: int, seq: int, kind: str = "d") -> list[bytes]:
            header = {"k": kind, "src": "up", "r": sender, "e": "default>count", "ep": 5, "seq": seq, "ack": peers[sender]}
            if kind == "eos":
                return [msgpack.packb(header)]
            return [msgpack.packb({**header, "n": 2, "t": 1.0}), msgpack.packb([{"id": seq * 10}, {"id": seq * 10 + 1}])]

        rt.inputs.handle(msg(0, 1))                      # processed, its ack due, not saved yet
        rt.inputs.handle(msg(1, 1, "eos"))
        rt.end_step(1.0)
        assert not rt.ledger.eos_headers and not (tmp_path / "state" / "count.0.msgpack").exists()
        rt.save_at_ack_points(2.0, force=True)           # the save that covers the batch carries the EOS
        saved = load_state(rt.state_path)
        assert saved["eos"] == [peers[1]] and saved["state"] == {"n": 2} and not saved["ended"]
        assert [h["ack"] for h in rt.ledger.eos_headers] == [peers[1]]
        rt.inputs.handle(msg(0, 2, "eos"))               # at rest now: saved at once, then finish()
        rt.end_step(3.0)
        assert load_state(rt.state_path)["eos"] == sorted(peers)
        assert rt.stage.finished == 1 and rt.end is not None and rt.end.finishing and not rt.end.ended
        edge = rt.edges[0]
        assert edge.queued or edge.unacked, "finish()'s record goes out"
        rt.end_step(4.0)
        rt.save_state()                                  # a clean stop now saves nothing: finish() runs again next time
        assert rt.stage.finished == 1 and load_state(rt.state_path)["state"] == {"n": 2}
        assert not load_state(rt.state_path)["ended"]
    finally:
        rt.close()
        sup.close(linger=0)


def test_run_stage_ends_the_input_when_asked_and_a_window_closes_its_last_windows() -> None:
    batches = [[{"user": "a", "t": 1, "amount": 2.0}, {"user": "b", "t": 3, "amount": 1.0}], [{"user": "a", "t": 12, "amount": 1.0}]]
    make = lambda: Window(time="t", key="user", size=10, aggregate={"n": "count"})   # noqa: E731
    open_ended = run_stage(make(), batches)
    assert [(r["user"], r["window_start"], r["n"]) for r in open_ended.records] == [("a", 0, 1), ("b", 0, 1)]
    ended = run_stage(make(), batches, finish=True)
    assert [(r["user"], r["window_start"], r["n"]) for r in ended.records] == [("a", 0, 1), ("b", 0, 1), ("a", 10, 1)]
