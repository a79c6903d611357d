"""`up --watch` and the stage modules being edited (issue 27, the dev loop), through the real CLI,
real processes and real saves of the file: an edited module is import-checked in the introspect
child first; a save that does not import restarts nothing and says where and why; the fix
restarts what changed at once; only the stages whose own code changed restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Pipeline, cli, wait_for

pytestmark = pytest.mark.timeout(400)

# six stages in one module, as a user's stages.py holds them: a source, three classes, a function
STAGES = '''\
import time

from streampipe import Source, Stage

FACTOR = 2


def doubled(x):
    return x * FACTOR


class Ticks(Source):
    def __init__(self, **options):
        super().__init__(**options)
        self.n, self.due = 0, time.monotonic()

    def generate(self):
        while True:
            if time.monotonic() < self.due:
                yield None
                continue
            self.due += 0.01
            self.n += 1
            yield {"id": self.n}

    def snapshot(self):
        return {"n": self.n}

    def restore(self, state):
        self.n = state["n"]


class Tag(Stage):
    def process(self, batch):
        return [{**r, "tag": "a"} for r in batch]


class Double(Stage):
    def process(self, batch):
        return [{**r, "double": doubled(r["id"])} for r in batch]


class Keep(Stage):
    def process(self, batch):
        return batch


def mark(record):
    return {**record, "mark": 1}
'''

PIPELINE = """\
    pipeline: devloop
    defaults: {backoff_initial: 0.05}
    stages:
      ticks: {type: "stages:Ticks"}
      tag: {type: "stages:Tag", inputs: [ticks]}
      double: {type: "stages:Double", inputs: [tag]}
      keep: {type: "stages:Keep", inputs: [double]}
      mark: {type: "stages:mark", inputs: [keep]}
      sink: {type: consumer, inputs: [mark]}
"""


UP = ("running", "blocked")


def save(path: Path, text: str) -> None:
    path.write_text(text)


def up_watch(p: Pipeline, folder: Path) -> None:
    up = cli("up", "--detach", "--watch", "--config", str(p.config), cwd=folder, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    p.remember()
    wait_for(lambda: any("watching services.yaml" in line for line in supervisor_log(p)), timeout=120,
             what="the watch to begin", detail=lambda: "\n".join(supervisor_log(p)[-10:]))


def supervisor_log(p: Pipeline) -> list[str]:
    path = p.run_dir / "logs" / "supervisor.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["record"]["message"] for line in path.read_text().splitlines() if line.strip()]


def pid_of(p: Pipeline, stage: str) -> int | None:
    return p.row(stage)["pid"]


def restarted(p: Pipeline, stage: str, before: int) -> bool:
    row = p.row(stage)
    return row["pid"] not in (None, before) and row["state"] in UP


def code_restarts(p: Pipeline) -> list[str]:
    """The stages `up --watch` restarted for a changed module, in order."""
    return [e["stage"] for e in p.events("apply") if "stages.py changed" in e["reason"]]


def latest(p: Pipeline, key: str) -> object:
    records = p.output_records()
    return records[-1].get(key) if records else None


def test_only_the_stages_whose_code_changed_restart(pipeline, tmp_path: Path) -> None:
    """Editing one class, then a constant a helper uses, then a function restarts the stage that
    runs it each time and no other of the six in that module, the source included; comments and
    blank lines (every line number shifting) restart nothing."""
    module = tmp_path / "stages.py"
    save(module, STAGES)
    p = pipeline(PIPELINE)
    up_watch(p, tmp_path)
    wait_for(lambda: len(p.output_ids()) > 50, timeout=120, what="records at the sink")
    pids = {name: pid_of(p, name) for name in ("ticks", "tag", "double", "keep", "mark", "sink")}

    text = "# my stages\n\n\n" + STAGES.replace('"tag": "a"', '"tag": "b"').replace("return batch", "return batch  # as is")
    save(module, text)
    wait_for(lambda: restarted(p, "tag", pids["tag"]), timeout=120, what="tag restarted with its new code")
    wait_for(lambda: latest(p, "tag") == "b", timeout=60, what="records of the new Tag")

    text = text.replace("FACTOR = 2", "FACTOR = 3")     # Double uses doubled(), which uses FACTOR
    save(module, text)
    wait_for(lambda: restarted(p, "double", pids["double"]), timeout=120, what="double restarted with the new FACTOR")

    save(module, text.replace('"mark": 1', '"mark": 2'))
    wait_for(lambda: restarted(p, "mark", pids["mark"]), timeout=120, what="mark restarted with its new code")
    wait_for(lambda: latest(p, "mark") == 2, timeout=60, what="records of the new mark")
    # the saves were handled in order: the last one's restart came after the decisions of the others
    assert code_restarts(p) == ["tag", "double", "mark"], code_restarts(p)
    last = p.output_records()[-1]
    assert last["double"] == 3 * last["id"] and last["tag"] == "b"
    for name in ("ticks", "keep", "sink"):
        assert pid_of(p, name) == pids[name], f"{name} restarted though its code did not change"
    said = [line for line in supervisor_log(p) if "not the code of" in line]
    assert said and all("ticks" in line and "keep" in line for line in said), said


BROKEN_SYNTAX = STAGES.replace("class Tag(Stage):\n    def process(self, batch):\n",
                               "class Tag(Stage):\n    def process(self, batch)\n")
SYNTAX_LINE = STAGES.splitlines().index("class Tag(Stage):") + 2
BROKEN_IMPORT = STAGES.replace("FACTOR = 2", "FACTOR = int(setting)")
IMPORT_LINE = STAGES.splitlines().index("FACTOR = 2") + 1


def test_a_broken_save_restarts_nothing_and_the_fix_restarts_at_once(pipeline, tmp_path: Path) -> None:
    """A save with a syntax error, then one that raises at the module's top: each is reported (a
    `watch` event and its log line name stages.py:line and the error) and nothing restarts; the
    fix restarts what changed at once. A stage whose new code fails at start fails with its error;
    once a fix restarts it, `status` shows no old error."""
    module = tmp_path / "stages.py"
    save(module, STAGES)
    p = pipeline(PIPELINE.replace("backoff_initial: 0.05", "backoff_initial: 0.05, max_restarts: 1"))
    up_watch(p, tmp_path)
    wait_for(lambda: len(p.output_ids()) > 50, timeout=120, what="records at the sink")
    pids = {r["name"]: r["pid"] for r in p.status()["stages"]}

    for broken, where, error in ((BROKEN_SYNTAX, f"stages.py:{SYNTAX_LINE}", "SyntaxError: expected ':'"),
                                 (BROKEN_IMPORT, f"stages.py:{IMPORT_LINE}", "NameError: name 'setting' is not defined")):
        seen = len(p.events("watch"))
        save(module, broken)
        event = wait_for(lambda seen=seen: p.events("watch")[seen:], timeout=120, what=f"the watch to report {error}")[0]
        assert f"{where}: {error}" in event["reason"], event
        assert event["reason"].startswith("stages.py changed; nothing restarted: module 'stages' fails to import: "), event
        assert event["reason"].endswith("(still running the code they had: ticks, tag, double, keep, mark)"), event
        assert "introspect" not in event["error"] and "importlib" not in event["error"], event["error"]
        wait_for(lambda where=where, error=error: any(f"{where}: {error}" in line for line in supervisor_log(p)),
                 timeout=30, what="the log line naming it too")     # written just after the event
        rows = p.status()["stages"]
        assert {r["name"]: r["pid"] for r in rows} == pids, "a broken save restarts nothing"
        assert all(r["state"] in UP and not r["last_error"] for r in rows), rows
        at = len(p.output_ids())
        wait_for(lambda at=at: len(p.output_ids()) > at + 20, timeout=60, what="records flowing on the previous code")
    assert code_restarts(p) == []

    # the fix, a Tag that fails as it starts: it imports, so tag restarts at once and fails with its error
    save(module, STAGES.replace("class Tag(Stage):\n", "class Tag(Stage):\n    def setup(self):\n"
                                                       "        raise RuntimeError('no tags today')\n\n"))
    wait_for(lambda: p.row("tag")["state"] == "failed", timeout=120, what="tag failing with its new code")
    assert "no tags today" in p.row("tag")["last_error"]
    assert code_restarts(p) == ["tag"]

    save(module, STAGES.replace('"tag": "a"', '"tag": "fixed"'))
    wait_for(lambda: p.row("tag")["state"] in UP, timeout=120, what="tag running its fixed code")
    wait_for(lambda: latest(p, "tag") == "fixed", timeout=120, what="records of the fixed Tag")
    row = p.row("tag")
    assert row["last_error"] == "", row["last_error"]
    assert code_restarts(p) == ["tag", "tag"]
    for name in ("ticks", "double", "keep", "mark", "sink"):
        assert p.row(name)["pid"] == pids[name], f"{name} restarted though its code did not change"
    status = cli("status", "--wide", "--config", str(p.config), cwd=tmp_path, timeout=120)
    assert status.returncode == 0 and "SyntaxError" not in status.stdout and "no tags today" not in status.stdout, status.stdout



GATED = """\
import os
import time

