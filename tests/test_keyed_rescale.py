"""Keyed state moves with its keys when a stage partitioned by key changes its replica count.

A ``window`` with 2 replicas partitioned by key is SIGKILLed, scaled to 3 mid-stream with
``streampipe scale`` (every replica drained, its open windows re-dealt by key group, the senders'
held batches cut again for 3), and SIGKILLed again: every window must equal the brute-force
reference and arrive once. A user's stage with ``keyed_state = True`` keeps per-key counts in
``context.state`` through the same: its final count per key is exact. In-process, the re-deal
itself (:func:`stages.repartition.rescale`) gives every new replica exactly its keys and the
union of the ids the old ones applied.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streampipe.stages.builtins.window import Window
from streampipe.stages.keys import replica_of_key
from streampipe.stages.repartition import Refused, rescale
from streampipe.stages.seen import SeenByOrigin
from tests.conftest import PACED_SOURCE, cli, wait_for
from tests.test_window import MODULE, assert_each_window_once, expected_windows
from tests.test_window import PIPELINE as WINDOW_PIPELINE

# test_window's pipeline (a source, a stateless hop with 2 replicas, the window with 2 replicas
# partitioned by key, sinks), and a user's keyed counter beside the window
PIPELINE = (WINDOW_PIPELINE + """
  counts:
    type: "clickstream:PerUser"
    inputs: [tag]
    replicas: 2
    partition: key
    key: user
  totals: {type: consumer, inputs: [counts], options: {output: output/counts.jsonl}}
  too_late: {type: consumer, inputs: [per_user.late], options: {output: output/late.jsonl}}
""").replace("clickstream:Clicks", "clickstream:LateClicks")

USER_STAGE = '''

class LateClicks(Clicks):
    """Clicks, and every 997th one 50 s of event time late (far beyond the lateness): late wherever it lands."""

    def record(self, i):
        r = super().record(i)
        return {**r, "t": r["t"] - 50, "too_late": True} if i % 997 == 500 else r

def tag(record):                     # a stateless hop with 2 replicas: the window's input interleaves
    return {**record, "hop": 1}


class PerUser:
    """A user's keyed state: a running count per user, kept by the runtime (keyed_state)."""
    keyed_state = True

    def process(self, batch):
        out = []
        for r in batch:
            n = self.context.state.get(r["user"], 0) + 1
            self.context.state[r["user"]] = n
            out.append({"id": r["id"], "user": r["user"], "n": n})
        return out
