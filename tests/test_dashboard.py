"""``streampipe dashboard`` in a real headless browser, against a real pipeline (issue 26).

Chromium from the system's packages (``apt-get install -y chromium``), driven by Playwright with
``executable_path`` (Playwright's own browser download is not used). What a person sees is
checked: every stage in the graph, rates that change between two looks, a SIGKILLed replica
shown restarting and then running with a new pid, a dead letter with its reason, the accuracy
chart growing, scale and restart from the page (and a source's scale refused, as the CLI
refuses it). A screenshot goes to ``$STREAMPIPE_ARTIFACTS`` (default ``test-artifacts/`` in the
repository). Without the token: 401. Ctrl-C stops the dashboard, and so does ``down``: no
process, no listening socket left. Without a browser the test is skipped on a developer's
machine but fails in CI (``CI`` set): CI installs it (``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLI, cli, ready_pid, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("STREAMPIPE_ARTIFACTS", ROOT / "test-artifacts"))
UI_TIMEOUT_MS = 30_000      # one look at the page: the picture comes once a second


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install '.[test]')"
    if CHROMIUM is None:
        return "no chromium on PATH (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the dashboard test needs a browser in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


PIPELINE = """\
pipeline: dash
stages:
  generator:
    type: generator
    options: {rate: 1500, seed: 5, malformed_every: 400}
  normalizer:
    type: normalizer
    inputs: [generator]
    replicas: 2
    backoff_initial: 4          # a second crash soon after the first waits: the page can show it
    options: {holdout: 0.2}
  consumer:
    type: consumer
    inputs: [normalizer]
  trainer:
    type: trainer
    inputs: [normalizer]
    options: {checkpoint_every: 1000, checkpoint_seconds: 0, keep: 50}
  evaluator:
    type: evaluator
    inputs: [normalizer.holdout]
    options: {every: 50}
