"""The log tail (rotation, truncation) and the log extractor's facts, on real files."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from loguru import logger

from streampipe._logtail import LogTail, follow_file, ident_of, stream_of
from streampipe.stages.api import StageContext
from streampipe.stages.builtins.log_extractor import LogExtractor

DEADLINE_S = 10.0


def _sink(path: Path, token: str, **kwargs):
    """A loguru file sink that only takes records bound with ``token`` (tests share the logger)."""
    return logger.add(path, serialize=True, filter=lambda r: r["extra"].get("token") == token, **kwargs)


def _crash_log(logs: Path) -> None:
    """trainer.0 logs an INFO and a ValueError with its traceback, as the runtime does."""
    sink = _sink(logs / "trainer.0.jsonl", "trainer")
    log = logger.bind(token="trainer", stage="trainer", replica=0)
    try:
        log.info("fitted batch latency_ms=12.5")
        try:
            int("not a number")
        except ValueError:
            log.exception("stage crashed")
    finally:
        logger.remove(sink)


def _extractor(run_dir: Path, **options) -> LogExtractor:
    ex = LogExtractor(**options)
    ex.context = StageContext(name="logfacts", replica=0, run_dir=run_dir)
    ex.setup()
    return ex


def test_names_of_rotated_files():
    assert stream_of("trainer.0.2025-01-31_12-00-00_123456.jsonl") == "trainer.0.jsonl"
    assert ident_of("trainer.0.2025-01-31_12-00-00_123456.3.jsonl") == ("trainer", 0, "jsonl")
    assert ident_of("forkserver.stderr") == ("forkserver", None, "stderr")


def test_exception_counted_with_traceback_sample(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    _crash_log(logs)
    ex = _extractor(tmp_path)
    try:
        windows = ex.poll_once(now=time.time() + 3600)
    finally:
        ex.teardown()
    summary = json.loads((tmp_path / "logfacts-summary.json").read_text())
    (fact,) = [f for f in summary["exceptions"] if f["type"] == "ValueError"]
    assert fact["stage"] == "trainer" and fact["count"] == 1
    assert "Traceback (most recent call last)" in fact["sample"]["traceback"]
    assert "int(\"not a number\")" in fact["sample"]["traceback"] or "ValueError" in fact["sample"]["traceback"]
    assert fact["first"] and fact["last"]
    trainer = summary["stages"]["trainer"]
    assert trainer["lines"] == 2 and trainer["errors"] == 1 and trainer["error_rate"] == 0.5
    assert trainer["exceptions"] == {"ValueError": 1}
    assert trainer["metrics"]["latency_ms"]["last"] == 12.5
    assert sum(w["errors"] for w in windows) == 1
    written = [json.loads(line) for line in (tmp_path / "logfacts.jsonl").read_text().splitlines()]
    assert written == windows
    assert ex.stats()["exception_types"] == 1


def test_stderr_traceback_twin_counted_once_and_import_crash_counted(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    _crash_log(logs)
    # the runtime prints the same traceback to stderr after logging it
    (logs / "trainer.0.stderr").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "ValueError: invalid literal for int() with base 10: 'not a number'\n\n")
    # a stage that died at import, before loguru was set up: only stderr knows
    (logs / "enricher.0.stderr").write_text(
        "Traceback (most recent call last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_main\n"
        "  File \"mystages.py\", line 1, in <module>\n    import nothere\n"
        "ModuleNotFoundError: No module named 'nothere'\n")
    ex = _extractor(tmp_path)
    try:
        ex.poll_once(now=time.time() + 3600)
    finally:
        ex.teardown()
    summary = json.loads((tmp_path / "logfacts-summary.json").read_text())
    counts = {(f["stage"], f["type"]): f["count"] for f in summary["exceptions"]}
    assert counts == {("trainer", "ValueError"): 1, ("enricher", "ModuleNotFoundError"): 1}
    assert summary["stages"]["enricher"]["errors"] == 1
    assert summary["stages"]["trainer"]["errors"] == 1
    assert "import nothere" in [f for f in summary["exceptions"] if f["stage"] == "enricher"][0]["sample"]["traceback"]


def test_events_and_drift(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    now = time.time()
    events = [{"time": now, "event": "exit", "stage": "trainer", "replica": 0, "pid": 11, "reason": "exit code 70"},
              {"time": now + 0.1, "event": "restart", "stage": "trainer", "replica": 0, "pid": 12, "reason": "always"}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    sink = _sink(logs / "evaluator.0.jsonl", "eval")
    logger.bind(token="eval", stage="evaluator", replica=0).warning("concept drift detected: accuracy 0.91 -> 0.62")
    logger.remove(sink)
    ex = _extractor(tmp_path, window_s=5)
    try:
        windows = ex.poll_once(now=now + 3600)
    finally:
        ex.teardown()
    summary = json.loads((tmp_path / "logfacts-summary.json").read_text())
    assert summary["stages"]["trainer"]["restarts"] == 1
    assert summary["events"] == {"exit": 1, "restart": 1}
    assert summary["drift"]["count"] == 1 and summary["drift"]["recent"][0]["stage"] == "evaluator"
    assert any(w.get("drift") for w in windows) and any(w.get("events") for w in windows)


def test_restarted_extractor_does_not_count_twice(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    _crash_log(logs)
    ex = _extractor(tmp_path)
    ex.poll_once()
    ex.teardown()
    again = _extractor(tmp_path)
    try:
        again.poll_once()
        assert again.stats()["lines"] == 2
        sink = _sink(logs / "trainer.0.jsonl", "trainer")
        logger.bind(token="trainer", stage="trainer", replica=0).info("one more")
        logger.remove(sink)
        again.poll_once()
        assert again.stats()["lines"] == 3
    finally:
        again.teardown()


def test_generate_yields_none_when_idle_and_window_records(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    _crash_log(logs)
    ex = _extractor(tmp_path, window_s=0.2, lateness_s=0.0, poll_s=0.05)
    got, nones = [], 0
    deadline = time.monotonic() + DEADLINE_S
    try:
        for record in ex.generate():
            if record is None:
                nones += 1
                time.sleep(0.01)
            else:
                got.append(record)
            if (sum(r["lines"] for r in got) >= 2 and nones) or time.monotonic() > deadline:
                break
    finally:
        ex.teardown()
    assert nones > 0
    assert sum(r["lines"] for r in got) == 2
    assert all(r["kind"] == "logfacts" for r in got)


def test_own_log_is_not_read(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    sink = _sink(logs / "logfacts.0.jsonl", "self")
    logger.bind(token="self", stage="logfacts", replica=0).error("the extractor's own line")
    logger.remove(sink)
    ex = _extractor(tmp_path)
    try:
        ex.poll_once(now=time.time() + 3600)
        assert ex.stats()["lines"] == 0
    finally:
        ex.teardown()


# -- the tail ------------------------------------------------------------------------------

def test_tail_reads_every_line_across_rotations(tmp_path):
    path = tmp_path / "gen.0.jsonl"
    n = 1500
    sink = _sink(path, "rot", rotation="4 KB")
    log = logger.bind(token="rot", stage="gen", replica=0)
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(n):
                log.info(f"line {i}")
                if i % 100 == 0:
                    time.sleep(0.005)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    seen: list[int] = []
    with follow_file(path) as tail:
        writer.start()
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            finished = done.is_set()
            for line in tail.read():
                seen.append(int(json.loads(line.text)["record"]["message"].split()[1]))
            if finished:
                break
            time.sleep(0.002)
        writer.join(timeout=DEADLINE_S)
        logger.remove(sink)
        seen += [int(json.loads(line.text)["record"]["message"].split()[1]) for line in tail.read()]
    rotated = [p for p in tmp_path.iterdir() if p.name != path.name]
    assert len(rotated) >= 3, "the test must really rotate"
    assert len(seen) == n
    assert seen == list(range(n))


def test_tail_rotation_between_polls_reads_old_inode_first(tmp_path):
    path = tmp_path / "a.0.jsonl"
    path.write_text("1\n2\n")
    tail = LogTail([tmp_path / "*.jsonl"])
    assert [line.text for line in tail.poll()] == ["1", "2"]
    with open(path, "a") as f:
        f.write("3\n")
    os.rename(path, tmp_path / "a.0.2025-01-31_12-00-00_000001.jsonl")   # as loguru rotates
    path.write_text("4\n")
    os.rename(path, tmp_path / "a.0.2025-01-31_12-00-01_000001.jsonl")   # twice before a poll
    path.write_text("5\n6")                                               # "6" is not complete yet
    assert [line.text for line in tail.poll()] == ["3", "4", "5"]
    with open(path, "a") as f:
        f.write("\n")
    assert [line.text for line in tail.poll()] == ["6"]
    tail.close()


def test_tail_truncation_starts_over(tmp_path):
    path = tmp_path / "a.0.stderr"
    path.write_text("one\ntwo\n")
    tail = LogTail([path])
    assert len(tail.poll()) == 2
    path.write_text("")               # truncated in place (same inode)
    with open(path, "a") as f:
        f.write("x\n")
    assert [line.text for line in tail.poll()] == ["x"]
    tail.close()


def test_tail_positions_resume(tmp_path):
    path = tmp_path / "a.0.jsonl"
    path.write_text("1\n2\n")
    tail = LogTail([path])
    tail.poll()
    saved = tail.positions()
    tail.close()
    with open(path, "a") as f:
        f.write("3\n")
    again = LogTail([path], positions=saved)
    assert [line.text for line in again.poll()] == ["3"]
    again.close()


@pytest.mark.parametrize("idle", [0.0])
def test_tail_closes_idle_rotated_files_without_rereading(tmp_path, idle):
    path = tmp_path / "a.0.jsonl"
    path.write_text("1\n")
    tail = LogTail([tmp_path / "*.jsonl"], idle_close_s=idle)
    tail.poll()
    os.rename(path, tmp_path / "a.0.2025-01-31_12-00-00_000001.jsonl")
    path.write_text("2\n")
    assert [line.text for line in tail.poll()] == ["2"]
    assert len(tail.readers) == 1 and len(tail.closed) == 1
    assert tail.poll() == []
    tail.close()