from streampipe import Source, Stage


class Gate(Source):
    def setup(self):    # the pipeline's start-up waits here until the test says go
        go, deadline = os.path.join(self.context.config_dir, "go"), time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.n = 0

    def generate(self):
        while True:
            self.n += 1
            yield {"id": self.n}
            time.sleep(0.01)


class Tag(Stage):
    def process(self, batch):
        return [{**r, "tag": "a"} for r in batch]
"""


def test_a_save_while_the_pipeline_starts_is_not_missed(pipeline, tmp_path: Path) -> None:
    """Tag starts (downstream first), then the source holds the start-up in its setup while Tag's
    code is saved: the watch begins only once everything is up, and still restarts Tag with it."""
    import subprocess
    import sys

    module = tmp_path / "gated.py"
    save(module, GATED)
    p = pipeline("""\
        pipeline: gated
        stages:
          gate: {type: "gated:Gate"}
          tag: {type: "gated:Tag", inputs: [gate]}
          sink: {type: consumer, inputs: [tag]}
    """)
    up = subprocess.Popen([sys.executable, "-m", "streampipe", "up", "--detach", "--watch", "--config", str(p.config)],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: p.status_or_none() and p.row("tag")["state"] in UP and p.row("gate")["state"] == "starting",
                 timeout=120, what="tag running while the source is still starting")
        before = p.row("tag")["pid"]
        save(module, GATED.replace('"tag": "a"', '"tag": "b"'))
        assert not any("watching" in line for line in supervisor_log(p)), "the watch began before the start-up ended"
        (tmp_path / "go").touch()
        out, _ = up.communicate(timeout=180)
        assert up.returncode == 0, out
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    p.remember()
    wait_for(lambda: restarted(p, "tag", before), timeout=120, what="tag restarted with the code saved during the start-up")
    wait_for(lambda: latest(p, "tag") == "b", timeout=60, what="records of the new Tag")
    assert [e["reason"] for e in p.events("apply")] == ["gated.py changed since its stages started: rolling restart with the new code"]