'''


def scale(p: Any, stage: str, n: int) -> None:
    cli("scale", stage, str(n), "--config", str(p.config), cwd=p.folder, timeout=240, check=True)


def kill(p: Any, stage: str, index: int, kills: int) -> None:
    row = wait_for(lambda: (r := p.row(stage, index)) and r["state"] == "running" and r.get("pid") and r, timeout=90,
                   what=f"{stage}.{index} running")
    os.kill(row["pid"], signal.SIGKILL)
    wait_for(lambda: p.row(stage, index)["state"] == "running" and p.row(stage, index)["restarts"] >= kills,
             timeout=90, what=f"{stage}.{index} restarted")


@pytest.mark.timeout(420)
@pytest.mark.parametrize("kind,shape", [("tumbling", "size: 0.25"), ("sliding", "size: 0.5, slide: 0.25"),
                                        ("session", "gap: 0.2")], ids=["tumbling", "sliding", "session"])
def test_a_keyed_window_scaled_2_to_3_mid_stream_through_sigkills_emits_each_window_once_exactly(
        pipeline, kind: str, shape: str) -> None:
    count = 90000
    p = pipeline(PIPELINE.replace("COUNT", str(count)).replace("KIND", kind).replace("SHAPE", shape))
    (p.folder / "paced.py").write_text(PACED_SOURCE)
    (p.folder / "clickstream.py").write_text(MODULE + textwrap.dedent(USER_STAGE))
    p.up()
    wait_for(lambda: p.row("per_user", 0)["stats"].get("emitted", 0) > 20, timeout=90, what="windows emitted")
    kill(p, "per_user", 0, 1)
    kill(p, "counts", 1, 1)
    seen_before = len(p.output_records("output/records.jsonl"))
    scale(p, "per_user", 3)
    scale(p, "counts", 3)
    assert len(p.output_records("output/records.jsonl")) < count, "the stream ended before the rescale"
    assert [r["replica"] for r in p.rows("per_user")] == [0, 1, 2]
    wait_for(lambda: p.row("per_user", 2)["stats"].get("emitted", 0) > 5, timeout=90, what="the new replica emits")
    kill(p, "per_user", 2, 1)
    kill(p, "counts", 0, 1)
    wait_for(lambda: p.row("clicks")["state"] == "completed", timeout=180, what="the source completed")
    wait_for(lambda: len(p.output_records("output/records.jsonl")) == count, timeout=120, what="every record seen")

    records = p.output_records("output/records.jsonl")
    assert seen_before < count
    expected = expected_windows(p, kind, replicas=3)     # the keys as the final 3 replicas own them
    wait_for(lambda: len(p.output_records("output/counts.jsonl")) >= count, timeout=120, what="every count")
    designed = {i for i in range(count) if i % 997 == 500}
    wait_for(lambda: len(p.output_records("output/late.jsonl")) >= len(designed), timeout=120, what="the late records")
    late = sum(p.row("per_user", i)["stats"].get("late", 0) for i in range(3))
    events = p.events("scale")
    p.down()
    too_late = p.output_records("output/late.jsonl")
    assert sorted(r["id"] for r in too_late) == sorted(designed), "the late output holds the late records, once each"
    assert late == len(designed), late          # and no other record was late, whatever the kills and the rescale
    assert_each_window_once(p.output_records("output/windows.jsonl"), expected, 0)
    assert any("keyed state re-dealt" in e.get("reason", "") for e in events), events

    # the user's keyed counts: every record once, the last count per user the number of its records
    counts = p.output_records("output/counts.jsonl")
    assert len(counts) == count and len({r["id"] for r in counts}) == count
    final: dict[str, int] = {}
    for r in counts:
        final[r["user"]] = max(final.get(r["user"], 0), r["n"])
    assert final == dict(Counter(r["user"] for r in records))
    # (a count re-made after a kill may fall on another record of its user, the resent batches
    # interleaving otherwise: each record's first count stands at the sink, the totals are exact)


def test_the_re_deal_gives_each_new_replica_exactly_its_keys_and_every_applied_id(tmp_path: Path) -> None:
    old = []
    for r in range(2):
        w = Window(time="t", key="k", size=10)
        w.process([{"k": f"u{i}", "t": i % 7} for i in range(40) if replica_of_key(f"u{i}", 2) == r])
        ids = SeenByOrigin()
        ids.of("src|gen.0/0").add_many(range(r, 40, 2))
        old.append({"state": w.snapshot(), "ids": ids.state(), "acked": [["tcp://a", "e", 1, 5 + r]],
                    "eos": ["tcp://done", "tcp://half"] if r == 0 else ["tcp://done"],
                    "keyed": [[f"u{i}", i] for i in range(40) if replica_of_key(f"u{i}", 2) == r]})
    new = rescale("w", "window", tmp_path, old, 3)
    assert len(new) == 3
    for i, entry in enumerate(new):
        keys = {w[0] for w in entry["state"]["windows"]}
        assert keys and all(replica_of_key(k, 3) == i for k in keys)
        assert all(replica_of_key(k, 3) == i for k, _ in entry["keyed"])
        held = SeenByOrigin.from_state(entry["ids"]).of("src|gen.0/0")
        assert all(j in held for j in range(40)) and 40 not in held
        assert sorted(entry["acked"]) == [["tcp://a", "e", 1, 5], ["tcp://a", "e", 1, 6]]
        assert entry["eos"] == ["tcp://done"]        # the end of stream every old replica had
    assert sorted(k for e in new for k, _ in e["keyed"]) == sorted(f"u{i}" for i in range(40))
    assert sum(len(e["state"]["windows"]) for e in new) == sum(len(o["state"]["windows"]) for o in old)


def test_a_keyed_stage_whose_state_cannot_be_re_dealt_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("class Count:\n    def process(self, b):\n        return b\n"
                                      "    def snapshot(self):\n        return {'n': 1}\n")
    with pytest.raises(Refused, match="rescale"):
        rescale("count", "mine:Count", tmp_path, [{"state": {"n": 1}}, {"state": {"n": 2}}], 3)
    assert len(rescale("count", "mine:Count", tmp_path, [{"state": {}}, {}], 3)) == 3   # nothing to deal


COUNTER_PIPELINE = """
pipeline: keyed-between-runs
defaults: {heartbeat_timeout: 60, ack_timeout: 0.5}
stages:
  clicks: {type: "clickstream:Clicks", options: {count: COUNT, rate: 3000}}
  tag: {type: "clickstream:tag", inputs: [clicks]}
  counts:
    type: "clickstream:PerUser"
    inputs: [tag]
    replicas: REPLICAS
    partition: key
    key: user
  totals: {type: consumer, inputs: [counts], options: {output: output/counts.jsonl}}
"""


@pytest.mark.timeout(300)
def test_keyed_state_is_re_dealt_when_the_replica_count_changes_between_runs(pipeline) -> None:
    count = 30000
    p = pipeline(COUNTER_PIPELINE.replace("COUNT", str(count)).replace("REPLICAS", "2"))
    (p.folder / "paced.py").write_text(PACED_SOURCE)
    (p.folder / "clickstream.py").write_text(MODULE + textwrap.dedent(USER_STAGE))
    p.up()
    wait_for(lambda: len(p.output_records("output/counts.jsonl")) > 3000, timeout=90, what="counts flowing")
    p.down()
    assert len(p.output_records("output/counts.jsonl")) < count, "the stream ended before the change"
    p.config.write_text(COUNTER_PIPELINE.replace("COUNT", str(count)).replace("REPLICAS", "3"))
    p.up()
    wait_for(lambda: len(p.output_records("output/counts.jsonl")) >= count, timeout=120, what="every count")
    events = p.events("repartition")
    p.down()
    counts = p.output_records("output/counts.jsonl")
    assert len({r["id"] for r in counts}) == count
    final: dict[str, int] = {}
    for r in counts:
        final[r["user"]] = max(final.get(r["user"], 0), r["n"])
    assert final == {f"u{u}": count // 40 for u in range(40)}      # 40 users, ids spread evenly
    assert any("re-dealt to 3" in e["reason"] for e in events), events


def test_run_stage_refuses_keyed_state_saved_for_another_replica_count(tmp_path: Path) -> None:
    from streampipe.stages.runtime.bootstrap import transform_restore_point
    from streampipe.stages.spec import StageSpec
    from streampipe.stages.state import save_state

    save_state(tmp_path / "state" / "counts.0.msgpack", {"state": {}, "keyed": [["u1", 3]], "replicas": 2})
    spec = StageSpec(name="counts", replica=0, replicas=3, type="x:C", options={}, run_dir=str(tmp_path),
                     config_dir=str(tmp_path), control="", input=None, ack="", keyed=True)
    with pytest.raises(RuntimeError, match="for 2 replicas, not 3"):
        transform_restore_point(spec)
    spec.keyed = False              # partition: load: each replica's state is its own, as before
    assert transform_restore_point(spec) == {"state": {}, "keyed": [["u1", 3]], "replicas": 2}
