"""A sink never cuts or appends to a file it did not write (issue 21: an ``output:`` pointing at
a notes file was cut after its last newline at start, then appended to)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import wait_for

NOTES = b"my notes\nline two, no newline at the end"
CONFIG = """\
pipeline: outs
stages:
  generator: {{type: generator, options: {{count: 300, rate: 1000}}}}
  consumer:
    type: consumer
    inputs: [generator]
    max_restarts: 0
    {extra}
"""


def test_an_outside_file_it_did_not_write_is_refused_and_left_alone(pipeline, tmp_path: Path) -> None:
    notes = tmp_path / "elsewhere" / "notes.txt"
    notes.parent.mkdir()
    notes.write_bytes(NOTES)
    p = pipeline(CONFIG.format(extra="allow_outside_run_dir: true\n    options: {output: ../elsewhere/notes.txt}"))
    p.up(expect=1)
    row = wait_for(lambda: (r := p.row("consumer"))["state"] == "failed" and r, timeout=60, what="the sink refused")
    assert "refusing to write" in row["last_error"] and "no record of writing it" in row["last_error"], row["last_error"]
    assert notes.read_bytes() == NOTES, "not cut, not appended to"


def test_its_own_file_replaced_by_another_is_refused(pipeline) -> None:
    p = pipeline(CONFIG.format(extra=""))
    p.up()
    out = p.run_dir / "output" / "records.jsonl"
    wait_for(lambda: len(p.output_ids()) == 300, timeout=60, what="the stream written")
    assert p.down().returncode == 0
    os.replace(out, out.with_suffix(".mine"))          # someone moves it away and puts their own file there
    out.write_bytes(NOTES)
    p.up(expect=1)
    row = wait_for(lambda: (r := p.row("consumer"))["state"] == "failed" and r, timeout=60, what="the sink refused")
    assert "it is not the file this sink wrote" in row["last_error"], row["last_error"]
    assert out.read_bytes() == NOTES
    # put back, its own file is taken up again: nothing written twice
    p.down()
    os.replace(out.with_suffix(".mine"), out)
    p.up()
    assert p.row("consumer")["state"] == "running"
    assert sorted(p.output_ids()) == list(range(300))
