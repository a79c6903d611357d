"""``streampipe deadletter list|replay``: a stage's dead letters, listed, then replayed into the
running pipeline once its code is fixed, each record held once by the sink, through a SIGKILL of
the stage mid-replay, a replay run again, and one whose marks were lost.

The user's stage ``Picky`` rejects (raises on) every id ending in 3 until a file ``fixed``
appears beside the config (the fix, picked up live); fixed, it still fails ids 23, 63, 103, ...
(``id % 40 == 23``, a new reason), and holds an id of 100 or more ending in 3 until a file ``go``
appears: the test kills the stage there, midway through the replay, with records replayed at the
sink and not yet marked replayed, so the next replay sends them again and the sink must drop them.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from streampipe.stages.state import ReplayLedger, load_state, pending_replays, read_dead_letters
from tests.conftest import Pipeline, alive, cli, ready_pid, wait_for

MODULE = '''
import time

GATE_WAIT_S = 120     # at most: the test creates `go` long before (a bound, so nothing wedges)


class Picky:
    def process(self, batch):
        folder = self.context.config_dir
        fixed = (folder / "fixed").exists()
        out = []
        for r in batch:
            if r["id"] % 10 == 3:
                if not fixed:
                    raise ValueError(f"id {r['id']} ends in 3")
                if r["id"] % 40 == 23:
                    raise ValueError(f"still broken for {r['id']}")
                if r["id"] >= 100 and not (folder / "go").exists():
                    (folder / f"holding-{r['id']}").touch()       # tells the test where it waits
                    deadline = time.monotonic() + GATE_WAIT_S
                    while not (folder / "go").exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
            out.append(r)
        return out
'''

N = 200
BAD = {i for i in range(N) if i % 10 == 3}
BROKEN = {i for i in BAD if i % 40 == 23}          # 23, 63, 103, 143, 183: fail again after the fix


def config(tmp_path: Path) -> str:
    (tmp_path / "mystages.py").write_text(MODULE)
    return f"""\
        pipeline: dl
        defaults: {{heartbeat_timeout: 120, ack_timeout: 0.5}}
        stages:
          generator: {{type: generator, options: {{count: {N}, rate: 400, seed: 1}}}}
          picky: {{type: "mystages:Picky", inputs: [generator]}}
          consumer: {{type: consumer, inputs: [picky]}}
        """


def once(p: Pipeline) -> dict[int, int]:
    counts: dict[int, int] = {}
    for i in p.output_ids():
        counts[i] = counts.get(i, 0) + 1
    return counts


@pytest.mark.timeout(600)
def test_dead_letters_listed_then_replayed_once_through_a_sigkill(pipeline, tmp_path: Path) -> None:
    p: Pipeline = pipeline(config(tmp_path))
    p.up()
    rd = p.run_dir
    wait_for(lambda: len(read_dead_letters(rd, "picky")) == len(BAD) and len(p.output_ids()) == N - len(BAD),
             timeout=120, what=f"{N - len(BAD)} records at the sink and {len(BAD)} dead letters")

    listed = cli("deadletter", "list", "picky", "--config", str(p.config), check=True)
    assert f"{len(BAD)} dead letters: {len(BAD)} pending" in listed.stdout, listed.stdout
    assert "ends in 3" in listed.stdout and "generator.0" in listed.stdout and "picky.0" in listed.stdout
    assert '"x"' not in listed.stdout and "label" not in listed.stdout, "records are user data: shown on request only"
    rows = [json.loads(line) for line in cli("deadletter", "list", "picky", "--json", "--config", str(p.config),
                                              check=True).stdout.splitlines()]
    assert sorted(r["record"]["id"] for r in rows) == sorted(BAD)
    assert {r["state"] for r in rows} == {"pending"} and {r["input"] for r in rows} == {"generator.0"}
    assert len({r["key"] for r in rows}) == len(BAD)
    shown = cli("deadletter", "list", "picky", "--records", "--config", str(p.config), check=True).stdout
    assert '"id": 13' in shown, shown
    nosuch = cli("deadletter", "list", "pickyy", "--config", str(p.config))
    assert nosuch.returncode == 2 and "stages: generator, picky, consumer" in nosuch.stderr, nosuch.stderr

    # the fix lands (the stage reads it live); the replay goes midway, to the first id it holds
    (tmp_path / "fixed").touch()
    first = {d.key: d.record["id"] for d in pending_replays(rd, "picky")}
    proc = cli("deadletter", "replay", "picky", "--no-wait", "--config", str(p.config), check=True)
    assert f"replaying {len(BAD)} dead letters of picky through picky.0" in proc.stdout, proc.stdout
    # midway: the stage holds id 113 (inside process: its loop reads no ack meanwhile), after it put
    # 3..93 through (their records at the sink, the marks of the last ones not written) and 103 failed again
    early = {i for i in BAD if i < 100} - BROKEN
    holding = tmp_path / "holding-113"
    wait_for(lambda: holding.exists() and early <= set(once(p)), timeout=120, what="the replay up to the gate",
             detail=lambda: f"at the sink: {sorted(set(once(p)) & BAD)}")
    assert any(d.replay_of and d.record["id"] == 103 for d in read_dead_letters(rd, "picky"))
    pid = ready_pid(p, "picky")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)        # midway: holding id 113, the rest of the replay queued behind it
    (tmp_path / "go").touch()
    wait_for(lambda: ready_pid(p, "picky") not in (None, pid) and p.row("picky")["state"] == "running",
             timeout=120, what="picky restarted")

    # run again: what settled is not replayed again, what was in flight is; each failure of the
    # fixed code is dead-lettered again with its new reason (and pending for a later replay)
    again = cli("deadletter", "replay", "picky", "--config", str(p.config), "--timeout", "240")
    assert again.returncode == 0, again.stdout + again.stderr
    counts = once(p)
    assert set(counts) == set(range(N)) - BROKEN and set(counts.values()) == {1}, counts
    letters = read_dead_letters(rd, "picky")
    pending = pending_replays(rd, "picky", letters)
    assert sorted(d.record["id"] for d in pending) == sorted(BROKEN)
    assert all(d.error == f"ValueError: still broken for {d.record['id']}" and d.replay_of for d in pending), pending
    replayed = ReplayLedger(rd, "picky").keys()
    assert all(k in replayed for k, i in first.items() if i not in BROKEN)

    # marks lost (the ledger gone): every dead letter is pending again, the delivered ones' records at the
    # sink already; the supervisor SIGKILLed midway through that replay (the stage holding 113 again)
    ReplayLedger(rd, "picky").path.unlink()
    (tmp_path / "go").unlink()
    holding.unlink()
    assert len(pending_replays(rd, "picky")) == len(BAD)
    cli("deadletter", "replay", "picky", "--no-wait", "--config", str(p.config), check=True)
    wait_for(holding.exists, timeout=120, what="the replay holding 113 again")
    st = p.status()
    pids = [r["pid"] for r in st["stages"] if r["pid"]]
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=30, what="the stages gone with the supervisor")
    (tmp_path / "go").touch()
    p.up()
    again = cli("deadletter", "replay", "picky", "--config", str(p.config), "--timeout", "240")
    assert again.returncode == 0, again.stdout + again.stderr
    assert once(p) == counts, "a replayed record twice at the sink, or one lost"
    # run once more: only the still broken ones are pending, and they fail again
    last = cli("deadletter", "replay", "picky", "--config", str(p.config), "--timeout", "240", check=True).stdout
    assert f"0 delivered, {len(BROKEN)} failed again" in last, last
    assert once(p) == counts


def test_replay_without_a_pipeline_says_so(tmp_path: Path) -> None:
    (tmp_path / "services.yaml").write_text(config(tmp_path))
    dl = tmp_path / ".streampipe" / "deadletter"
    dl.mkdir(parents=True)
    (dl / "picky.jsonl").write_text(json.dumps({"key": "00ab", "time": 1.0, "stage": "picky.0", "error": "boom",
                                                "input": "generator.0", "record": {"id": 3}}) + "\n")
    proc = cli("deadletter", "replay", "picky", "--config", str(tmp_path / "services.yaml"))
    assert proc.returncode == 1 and "no pipeline is running" in proc.stderr, proc.stderr
    listed = cli("deadletter", "list", "picky", "--config", str(tmp_path / "services.yaml"), check=True).stdout
    assert "1 dead letters: 1 pending" in listed and "boom" in listed
    empty = cli("deadletter", "list", "consumer", "--config", str(tmp_path / "services.yaml"), check=True).stdout
    assert "no dead letters of consumer" in empty


COUNTING = '''
class Counting:
    """With state: counts the records it passed on (in its snapshot); rejects ids ending in 3 until `fixed`."""
    def __init__(self):
        self.passed = 0

    def process(self, batch):
        if not (self.context.config_dir / "fixed").exists():
            for r in batch:
                if r["id"] % 10 == 3:
                    raise ValueError(f"id {r['id']} ends in 3")
        self.passed += len(batch)        # after the loop: a batch retried record by record counts each once
        return batch

    def snapshot(self):
        return {"passed": self.passed}

    def restore(self, state):
        self.passed = state["passed"]

    def stats(self):
        return {"passed": self.passed}
'''


@pytest.mark.timeout(300)
def test_a_stage_with_state_applies_each_replayed_record_once(pipeline, tmp_path: Path) -> None:
    (tmp_path / "counting.py").write_text(COUNTING)
    n = 100
    p: Pipeline = pipeline(f"""\
        pipeline: dls
        stages:
          generator: {{type: generator, options: {{count: {n}, rate: 400, seed: 2}}}}
          counting: {{type: "counting:Counting", inputs: [generator]}}
          consumer: {{type: consumer, inputs: [counting]}}
        """)
    p.up()
    bad = {i for i in range(n) if i % 10 == 3}
    wait_for(lambda: len(read_dead_letters(p.run_dir, "counting")) == len(bad) and len(p.output_ids()) == n - len(bad),
             timeout=120, what="the stream through, with its dead letters")
    (tmp_path / "fixed").touch()
    proc = cli("deadletter", "replay", "counting", "--config", str(p.config), "--timeout", "240")
    assert proc.returncode == 0 and f"{len(bad)} delivered, 0 failed again" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(p.output_ids()) == list(range(n))
    # settled only once a saved snapshot covers it: when the replay is done, the count on disk holds each record once
    saved = load_state(p.run_dir / "state" / "counting.0.msgpack")
    assert saved is not None and saved["state"]["passed"] == n, saved
    assert "nothing to replay" in cli("deadletter", "replay", "counting", "--config", str(p.config), check=True).stdout
