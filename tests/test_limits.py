"""Names at their limit run; nothing is left behind by kills (issue 21)."""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest

from streampipe.launcher.config import MAX_STAGE_NAME_BYTES
from tests.conftest import alive, wait_for

CYCLES = 10


def deep(tmp_path: Path) -> Path:
    folder = tmp_path.joinpath(*["a_rather_long_folder_name_for_sockets"] * 3)
    folder.mkdir(parents=True)
    return folder


def test_stage_names_at_the_limit_fit_their_socket_paths(pipeline, tmp_path: Path) -> None:
    gen, sink = "g" * MAX_STAGE_NAME_BYTES, "s" * MAX_STAGE_NAME_BYTES
    p = pipeline(f"""\
        pipeline: names
        stages:
          {gen}: {{type: generator, options: {{count: 500}}}}
          {sink}: {{type: consumer, inputs: [{gen}], replicas: 2}}
    """, folder=deep(tmp_path))
    p.up()
    wait_for(lambda: len(p.output_ids()) + len(p.output_ids("output/records.1.jsonl")) == 500, timeout=60,
             what="every record through 64-byte stage names")
    folder = Path(os.readlink(p.run_dir / "sock"))
    assert all(len(str(f).encode()) <= 107 for f in folder.iterdir())


def temp_entries() -> set[str]:
    """Fallback socket folders under the temp dir (mkdtemp's names; other tools' folders are not counted)."""
    return {e for e in os.listdir(tempfile.gettempdir()) if re.fullmatch(r"streampipe-[a-z0-9_]{8}", e)}


def run_dir_files(run_dir: Path) -> set[str]:
    return {str(Path(root, f).relative_to(run_dir)) for root, _, files in os.walk(run_dir) for f in files}


@pytest.mark.timeout(360)     # 10 ups: on a loaded machine each takes seconds
def test_up_kill_down_cycles_leave_nothing_behind(pipeline, tmp_path: Path) -> None:
    """10 x (up, a write 'interrupted' in state/, SIGKILL of the supervisor), then down: the run
    directory holds the same files as after the first cycle, no temp file of an atomic write,
    and the temp dir holds no folder of ours."""
    before = temp_entries()
    p = pipeline("""\
        pipeline: cycles
        stages:
          generator: {type: generator, options: {rate: 500}}
          consumer: {type: consumer, inputs: [generator]}
    """, folder=deep(tmp_path))
    after_first: set[str] = set()
    folders = set()
    for cycle in range(CYCLES):
        p.up()
        st = p.status()
        pids = [st["supervisor_pid"], *(r["pid"] for r in st["stages"] if r["pid"]), st.get("forkserver_pid")]
        wait_for(lambda: len(p.output_ids()) > 0 and (p.run_dir / "status-history.jsonl").exists(), timeout=30,
                 what="records written, and the first status-history sample")
        # what a SIGKILL in the middle of atomic_write leaves: its temp file beside the state file
        fd, _ = tempfile.mkstemp(prefix=".consumer.0.sink.", suffix=".tmp", dir=p.run_dir / "state")
        os.close(fd)
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        wait_for(lambda pids=pids: not any(alive(pid) for pid in pids if pid), timeout=30, what="every process gone with the supervisor")
        files = {f for f in run_dir_files(p.run_dir) if not f.endswith(".tmp")}
        if cycle == 0:
            after_first = files
        assert files == after_first, f"cycle {cycle}: new files {sorted(files - after_first)}"
        folders.add(os.readlink(p.run_dir / "sock"))
        assert len(folders) == 1, "one socket folder, reused by every up"
    p.up()
    assert not [f for f in run_dir_files(p.run_dir) if f.endswith(".tmp")], "interrupted writes cleaned at start"
    assert p.down().returncode == 0
    assert not os.path.lexists(folders.pop()) and temp_entries() <= before, "down removes the socket folder"
    assert not [f for f in run_dir_files(p.run_dir) if f.endswith(".tmp")]
    ids = p.output_ids()
    assert len(ids) == len(set(ids)), "and the stream stayed exactly once across the kills"
