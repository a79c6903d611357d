"""Bounded disk: size-rotated files with several writer processes, a process's own stderr, the
events log read across rotation, dead letters counted when retention deletes them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from streampipe._logtail import follow_file, stream_of
from streampipe._rotating import RotatingFile, files_of, rotate_stdio, rotated_files
from streampipe.monitor.events import EventLog, read_events
from streampipe.stages.state import DeadLetters

WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from streampipe._rotating import RotatingFile
    dropped = []
    f = RotatingFile(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), on_drop=dropped.append)
    for i in range(int(sys.argv[5])):
        f.write(json.dumps({"w": sys.argv[4], "i": i, "pad": "x" * 50}) + "\\n")
    print(sum(dropped))
""")


def run_writers(path: Path, max_bytes: int, keep: int, writers: int = 4, lines: int = 1500) -> int:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(max_bytes), str(keep), str(w), str(lines)],
                              stdout=subprocess.PIPE, text=True) for w in range(writers)]
    dropped = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        dropped += int(out)
    return dropped


def lines_of(path: Path) -> list[dict]:
    rows = []
    for name in files_of(path):
        for line in name.read_text().splitlines():
            rows.append(json.loads(line))     # a torn or interleaved line would not parse
    return rows


def test_several_writers_rotate_one_file_and_lose_no_line(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    dropped = run_writers(path, max_bytes=8192, keep=10_000)
    rows = lines_of(path)
    assert dropped == 0
    assert sorted((r["w"], r["i"]) for r in rows) == sorted((str(w), i) for w in range(4) for i in range(1500))
    rotated = rotated_files(path)
    assert len(rotated) > 20 and all(stream_of(p) == "dead.jsonl" for p in rotated)
    # every file stays near the limit: one line past it at most per writer
    assert max(p.stat().st_size for p in files_of(path)) < 8192 + 4 * 200


def test_retention_keeps_few_files_and_counts_what_it_deleted(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    dropped = run_writers(path, max_bytes=8192, keep=2)
    assert len(rotated_files(path)) == 2
    assert dropped > 0 and len(lines_of(path)) + dropped == 4 * 1500


def test_dead_letters_count_what_retention_dropped(tmp_path: Path) -> None:
    dead = DeadLetters(tmp_path / "deadletter" / "s.jsonl", "s.0", max_bytes=2048, keep=1)
    for i in range(300):
        dead.write({"id": i}, "bad record")
    dead.close()
    kept = lines_of(tmp_path / "deadletter" / "s.jsonl")
    assert dead.dropped > 0 and len(kept) + dead.dropped == 300
    assert [r["record"]["id"] for r in kept] == list(range(dead.dropped, 300))


def test_events_rotate_and_are_read_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=4096, retention=100)
    for i in range(300):
        log.emit("start", "gen", 0, 1000 + i, reason=f"start {i}")
    log.close()
    assert len(rotated_files(path)) > 5
    assert [e["pid"] for e in read_events(path)] == [1000 + i for i in range(300)]
    with follow_file(path) as tail:     # what `streampipe events` reads
        assert [json.loads(line.text)["pid"] for line in tail.poll()] == [1000 + i for i in range(300)]


STDIO = textwrap.dedent("""
    import sys
    from pathlib import Path
    from streampipe._rotating import rotate_stdio
    path = Path(sys.argv[1])
    rotations = 0
    for i in range(3000):
        print(f"out {i}", flush=True)
        print(f"err {i}", file=sys.stderr, flush=True)
        rotations += rotate_stdio(path, 4096, 1000)
    sys.stderr.write(f"rotations {rotations}\\n")
""")


def test_a_process_rotates_its_own_stderr_without_losing_a_line(tmp_path: Path) -> None:
    path = tmp_path / "stage.0.stderr"
    with open(path, "ab") as f:
        subprocess.run([sys.executable, "-c", STDIO, str(path)], stdout=f, stderr=subprocess.STDOUT, timeout=120, check=True)
    lines = [line for p in files_of(path) for line in p.read_text().splitlines()]
    rotations = int(lines[-1].split()[1])
    assert rotations > 10 and len(rotated_files(path)) == rotations
    assert lines[:-1] == [f"{kind} {i}" for i in range(3000) for kind in ("out", "err")]
    assert not rotate_stdio(path, 1, 1)   # our own stderr is not that file: nothing to do


def test_rotating_file_reopens_after_another_writer_rotated(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    a, b = RotatingFile(path, 100, 10), RotatingFile(path, 100, 10)
    a.write("a" * 120 + "\n")
    b.write("b1\n")       # a's file is full: b rotates it and writes to a new one
    a.write("a2\n")       # a sees the name lead elsewhere and follows
    a.close()
    b.close()
    assert path.read_text() == "b1\na2\n" and rotated_files(path)[0].read_text() == "a" * 120 + "\n"
