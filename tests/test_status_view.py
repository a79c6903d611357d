"""``streampipe status`` fits the terminal, and ``streampipe top`` shows it live (issue 26).

The table is rendered from a real running pipeline's status at 80, 120 and 200 columns: every
stage name and every number shown is whole (never ``…``), each line fits the width, the compact
columns are there at 80, and a user stage's own ``stats()`` appear in the info column once there
is room. ``top`` runs in a real pseudo-terminal of 80 columns and is stopped with Ctrl-C typed
on it, or after ``--iterations``.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from rich.console import Console

from streampipe.launcher.statusview import COLUMNS, fitted_columns, print_status
from tests.conftest import CLI, cli, wait_for

MYSTAGES = '''
from streampipe import Stage


class Tally(Stage):
    """A user's stage with its own figures in stats()."""

    def setup(self):
        self.seen = 0
        self.odd = 0

    def process(self, batch):
        self.seen += len(batch)
        self.odd += sum(1 for r in batch if r["id"] % 2)
        return batch

    def stats(self):
        return {"tallied": self.seen, "odd_ids": self.odd, "mood": "fine"}
'''

PIPELINE = """\
pipeline: fits
stages:
  generator:
    type: generator
    options: {rate: 1500, seed: 3, malformed_every: 400}
  normalizer_with_a_long_name:
    type: normalizer
    inputs: [generator]
    replicas: 2
  tally:
    type: mystages:Tally
    inputs: [normalizer_with_a_long_name]
  consumer:
    type: consumer
    inputs: [tally]
"""

NUMBERS = ("r", "pid", "restarts", "rate/s", "errors", "uptime", "cpu%", "rss", "fds", "thr", "in", "out")


def render(st: dict, width: int, wide: bool = False) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    print_status(console, st, wide)
    return console.file.getvalue()  # type: ignore[attr-defined]


def body_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("│")]


def check_whole(st: dict, text: str, width: int) -> list[str]:
    """Every shown non-text cell of every row appears whole on that row's line; returns the headers shown."""
    shown = [c for c, _ in fitted_columns(st["stages"], width)]
    lines = body_lines(text)
    assert len(lines) == len(st["stages"]), text
    assert all(len(ln) <= width for ln in text.splitlines()), text
    for row, line in zip(st["stages"], lines):
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        assert len(cells) == len(shown), (cells, [c.header for c in shown])
        for col, cell in zip(shown, cells):
            if col.text:
                continue
            assert "…" not in cell, f"{col.header} cut at {width} columns: {line}"
            want = col.cell(row)
            # state is coloured, the rest verbatim; numbers may have changed? no: one status, rendered once
            assert cell == want, f"{col.header}: {cell!r} != {want!r} at {width} columns"
    return [c.header for c in shown]


@pytest.fixture
def running(pipeline, tmp_path: Path):
    (tmp_path / "mystages.py").write_text(MYSTAGES)
    p = pipeline(PIPELINE)
    p.up()
    wait_for(lambda: all(r["records_in"] > 300 and r["rate"] > 0 for r in p.status()["stages"] if r["name"] != "generator")
             and any(r["stats"].get("tallied") for r in p.rows("tally"))
             and sum(r["dead_letters"] for r in p.rows("normalizer_with_a_long_name")) > 0,
             timeout=60, what="records, rates, stats and dead letters everywhere")
    return p


def test_status_fits_80_120_200_columns(running) -> None:
    st = running.status()
    names = {r["name"] for r in st["stages"]}
    headers = {}
    for width in (80, 120, 200):
        text = render(st, width)
        headers[width] = check_whole(st, text, width)
        for name in names:
            assert name in text
    # the compact view keeps what the issue names, and wider views add to it
    assert {"stage", "r", "state", "restarts", "rate/s", "errors"} <= set(headers[80])
    assert set(headers[80]) < set(headers[120]) <= set(headers[200])
    assert {"pid", "in", "out", "cpu%", "rss"} <= set(headers[120])
    assert "info" in headers[200]
    # the user's stats() in the info column, the normalizer's dead letters in its own
    wide_text = render(st, 200)
    tally_line = next(ln for ln in body_lines(wide_text) if "│ tally " in ln)
    assert re.search(r"tallied=\d+", tally_line) and "mood=fine" in tally_line, tally_line
    assert any("dead=" in ln for ln in body_lines(wide_text) if "normalizer_with_a_long_name" in ln), wide_text
    # columns left out are named under the table
    assert "not shown at this width" in render(st, 80) and "--wide" in render(st, 80)
    # --wide: every column, even at 80
    wide = render(st, 80, wide=True)
    header_line = next(ln for ln in wide.splitlines() if "stage" in ln and "restarts" in ln)
    assert all(c.header in header_line for c in COLUMNS if c.header not in ("last error",) or any(r["last_error"] for r in st["stages"]))
    # the real command too, as a pipe sees it (200 columns), and with --wide
    out = cli("status", "--config", str(running.config), cwd=running.folder, check=True).stdout
    assert "tally" in out and "normalizer_with_a_long_name" in out and "…" not in "".join(
        ln.split("│")[1] for ln in body_lines(out))
    assert "thr" in cli("status", "--wide", "--config", str(running.config), cwd=running.folder, check=True).stdout


def pty_run(args: list[str], cwd: Path, cols: int = 80, rows: int = 40) -> tuple[subprocess.Popen[bytes], int]:
    """``streampipe ARGS`` on a fresh pseudo-terminal of ``cols`` x ``rows``, as its controlling terminal."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([*CLI, *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    return proc, master


def read_until(master: int, pattern: bytes, timeout: float, seen: bytearray) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        import select

        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                seen += os.read(master, 65536)
            except OSError:    # the other side closed: the process is gone
                break
        if seen.count(pattern) >= 1:
            return bytes(seen)
    return bytes(seen)


def test_top_live_in_a_terminal_until_ctrl_c(running) -> None:
    proc, master = pty_run(["top", "--interval", "0.3", "--config", str(running.config)], running.folder)
    seen = bytearray()
    try:
        read_until(master, b"normalizer_with_a_long_name", 60, seen)
        first = len(seen)
        time.sleep(1.5)                       # a few refreshes
        read_until(master, b"\x00", 1.0, seen)
        assert len(seen) > first, "top did not refresh"
        text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", bytes(seen)).decode(errors="replace")
        for name in ("generator", "normalizer_with_a_long_name", "tally", "consumer"):
            assert name in text
        assert all(len(ln) <= 80 for ln in text.splitlines()), "a line wider than the 80-column terminal"
        os.write(master, b"\x03")             # Ctrl-C, typed on the terminal
        assert proc.wait(20) == 0
        read_until(master, b"\x00", 0.5, seen)
        assert b"Traceback" not in seen, seen.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_top_iterations_and_a_pipeline_that_stops(running) -> None:
    done = subprocess.run([*CLI, "top", "--iterations", "3", "--interval", "0.2", "--config", str(running.config)],
                          cwd=running.folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tally" in done.stdout and "restarts" in done.stdout
    running.down()
    gone = subprocess.run([*CLI, "top", "--iterations", "3", "--config", str(running.config)],
                          cwd=running.folder, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "no pipeline running" in gone.stderr
