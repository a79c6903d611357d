"""The consumer's ``format: parquet``: a folder of part files holding every record once, across
crashes at every step of a checkpoint, in-process and with a real SIGKILL."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from streampipe.stages.api import StageContext  # noqa: E402
from streampipe.stages.builtins import consumer as consumer_module  # noqa: E402 - after the skip
from streampipe.stages.builtins import parquet_parts  # noqa: E402
from streampipe.stages.builtins.consumer import Consumer  # noqa: E402
from streampipe.stages.columns import Columns  # noqa: E402
from streampipe.stages.introspect import option_errors  # noqa: E402
from tests.conftest import Pipeline, ready_pid, wait_for  # noqa: E402


def sink(tmp_path: Path, **options: Any) -> Consumer:
    c = Consumer(output="out", format="parquet", **{"checkpoint_s": 1e9, **options})
    c.context = StageContext(run_dir=tmp_path)
    c.setup()
    return c


def batch(src: str, ids: list[int]) -> Columns:
    """Columns as the normalizer sends them: ``x`` n x 8, ``id``, ``y``, ``t``, plus the source's name."""
    a = np.asarray(ids, dtype=np.int64)
    return Columns({"id": a, "x": np.outer(a, np.ones(8)), "y": a % 2, "t": a * 0.5, "src": [src] * len(a)})


def records(src: str, ids: list[int]) -> list[dict[str, Any]]:
    return batch(src, ids).to_records()


def table(tmp_path: Path) -> Any:
    return pq.read_table(tmp_path / "out")


def counts(tmp_path: Path) -> collections.Counter[tuple[str, int]]:
    t = table(tmp_path)
    return collections.Counter(zip(t.column("src").to_pylist(), t.column("id").to_pylist()))


def crash(c: Consumer, torn: int = 0) -> None:
    """What a SIGKILL leaves: the files as they are (``torn`` bytes cut off the staging file's end), no checkpoint."""
    parts = c._parts
    assert parts is not None
    staging = parts.staging_path(parts.next)
    kept = staging.read_bytes() if staging.exists() else None
    parts.close()                         # closing writes an end-of-stream marker a SIGKILL would not
    if kept is not None:
        staging.write_bytes(kept[:len(kept) - torn])


def test_parts_hold_every_record_once(tmp_path: Path) -> None:
    c = sink(tmp_path)
    c.on_origin("a.0/0", None)
    c.process(batch("a", [0, 1, 2, 3]))
    c.process(batch("a", [2, 3, 4]))                    # redelivered in part: 2 and 3 are duplicates
    c.on_origin("b.0/0", None)
    c.process(batch("b", [0, 1, 2]))                    # another origin's ids: not duplicates
    c.process(batch("b", [1, 2]))                       # all duplicates: nothing staged
    assert c._parts is not None and len(parquet_parts.read_staging(c._parts.staging_path(0))) == 3
    c.checkpoint()
    c.process(records("b", [2, 3]) + [{"id": 9, "src": "b", "x": "no vector", "y": 0, "t": 0.0}])
    c.on_origin("a.0/0", None)
    c.process(records("a", [4, 5]))
    c.teardown()
    assert counts(tmp_path) == {**{("a", i): 1 for i in range(6)}, **{("b", i): 1 for i in range(4)}}
    assert [(rec["id"], "Parquet" in why) for rec, why, _ in c.take_rejected()] == [(9, True)]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["part-000000.parquet", "part-000001.parquet"], "one part per checkpoint, nothing else in the folder"
    t = table(tmp_path)
    assert t.schema.field("x").type == pa.list_(pa.float64(), 8) and t.schema.field("id").type == pa.int64()
    assert t.column("x").to_pylist()[4] == [4.0] * 8
    stats = c.stats()
    assert stats["written"] == 10 and stats["duplicates_dropped"] == 6 and stats["labels"] == {"0": 5, "1": 5}
    assert stats["dedup_origins"] == 2


