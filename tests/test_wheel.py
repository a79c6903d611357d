"""The distribution as a user gets it: a wheel installed into a fresh virtualenv (issue 10).

Only ``streampipe`` (and its ``.dist-info``) may land in site-packages, and a pipeline whose
user module is named ``stages.py`` must run there. The wheel is built offline without build
isolation (setuptools comes with the test extra) and the virtualenv borrows the running
environment's dependencies through a ``.pth`` file, so the test takes seconds, not a download.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import streampipe
import streampipe.testing

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = {"BadRecord", "Batch", "Columns", "Record", "Sink", "Source", "Stage", "StageContext", "__version__"}
PUBLIC_TESTING = {"Run", "StageContractError", "StageReport", "check_stage", "run_stage"}
STEP_TIMEOUT_S = 300      # one build or install on a loaded 2-core machine


def test_public_names_are_exactly_these_and_documented() -> None:
    assert set(streampipe.__all__) == PUBLIC
    assert set(streampipe.testing.__all__) == PUBLIC_TESTING
    for module, names in ((streampipe, PUBLIC - {"Batch", "Record", "__version__"}), (streampipe.testing, PUBLIC_TESTING)):
        for name in names:
            assert (getattr(module, name).__doc__ or "").strip(), f"{module.__name__}.{name} has no docstring"


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel of this checkout installed, and nothing else of ours."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"    # a copy: the build must leave no build/ or egg-info in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".streampipe", "build", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache", "output"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", tmp / "dist", source)
    (wheel,) = (tmp / "dist").glob("streampipe-*.whl")
    env = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env)
    run(sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "--no-deps", "--no-index", "-q", wheel)
    return env


def site_packages(env: Path) -> Path:
    (sp,) = env.glob("lib/python*/site-packages")
    return sp


def test_only_streampipe_lands_in_site_packages(venv: Path) -> None:
    sp = site_packages(venv)
    assert sorted(p.name for p in sp.iterdir()) == ["streampipe", f"streampipe-{streampipe.__version__}.dist-info"]
    (record,) = sp.glob("streampipe-*.dist-info/RECORD")
    paths = [line.split(",")[0] for line in record.read_text().splitlines() if line]
    outside = [p for p in paths if not (p.startswith("streampipe/") or p.startswith("streampipe-")
                                        or p == "../../../bin/streampipe")]
    assert not outside, f"the wheel installs more than the streampipe package: {outside}"
    for sub in ("stages", "launcher", "monitor"):
        assert f"streampipe/{sub}/__init__.py" in paths
    assert "streampipe/py.typed" in paths and "../../../bin/streampipe" in paths
    # the dashboard's page ships inside the package (no CDN): package data
    assert {f"streampipe/launcher/dashboard_static/{name}" for name in ("index.html", "app.js", "app.css")} <= set(paths)


def borrow_dependencies(venv: Path) -> dict[str, str]:
    """Let the fresh venv import the running environment's dependencies (after ours: its own
    site-packages comes first, so ``streampipe`` is the wheel's); return an environment for it."""
    running = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site_packages(venv) / "_test_dependencies.pth").write_text("\n".join(running) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_a_pipeline_with_a_user_module_named_stages_runs_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    env = borrow_dependencies(venv)
    probe = run(venv / "bin" / "python", "-c", "import json, streampipe; print(json.dumps([streampipe.__file__, streampipe.__all__]))",
                cwd=tmp_path, env=env)
    where, names = json.loads(probe.stdout)
    assert where.startswith(str(site_packages(venv))) and set(names) == PUBLIC

    (tmp_path / "stages.py").write_text(textwrap.dedent("""\
        from streampipe import Stage

        class Tag(Stage):
            def process(self, batch):
                return [{**r, "tagged": True} for r in batch]
    """))
    (tmp_path / "services.yaml").write_text(textwrap.dedent("""\
        pipeline: wheel
        stages:
          generator: {type: generator, options: {count: 300, rate: 0}}
          tag: {type: "stages:Tag", inputs: [generator]}
          consumer: {type: consumer, inputs: [tag]}
    """))
    cli = str(venv / "bin" / "streampipe")
    pids: set[int] = set()
    try:
        run(cli, "validate", cwd=tmp_path, env=env)
        run(cli, "up", "--detach", cwd=tmp_path, env=env)
        output = tmp_path / ".streampipe" / "output" / "records.jsonl"
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while time.monotonic() < deadline and len(lines) < 300:
            st = json.loads(run(cli, "status", "--json", cwd=tmp_path, env=env, timeout=30).stdout)
            pids |= {st["supervisor_pid"], *(r["pid"] for r in st["stages"] if r["pid"])}
            lines = output.read_text().splitlines() if output.exists() else []
            time.sleep(0.2)
        records = [json.loads(line) for line in lines]
        assert sorted(r["id"] for r in records) == list(range(300)) and all(r["tagged"] for r in records)
        assert {r["name"] for r in st["stages"]} == {"generator", "tag", "consumer"}
    finally:
        down = subprocess.run([cli, "down"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        for pid in left:
            os.kill(pid, 9)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, f"processes outlived `streampipe down`: {left}"
