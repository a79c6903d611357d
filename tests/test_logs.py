"""``streampipe logs``: merged order, --level, --since, --json, -f, and --summary, on real files."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

from loguru import logger
from rich.console import Console

from streampipe.launcher.logs import parse_since, show_logs, show_summary
from streampipe.stages.api import StageContext
from streampipe.stages.builtins.log_extractor import LogExtractor

DEADLINE_S = 10.0
T0 = 1_760_000_000.0     # a fixed epoch time for the records, so order and --since are exact


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=300, color_system=None, force_terminal=False), buf


def _write(path: Path, stage: str, replica: int | None, records: list[tuple[float, str, str]]) -> None:
    """Append loguru-serialised records (time, level, message) to ``path``, times set exactly."""
    tmp = path.with_name(path.name + ".tmp")
    token = f"{stage}-{replica}-{time.monotonic_ns()}"
    sink = logger.add(tmp, serialize=True, level="TRACE", filter=lambda r: r["extra"].get("token") == token)
    log = logger.bind(token=token, stage=stage, **({"replica": replica} if replica is not None else {}))
    for _, level, message in records:
        log.log(level, message)
    logger.remove(sink)
    lines = tmp.read_text().splitlines()
    tmp.unlink()
    with open(path, "a") as f:
        for line, (t, _, _) in zip(lines, records, strict=True):
            obj = json.loads(line)
            obj["record"]["time"]["timestamp"] = t
            f.write(json.dumps(obj) + "\n")


def _run_dir(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    logs.mkdir()
    _write(logs / "generator.0.jsonl", "generator", 0, [(T0 + 1, "INFO", "gen one"), (T0 + 4, "WARNING", "gen slow")])
    _write(logs / "normalizer.0.jsonl", "normalizer", 0, [(T0 + 2, "DEBUG", "norm one"), (T0 + 5, "ERROR", "norm bad")])
    _write(logs / "normalizer.1.jsonl", "normalizer", 1, [(T0 + 3, "INFO", "norm1 one")])
    _write(logs / "supervisor.jsonl", "supervisor", None, [(T0 + 0, "INFO", "sup start"), (T0 + 6, "INFO", "sup stop")])
    (logs / "normalizer.0.stderr").write_text("raw line on stderr\n")
    os.utime(logs / "normalizer.0.stderr", (T0 + 7, T0 + 7))
    return tmp_path


def _messages(out: str) -> list[str]:
    return [line.split(" | ", 1)[1].split(None, 2)[2] for line in out.splitlines() if " | " in line]


def test_merged_in_time_order_with_prefixes(tmp_path):
    run = _run_dir(tmp_path)
    console, buf = _console()
    assert show_logs(run, console=console) == 0
    out = buf.getvalue()
    assert _messages(out) == ["sup start", "gen one", "norm one", "norm1 one", "gen slow", "norm bad", "sup stop",
                              "raw line on stderr"]
    prefixes = [line.split(" | ")[0].strip() for line in out.splitlines()]
    assert prefixes == ["supervisor", "generator.0", "normalizer.0", "normalizer.1", "generator.0", "normalizer.0",
                        "supervisor", "normalizer.0"]
    assert "STDERR" in out.splitlines()[-1]


def test_stage_filter_and_level(tmp_path):
    run = _run_dir(tmp_path)
    console, buf = _console()
    assert show_logs(run, stage="normalizer", level="warning", console=console) == 0
    assert _messages(buf.getvalue()) == ["norm bad", "raw line on stderr"]
    console, buf = _console()
    assert show_logs(run, stage="normalizer.1", console=console) == 0
    assert _messages(buf.getvalue()) == ["norm1 one"]
    console, buf = _console()
    assert show_logs(run, stage="nosuch", console=console) == 1
    assert "no logs for stage 'nosuch'" in buf.getvalue()
    assert "stages with logs: generator, normalizer, supervisor" in " ".join(buf.getvalue().split())


def test_tail_and_grep(tmp_path):
    run = _run_dir(tmp_path)
    console, buf = _console()
    assert show_logs(run, tail_n=3, console=console) == 0
    assert _messages(buf.getvalue()) == ["norm bad", "sup stop", "raw line on stderr"]
    console, buf = _console()
    assert show_logs(run, grep=r"^norm", tail_n=2, console=console) == 0
    assert _messages(buf.getvalue()) == ["norm1 one", "norm bad"]
    console, buf = _console()
    assert show_logs(run, tail_n=0, console=console) == 0 and _messages(buf.getvalue()) == []
    for bad in ({"grep": "("}, {"tail_n": -1}):
        console, buf = _console()
        assert show_logs(run, console=console, **bad) == 2, bad   # type: ignore[arg-type]


def test_since(tmp_path):
    run = _run_dir(tmp_path)
    console, buf = _console()
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T0 + 4))
    assert show_logs(run, since=iso, console=console) == 0
    assert _messages(buf.getvalue()) == ["gen slow", "norm bad", "sup stop", "raw line on stderr"]
    assert parse_since("5m", now=1000.0) == 700.0 and parse_since("1d", now=86400.0) == 0.0
    console, buf = _console()
    assert show_logs(run, since="yesterday-ish", console=console) == 2


def test_json_lines(tmp_path):
    run = _run_dir(tmp_path)
    logger_sink = run / "logs" / "trainer.0.jsonl"
    token = "json-exc"
    sink = logger.add(logger_sink, serialize=True, filter=lambda r: r["extra"].get("token") == token)
    try:
        raise ValueError("broken batch")
    except ValueError:
        logger.bind(token=token, stage="trainer", replica=0).exception("fit failed")
    logger.remove(sink)
    console, buf = _console()
    assert show_logs(run, as_json=True, console=console) == 0
    objs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(objs) == 9
    assert all({"time", "stage", "replica", "level", "message"} <= set(o) for o in objs)
    assert objs[0] == {**objs[0], "stage": "supervisor", "replica": None, "level": "INFO", "message": "sup start"}
    (exc,) = [o for o in objs if "exception" in o]
    assert exc["exception"]["type"] == "ValueError" and "broken batch" in exc["exception"]["traceback"]


def test_follow_picks_up_new_lines_and_rotation(tmp_path):
    run = _run_dir(tmp_path)
    console, buf = _console()
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(show_logs(run, follow=True, console=console, stop=stop)))
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "raw line on stderr" not in buf.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        _write(run / "logs" / "generator.0.jsonl", "generator", 0, [(time.time(), "INFO", "appended later")])
        os.rename(run / "logs" / "generator.0.jsonl", run / "logs" / "generator.0.2025-01-31_12-00-00_000001.jsonl")
        _write(run / "logs" / "generator.0.jsonl", "generator", 0, [(time.time(), "INFO", "after rotation")])
        _write(run / "logs" / "consumer.0.jsonl", "consumer", 0, [(time.time(), "INFO", "a new stage")])
        while "a new stage" not in buf.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive() and codes == [0]
    messages = _messages(buf.getvalue())
    assert messages[:8] == ["sup start", "gen one", "norm one", "norm1 one", "gen slow", "norm bad", "sup stop",
                            "raw line on stderr"]
    assert sorted(messages[8:]) == ["a new stage", "after rotation", "appended later"]
    assert messages.index("appended later") < messages.index("after rotation")


def test_no_logs(tmp_path):
    console, buf = _console()
    assert show_logs(tmp_path, console=console) == 1
    assert len(buf.getvalue().strip().splitlines()) == 1


def test_summary_table(tmp_path):
    run = _run_dir(tmp_path)
    console, buf = _console()
    assert show_summary(run, console=console) == 1             # no extractor ran yet
    ex = LogExtractor()
    ex.context = StageContext(name="logfacts", run_dir=run)
    ex.setup()
    ex.poll_once(now=time.time() + 3600)
    ex.teardown()
    console, buf = _console()
    assert show_summary(run, console=console) == 0
    out = buf.getvalue()
    for stage in ("generator", "normalizer", "supervisor"):
        assert stage in out
    row = next(line for line in out.splitlines() if "normalizer" in line)
    assert "33.33%" in row                                      # 1 error in 3 lines
    console, buf = _console()
    assert show_summary(run, console=console, as_json=True) == 0
    assert json.loads(buf.getvalue())["stages"]["normalizer"]["errors"] == 1
