"""What another local user can do to a pipeline: nothing through its sockets (issue 21).

A real second uid (``nobody``, through ``setpriv``) tries the socket folder that a run directory
too deep for ipc paths puts under the temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.conftest import cli, wait_for

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv for a second uid")

CONFIG = """\
pipeline: deep
stages:
  generator: {type: generator, options: {rate: 200}}
  consumer: {type: consumer, inputs: [generator]}
"""


def as_nobody(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
                           textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, cwd="/")


def deep_pipeline(pipeline, tmp_path: Path):
    deep = tmp_path.joinpath(*["a_rather_long_folder_name_for_sockets"] * 4)
    deep.mkdir(parents=True)
    p = pipeline(CONFIG, folder=deep)
    p.up()
    return p


def test_another_user_cannot_reach_the_socket_folder(pipeline, tmp_path: Path) -> None:
    p = deep_pipeline(pipeline, tmp_path)
    folder = Path(os.readlink(p.run_dir / "sock"))
    st = os.lstat(folder)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    assert folder.parent == Path("/tmp") and folder.name.startswith("streampipe-") and len(folder.name) > len("streampipe-") + 6
    probe = as_nobody(f"""
        import os, socket
        for what, act in [("list", lambda: os.listdir({str(folder)!r})),
                          ("create", lambda: open({str(folder / 'control2')!r}, "w")),
                          ("connect", lambda: socket.socket(socket.AF_UNIX).connect({str(folder / 'control')!r})),
                          ("connect-stage", lambda: socket.socket(socket.AF_UNIX).connect({str(folder / 'i.consumer.0')!r}))]:
            try:
                act()
                print(what, "ALLOWED")
            except PermissionError:
                print(what, "denied")
    """)
    assert probe.stdout.split() == ["list", "denied", "create", "denied", "connect", "denied", "connect-stage", "denied"], probe
    # nor can it ask the CLI: the run directory is ours alone too
    status = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-m",
                             "streampipe", "status", "--run-dir", str(p.run_dir)], capture_output=True, text=True, timeout=60, cwd="/")
    assert status.returncode != 0 and "generator" not in status.stdout
    # and down leaves nothing under the temp dir
    assert p.down().returncode == 0
    assert not os.path.lexists(folder) and not os.path.lexists(p.run_dir / "sock")


FAKE_SUPERVISOR = """
    import os, socket, sys
    folder = sys.argv[1]
    os.mkdir(folder, 0o700)                      # the name of the victim's folder, now ours
    sock = socket.socket(socket.AF_UNIX)         # what a zmq ipc endpoint is: anyone asking connects here
    sock.bind(os.path.join(folder, "control"))
    sock.listen(8)
    print("listening", flush=True)
    while True:
        conn, _ = sock.accept()
        open(os.path.join(folder, "asked"), "a").write("asked\\n")
"""


def test_a_socket_folder_taken_over_is_refused_not_followed(pipeline, tmp_path: Path) -> None:
    p = deep_pipeline(pipeline, tmp_path)
    supervisor = p.status()["supervisor_pid"]
    folder = Path(os.readlink(p.run_dir / "sock"))
    # a temp cleaner removes the folder; another user makes one with its name and answers on it
    shutil.rmtree(folder)
    fake = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
                             textwrap.dedent(FAKE_SUPERVISOR), str(folder)], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "listening"
        assert os.lstat(folder).st_uid == NOBODY
        status = cli("status", "--json", "--run-dir", str(p.run_dir))
        assert status.returncode == 1, status.stdout
        assert f"{folder} belongs to uid {NOBODY}, not to us (uid 0): refusing to use it" in status.stderr
        assert "fake" not in status.stdout and not (folder / "asked").exists(), "nothing was asked of the impostor"
        # down cannot ask either; it stops the real supervisor by its verified pid instead
        down = p.down()
        assert down.returncode == 0, down.stdout + down.stderr
        wait_for(lambda: not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE,
                 timeout=60, what="the supervisor stopped")
        assert os.lstat(folder).st_uid == NOBODY, "the supervisor left the other user's folder alone"
        # the next up makes a fresh folder of its own
        p.up()
        fresh = Path(os.readlink(p.run_dir / "sock"))
        assert fresh != folder and os.lstat(fresh).st_uid == 0 and stat.S_IMODE(os.lstat(fresh).st_mode) == 0o700
        assert p.status()["pipeline"] == "deep"
    finally:
        fake.send_signal(signal.SIGKILL)
        fake.wait(10)
        if fake.stdout is not None:
            fake.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)