def test_pandas_reads_the_folder(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    c = sink(tmp_path)
    c.process(batch("a", [0, 1]))
    c.teardown()
    df = pd.read_parquet(tmp_path / "out")
    assert list(df.columns) == ["id", "x", "y", "t", "src"] and df["id"].tolist() == [0, 1] and list(df["x"][1]) == [1.0] * 8


class Crashed(Exception):
    pass


def boom(*args: Any, **kwargs: Any) -> None:
    raise Crashed


STEPS = ["staged", "torn", "temp left", "renamed", "saved", "recovered"]


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_neither_loses_nor_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Two origins, a checkpoint, more batches, a crash at ``step``; then upstream resends every
    batch it has no ack for (here: all of them, a superset) and the folder holds each record once."""
    sent: list[tuple[str, Columns | list[dict[str, Any]]]] = []
    c = sink(tmp_path)

    def send(consumer: Consumer, origin: str, b: Any) -> None:
        consumer.on_origin(origin, None)
        consumer.process(b)

    for origin, b in [("a.0/0", batch("a", [0, 1, 2])), ("b.0/0", records("b", [0, 1])), ("a.0/0", batch("a", [3, 4]))]:
        sent.append((origin, b))
        send(c, origin, b)
    c.checkpoint()
    for origin, b in [("b.0/0", batch("b", [2, 3, 4])), ("a.0/0", records("a", [5, 6])), ("b.0/0", batch("b", [5]))]:
        sent.append((origin, b))
        send(c, origin, b)
    parts = c._parts
    assert parts is not None
    if step == "staged":
        crash(c)
    elif step == "torn":
        crash(c, torn=40)                  # the last batch (b's 5) half written: never acknowledged
    elif step == "temp left":
        crash(c)
        (tmp_path / "out" / f".{parts.part_path(1).name}.x1y2.tmp").write_bytes(b"PAR1 half a part")
    elif step == "renamed":                # the part is in the folder, the state does not count it
        monkeypatch.setattr(consumer_module, "save_state", boom)
        with pytest.raises(Crashed):
            c.checkpoint()
        monkeypatch.undo()
        assert parts.part_path(1).exists() and parts.staging_path(1).exists()
    elif step == "saved":                  # the state counts the part, its staging file is still there
        monkeypatch.setattr(parquet_parts.Parts, "drop_stale", boom)
        with pytest.raises(Crashed):
            c.checkpoint()
        monkeypatch.undo()
        assert parts.staging_path(1).exists()
    elif step == "recovered":              # killed again while recovering: the staging file is a part, the state is old
        crash(c)
        monkeypatch.setattr(consumer_module, "save_state", boom)
        with pytest.raises(Crashed):
            sink(tmp_path)
        monkeypatch.undo()
        assert (tmp_path / "out" / "part-000001.parquet").exists()
    again = sink(tmp_path)
    assert not list((tmp_path / "out").glob(".*")), "a temp file was left"
    for origin, b in sent:
        send(again, origin, b)
    send(again, "a.0/0", records("a", [7]))
    again.teardown()
    expected = {**{("a", i): 1 for i in range(8)}, **{("b", i): 1 for i in range(6)}}
    assert counts(tmp_path) == expected
    assert again.stats()["written"] == len(expected)
    assert again.stats()["labels"] == {"0": 7, "1": 7}
    assert not list((tmp_path / "state").glob("*.arrows")), "staging files are dropped once their part is saved"


def test_a_new_schema_starts_a_new_part(tmp_path: Path) -> None:
    c = sink(tmp_path)
    c.process([{"id": 0, "y": 1}])
    c.process([{"id": 1, "y": 2.5}])            # a float: int64 cannot hold it
    c.process([{"id": 2}])                      # a missing field: null in the same part
    c.teardown()
    first = pq.read_table(tmp_path / "out" / "part-000000.parquet")
    second = pq.read_table(tmp_path / "out" / "part-000001.parquet")
    assert first.column("id").to_pylist() == [0] and second.to_pylist() == [{"id": 1, "y": 2.5}, {"id": 2, "y": None}]


def test_validate_accepts_parquet(tmp_path: Path) -> None:
    from streampipe.launcher.config import load_config

    cfg = tmp_path / "services.yaml"
    cfg.write_text("stages:\n  gen: {type: generator, options: {count: 10}}\n"
                   "  sink: {type: consumer, inputs: [gen], options: {format: parquet}}\n")
    assert load_config(cfg).stages["sink"].options == {"format": "parquet"}


def test_validate_refuses_parquet_without_pyarrow(monkeypatch: pytest.MonkeyPatch) -> None:
    assert option_errors(Consumer, {"format": "parquet"}) == []
    real = consumer_module.importlib.util.find_spec
    monkeypatch.setattr(consumer_module.importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    [(key, message)] = option_errors(Consumer, {"format": "parquet", "output": "out"})
    assert key == "format" and "pip install 'streampipe[parquet]'" in message
    assert option_errors(Consumer, {"format": "jsonl"}) == []
    assert option_errors(Consumer, {"format": "csv"})[0][0] == "format"


PIPELINE = """\
pipeline: parquet
delivery: at-least-once
defaults:
  restart: always
  ack_timeout: 0.2
  backoff_initial: 0
  backoff_max: 0.1
  min_uptime: 0.1
  linger_ms: 5
stages:
  generator: {type: generator, options: {count: 3000, rate: 500, seed: 3}}
  normalizer: {type: normalizer, inputs: [generator]}
  consumer:                  # a part file every 0.2 s
    type: consumer
    inputs: [normalizer]
    options: {format: parquet, output: output/records, checkpoint_s: 0.2}
"""


def folder_ids(p: Pipeline) -> list[int]:
    folder = p.run_dir / "output" / "records"
    if not any(folder.glob("*.parquet")):
        return []
    return pq.read_table(folder, columns=["id"]).column("id").to_pylist()


def test_a_killed_parquet_sink_writes_every_record_once(pipeline: Any) -> None:
    n = 3000
    p = pipeline(PIPELINE)
    p.up()
    victim = wait_for(lambda: ready_pid(p, "consumer"), timeout=60, what="the consumer running")
    wait_for(lambda: len(folder_ids(p)) >= 300, timeout=60, what="parts in the folder")
    os.kill(victim, signal.SIGKILL)      # mid-stream: staged rows, maybe a part half written
    wait_for(lambda: (pid := ready_pid(p, "consumer")) and pid != victim, timeout=60, what="the consumer restarted")
    wait_for(lambda: p.row("generator")["state"] == "completed", timeout=90, what="the generator completed")
    wait_for(lambda: (p.row("consumer")["stats"] or {}).get("written", 0) >= n, timeout=60, what=f"{n} records written")
    time.sleep(0.5)                      # a resend still in flight would land now
    p.down()
    counts = collections.Counter(folder_ids(p))
    assert sorted(counts) == list(range(n)), f"lost: {sorted(set(range(n)) - set(counts))[:20]}"
    dups = {i: k for i, k in counts.items() if k > 1}
    assert not dups, f"duplicated: {list(dups.items())[:20]}"
    assert not list((p.run_dir / "state").glob("*.arrows")), "the clean stop sealed the last part"