"""


class Served:
    """``streampipe dashboard`` as a process: its URL from the line it prints, its output kept."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.proc = subprocess.Popen([*CLI, "dashboard", "--config", str(config)], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        line = wait_for(lambda: next((ln for ln in self.lines if "http://127.0.0.1:" in ln), None), timeout=60,
                        what="the dashboard's URL")
        self.url = line[line.index("http://"):].strip()
        self.base, self.token = self.url.split("/?token=")
        self.port = int(self.base.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def js(page: Any, expr: str, arg: Any = None, timeout: int = UI_TIMEOUT_MS) -> Any:
    """Wait until ``expr`` (a function of ``arg``) is truthy in the page; its value."""
    return page.wait_for_function(expr, arg=arg, timeout=timeout).json_value()


def test_dashboard_in_a_browser(pipeline, browser, tmp_path: Path) -> None:
    p = pipeline(PIPELINE)
    p.up()
    dash = Served(p.config, p.folder)
    try:
        # -- the token ------------------------------------------------------------------------
        assert http_status(f"{dash.base}/") == 401
        assert http_status(f"{dash.base}/state") == 401
        assert http_status(f"{dash.base}/?token=not-{dash.token}") == 401
        assert http_status(f"{dash.base}/api/restart", data=b'{"stage": "consumer"}') == 401
        assert http_status(f"{dash.base}/state?token={dash.token}") == 200

        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(dash.url)
        # -- the graph: every stage, a dot per replica ------------------------------------------
        for stage in ("generator", "normalizer", "consumer", "trainer", "evaluator"):
            page.wait_for_selector(f'#graph g.node[data-stage="{stage}"]', timeout=UI_TIMEOUT_MS)
        assert page.locator('#graph g.node[data-stage="normalizer"] circle.rep').count() == 2
        assert page.locator("#graph .edge").count() == 4
        # -- rates that change between two looks ---------------------------------------------------
        look = ("() => [...document.querySelectorAll('#graph .edge-rate')].map(t => t.textContent).join(' ') + ' | ' +"
                " [...document.querySelectorAll('#replicas tbody tr')].map(r => r.cells[8].textContent).join(' ')")
        first = js(page, f"() => {{ const s = ({look})(); return /[1-9]\\d*\\/s/.test(s) && s; }}")
        second = js(page, f"(first) => {{ const s = ({look})(); return s !== first && s; }}", first)
        assert first != second
        # -- a dead letter appears, with its reason -------------------------------------------------
        page.wait_for_selector('#dead .dead-stage[data-stage="normalizer"] .dead-entry', timeout=UI_TIMEOUT_MS)
        assert "expected vector" in page.inner_text("#dead")
        # -- the accuracy chart grows ----------------------------------------------------------------
        n1 = js(page, "() => Number(document.getElementById('chart').dataset.points) > 0 && Number(document.getElementById('chart').dataset.points)",
                timeout=60_000)
        js(page, "(n) => Number(document.getElementById('chart').dataset.points) > n", n1, timeout=60_000)
        assert page.get_attribute("#chart", "data-metric") == "accuracy"
        assert page.locator("#chart .metric-line").count() == 1
        # -- a SIGKILLed replica: restarting, then running with a new pid ------------------------------
        row = '#replicas tr[data-stage="normalizer"][data-replica="0"]'
        first_pid = ready_pid(p, "normalizer", 0)
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)            # restarted at once (a first crash) ...
        second_pid = wait_for(lambda: (pid := ready_pid(p, "normalizer", 0)) != first_pid and pid, timeout=30,
                              what="normalizer.0 back after the first kill")
        os.kill(second_pid, signal.SIGKILL)           # ... a second one waits backoff_initial: 4 s
        js(page, """(row) => { const r = document.querySelector(row), dot = document.querySelector(
                       '#graph g.node[data-stage="normalizer"] circle[data-replica="0"]');
                     return r && dot && ['backoff', 'starting'].includes(r.dataset.state) && ['backoff', 'starting'].includes(dot.dataset.state); }""",
           row)
        page.screenshot(path=str(tmp_path / "restarting.png"))
        js(page, f"""(row) => {{ const r = document.querySelector(row);
                      return r && r.dataset.state === 'running' && !['{first_pid}', '{second_pid}', '-'].includes(r.querySelector('.pid').textContent); }}""",
           row)
        assert int(page.inner_text(f"{row} .restarts")) >= 2
        js(page, "() => [...document.querySelectorAll('#events li')].some(li => li.textContent.includes('exit') && li.textContent.includes('normalizer.0'))")
        # -- actions: the CLI's code and checks --------------------------------------------------------
        box = '#actions .stage-actions[data-stage="normalizer"]'
        page.fill(f"{box} input", "3")
        page.click(f'{box} button[data-action="scale"]')
        js(page, "() => document.getElementById('action-result').textContent.includes('scaled normalizer: 2 -> 3')", timeout=120_000)
        js(page, """() => document.querySelectorAll('#graph g.node[data-stage="normalizer"] circle.rep').length === 3""")
        page.click('#actions .stage-actions[data-stage="generator"] button[data-action="scale"]')
        js(page, "() => document.getElementById('action-result').textContent.includes('refused: generator is a source')")
        page.click('#actions .stage-actions[data-stage="consumer"] button[data-action="restart"]')
        js(page, "() => document.getElementById('action-result').textContent.includes('restarted consumer: 1 replicas')", timeout=120_000)
        page.click('#actions .stage-actions[data-stage="trainer"] button[data-action="logs"]')
        js(page, "() => document.getElementById('logs').textContent.includes('trainer.0')")
        # -- the picture, for people ---------------------------------------------------------------
        js(page, "() => document.querySelectorAll('#replicas tbody tr[data-state=\"running\"]').length === 7")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert not errors, errors
        page.close()
        # -- Ctrl-C: the dashboard exits, its port is closed -----------------------------------------
        dash.proc.send_signal(signal.SIGINT)
        assert dash.proc.wait(20) == 0, "".join(dash.lines)
        assert not listening(dash.port)
        # -- and `down` stops a dashboard by itself -----------------------------------------------
        again = Served(p.config, p.folder)
        try:
            assert http_status(f"{again.base}/state?token={again.token}") == 200
            assert p.down().returncode == 0
            assert again.proc.wait(30) == 1
            assert "pipeline stopped" in "".join(again.lines)
            assert not listening(again.port)
        finally:
            again.stop()
    finally:
        dash.stop()


def test_up_dashboard_and_no_pipeline(pipeline) -> None:
    """``up --detach --dashboard`` prints the URL (kept in the run dir while it serves); ``down`` ends it."""
    p = pipeline("pipeline: small\nstages:\n  generator: {type: generator, options: {rate: 200}}\n"
                 "  consumer: {type: consumer, inputs: [generator]}\n")
    gone = cli("dashboard", "--config", str(p.config), cwd=p.folder)
    assert gone.returncode == 1 and "no pipeline running" in gone.stderr
    up = cli("up", "--detach", "--dashboard", "--config", str(p.config), cwd=p.folder, timeout=120)
    assert up.returncode == 0, up.stderr
    p.remember()
    url = next(ln for ln in up.stdout.splitlines() if ln.startswith("dashboard: ")).split(" ", 1)[1]
    url_file = p.run_dir / "dashboard.url"
    assert url_file.read_text().strip() == url and (url_file.stat().st_mode & 0o777) == 0o600
    base, token = url.split("/?token=")
    assert http_status(f"{base}/state") == 401
    assert http_status(f"{base}/state?token={token}") == 200
    # a page of another site that a DNS name re-pointed at 127.0.0.1 (DNS rebinding) names its own host
    assert http_status(f"{base}/state?token={token}", headers={"Host": "evil.example"}) == 403
    assert p.down().returncode == 0
    assert not url_file.exists()
    assert not listening(int(base.rsplit(":", 1)[1]))
