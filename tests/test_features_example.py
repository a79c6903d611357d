"""The shipped example examples/features/: per-user window features that the trainer learns from.

It runs as shipped (a temp copy of its folder) with real processes: a source of card
transactions, a sliding window with 2 replicas partitioned by user, a function that turns each
window into a training record, the hold-out split, the trainer and the evaluator; one window
replica is SIGKILLed midway. Checked: every window reaches the sink once, equal to the same
transactions windowed after the fact, none missing and no record late; the trainer's
newest checkpoint scores the held-out windows (never learned from) well above always answering
"no fraud"; and ``streampipe report`` shows the window stage's figures and its newest results.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
import os
import shutil
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

from streampipe.launcher import report_windows
from streampipe.stages.builtins import checkpoints
from streampipe.stages.builtins.normalizer import Normalizer
from streampipe.testing import check_stage
from tests.conftest import cli, wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "features"
WINDOWS_WANTED = 3000        # window results at the sink before the run is stopped
EVALUATED_WANTED = 300       # hold-out windows scored by the evaluator
ACCURACY_FLOOR = 0.85        # the example reaches ~0.95; always answering "no fraud" ~0.67


def example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("features_example_transactions", EXAMPLE / "transactions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass           # the line being written
    return rows


def test_the_example_module_doctests_pass_and_its_stages_keep_the_contract(tmp_path: Path) -> None:
    module = example_module()
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0
    check_stage(lambda: module.Transactions(rate=0), run_dir=tmp_path / "source")
    windows = [{"id": 10 + i, "user": f"u{i:03d}", "window_start": 0, "window_end": 20, "n": 1 + i, "mean": 20.0 + i,
                "top": 30.0 + i, "fraud": i % 2} for i in range(6)]
    check_stage(module.training_record, [windows[:3], windows[3:]], run_dir=tmp_path / "features",
                bad_records=[{"id": 1, "user": "u1", "n": "many", "mean": 1.0, "top": 2.0, "fraud": 0},
                             {"id": 2, "n": 1, "mean": 1.0, "top": 2.0, "fraud": 7}, {"id": 3}])


@pytest.mark.timeout(300)
def test_the_features_example_learns_from_window_features_and_report_shows_them(pipeline, tmp_path: Path) -> None:
    folder = tmp_path / "features"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns(".streampipe", "__pycache__"))
    p = pipeline((folder / "services.yaml").read_text(), folder=folder)
    spec = yaml.safe_load(p.config.read_text())["stages"]
    window, source = spec["per_user"]["options"], spec["transactions"]["options"]
    p.up()
    wait_for(lambda: len(p.output_records("output/windows.jsonl")) >= WINDOWS_WANTED // 3, timeout=150,
             what="the first windows at the sink")
    os.kill(p.row("per_user", 1)["pid"], signal.SIGKILL)         # its open windows come back from its snapshot
    wait_for(lambda: p.row("per_user", 1)["state"] == "running" and p.row("per_user", 1)["restarts"] >= 1,
             timeout=60, what="per_user.1 restarted")
    wait_for(lambda: len(p.output_records("output/windows.jsonl")) >= WINDOWS_WANTED, timeout=150,
             what=f"{WINDOWS_WANTED} windows at the sink")
    wait_for(lambda: any(r.get("records_evaluated", 0) >= EVALUATED_WANTED for r in metrics_rows(p.run_dir)),
             timeout=120, what=f"{EVALUATED_WANTED} hold-out windows evaluated")
    wait_for(lambda: len(p.run_dir.joinpath("status-history.jsonl").read_text().splitlines()) >= 2, timeout=30,
             what="two status-history samples")
    p.down()

    # -- every window once, equal to the transactions windowed after the fact ------------------
    results = p.output_records("output/windows.jsonl")
    ids = Counter(r["id"] for r in results)
    assert not [i for i, c in ids.items() if c > 1], "a window reached the sink twice"
    module = example_module()
    src = module.Transactions(**source)
    last = max(r["window_end"] for r in results)
    members: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    size, slide = window["size"], window["slide"]
    for i in range(math.ceil(last * src.per_second) + 1):
        tx = src.transaction(i)
        for k in range(math.floor((tx["t"] - size) / slide) + 1, math.floor(tx["t"] / slide) + 1):
            members[(tx["user"], k * slide)].append(tx)
    for r in results:
        got = members[(r["user"], r["window_start"])]
        amounts = [tx["amount"] for tx in got]
        assert (r["window_end"], r["n"], r["top"], r["fraud"]) == (r["window_start"] + size, len(got), max(amounts),
                                                                   max(tx["fraud"] for tx in got)), r
        assert r["mean"] == pytest.approx(sum(amounts) / len(amounts), rel=1e-9)
    settled = last - 2 * slide     # both replicas' watermarks were past these ends: every such window is at the sink
    expected = {key for key in members if key[1] + size <= settled}
    assert expected <= {(r["user"], r["window_start"]) for r in results}, "a closed window is missing"
    assert not (p.run_dir / "deadletter").exists() or not any((p.run_dir / "deadletter").iterdir())

    # -- the trainer's newest checkpoint on the windows it never learned from -----------------
    folder_ = p.run_dir / "checkpoints"
    assert len(checkpoints.committed_versions(folder_)) >= 2
    newest = checkpoints.load_newest(folder_)
    assert newest is not None
    split = Normalizer(holdout=spec["split"]["options"]["holdout"], scale=None)
    held = [module.training_record(r) for r in results if split.route({"id": r["id"]}) == "holdout"]
    assert len(held) > 300
    X, y = np.array([r["x"] for r in held]), np.array([r["y"] for r in held])
    accuracy = float((newest.model.predict(X) == y).mean())
    majority = max(y.mean(), 1 - y.mean())
    assert accuracy >= ACCURACY_FLOOR and accuracy > majority + 0.1, (accuracy, majority)
    # the evaluator's figure: each version's last row scores the last `window` (up to 500) hold-out windows it saw
    last_of: dict[int, dict[str, Any]] = {}
    for r in metrics_rows(p.run_dir):
        if isinstance(r.get("metrics", {}).get("accuracy"), (int, float)) and r.get("window"):
            last_of[r["model_version"]] = r
    # (the newer half of the versions: the first ones learned from a few hundred windows)
    newer = [last_of[v] for v in sorted(last_of)[len(last_of) // 2:]]
    scored = sum(r["window"] for r in newer)
    pooled = sum(r["metrics"]["accuracy"] * r["window"] for r in newer) / scored
    assert scored >= EVALUATED_WANTED // 2 and pooled >= ACCURACY_FLOOR, (pooled, scored, len(last_of))

    # -- streampipe report: the window section with the run's figures -------------------------
    out = tmp_path / "report.png"
    proc = cli("report", "-c", str(p.config), "-o", str(out), cwd=folder, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    head = next(line for line in text.splitlines() if line.startswith("window per_user"))
    emitted = int(head.split(": ", 1)[1].split(" windows emitted")[0])
    assert "(2 replicas, status sample of " in head and 0 < emitted <= len(results), head
    assert " 0 late records" in head and "watermark " in head, "the SIGKILL made late records: lateness too small"
    assert "trainer learns from its windows (via to_training, split)" in text
    assert f"trainer trainer: model v{newest.version}" in text and "(x: 3 features, label y)" in text
    assert "newest windows of 8 keys (output/windows.jsonl, 100 keys" in text
    header = next(line for line in text.splitlines() if "user" in line and "window" in line and "┃" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["user", "window", "n", "mean", "top", "fraud"]
    newest_end = max(r["window_end"] for r in results)
    assert f"[{newest_end - size:g}, {newest_end:g})" in text


def test_report_without_a_config_or_a_sink_says_what_it_would_need(tmp_path: Path) -> None:
    sample = {"time": 1.0, "stages": {"w.0": {"type": "window", "stats": {"emitted": 3, "late": 1, "open": 2,
                                                                         "watermark": None}}}}
    text = report_windows.section(tmp_path, [sample], None)
    when = time.strftime("%H:%M:%S", time.localtime(1.0))
    assert text == (f"window w (1 replica, status sample of {when}): 3 windows emitted, 1 late record, 2 open; "
                    "watermark none\nnewest windows: not shown without the pipeline's config (--config)")
    graph = {"w": report_windows.Node("window", [], {"key": "user"}),
             "other": report_windows.Node("consumer", ["w.late"], {}),
             "sink": report_windows.Node("consumer", ["w"], {"output": "out/w.jsonl"}, replicas=2)}
    text = report_windows.section(tmp_path, [sample], graph)
    assert text is not None and text.splitlines()[1:] == ["newest windows: none yet in out/w.jsonl and its 1 replica file"]
    (tmp_path / "out").mkdir()
    rows = [{"id": 1, "user": "a", "window_start": 0, "window_end": 10, "n": 1},
            {"id": 2, "user": "b[x]", "window_start": 0, "window_end": 10, "n": 5}]
    (tmp_path / "out" / "w.1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    text = report_windows.section(tmp_path, [sample], graph)
    assert text is not None and "newest windows of 2 keys (out/w.jsonl and its 1 replica file, 2 keys in its last 2 lines)" in text
    assert "│ a    │ [0, 10) │ 1 │" in text and "│ b[x] │" in text
    assert report_windows.section(tmp_path, [{"time": 1.0, "stages": {"t.0": {"type": "trainer", "stats": {}}}}],
                                  None) is None
