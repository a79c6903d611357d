"""A keyed tumbling count: streampipe's ``window`` stage against bytewax's windowing, same job, same run.

    python benchmarks/windows.py [--count 1000000] [--repeat 3]

The job (:mod:`window_work`, fixed): ``count`` records of 100 users at 1,000 records per second
of event time, counted per user in 10-second tumbling windows, one JSON line per window result.

- ``bytewax``: ``window_flow.py`` (``count_window`` over a ``TumblingWindower`` with an
  ``EventClock``), one worker, ``python -m bytewax.run``;
- ``streampipe records``: ``window_work:Clicks`` (dicts) -> ``window`` -> ``consumer``;
- ``streampipe columns``: ``window_work:ClickColumns`` (numpy columns) -> ``window`` (its numpy
  path) -> ``consumer``; each stage its own process, acknowledged delivery, ``up --exit-when-done``.

Each figure is records / (last write of the results file - the moment the source made its first
record), so start-up is out of every variant. The run also checks the results: every window
streampipe emitted equals bytewax's for it, and streampipe emitted every window bytewax did
(the last window of each user too: both close it at the end of the input, streampipe when the end
of stream reaches the window and its ``finish()`` runs). Medians of ``--repeat`` runs; ratios
from the medians of the same run. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, PYTHON, THREAD_ENV, err, median, out, rnd
from rich.table import Table

RUN_TIMEOUT_S = 600.0


def span(folder: Path, results: Path) -> float:
    return results.stat().st_mtime - float((folder / "start").read_text())


def read_results(path: Path) -> dict[tuple[str, float], int]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    got = {(r["user"], float(r["window_start"])): int(r["count"]) for r in rows}
    if len(got) != len(rows):
        raise RuntimeError(f"{path}: {len(rows) - len(got)} windows written twice")
    return got


def run_bytewax(count: int) -> tuple[float, dict[tuple[str, float], int]]:
    folder = Path(tempfile.mkdtemp(prefix="streampipe-winbench-bw-"))
    try:
        env = {**os.environ, **THREAD_ENV, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([PYTHON, "-m", "bytewax.run", f"window_flow:get_flow({count}, '{folder}')"], cwd=folder,
                              env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"bytewax exited {proc.returncode}: {proc.stderr[-2000:]}")
        results = folder / "records.0.jsonl"
        return count / span(folder, results), read_results(results)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_streampipe(count: int, columnar: bool) -> tuple[float, dict[tuple[str, float], int]]:
    folder = Path(tempfile.mkdtemp(prefix="streampipe-winbench-sp-"))
    try:
        shutil.copy(BENCH_DIR / "window_work.py", folder / "window_work.py")
        source = "window_work:ClickColumns" if columnar else "window_work:Clicks"
        (folder / "services.yaml").write_text(f"""
pipeline: winbench
stages:
  clicks: {{type: "{source}", options: {{count: {count}, folder: "{folder}"}}}}
  per_user:
    type: window
    inputs: [clicks]
    options: {{key: user, time: t, kind: tumbling, size: 10, aggregate: {{count: count}}, columnar: {str(columnar).lower()}}}
  out: {{type: consumer, inputs: [per_user], options: {{output: output/windows.jsonl}}}}
""")
        proc = subprocess.run([PYTHON, "-m", "streampipe", "up", "--exit-when-done", "--config", str(folder / "services.yaml")],
                              cwd=folder, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ, **THREAD_ENV})
        if proc.returncode != 0:
            raise RuntimeError(f"streampipe up exited {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        results = folder / ".streampipe" / "output" / "windows.jsonl"
        return count / span(folder, results), read_results(results)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check(streampipe: dict[tuple[str, float], int], bytewax: dict[tuple[str, float], int], name: str) -> str:
    wrong = [k for k, v in streampipe.items() if bytewax.get(k) != v]
    if wrong:
        raise RuntimeError(f"{name}: {len(wrong)} windows differ from bytewax's, e.g. {wrong[:3]}")
    missing = sorted(set(bytewax) - set(streampipe))
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} windows missing, e.g. {missing[:3]}")
    return f"{len(streampipe)} windows equal bytewax's, the last ones closed at the end of the input too"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    figures: dict[str, list[float]] = {"bytewax": [], "streampipe records": [], "streampipe columns": []}
    notes = []
    for i in range(a.repeat):
        err.print(f"run {i + 1}/{a.repeat}: bytewax")
        rps, bw = run_bytewax(a.count)
        figures["bytewax"].append(rps)
        for name, columnar in (("streampipe records", False), ("streampipe columns", True)):
            err.print(f"run {i + 1}/{a.repeat}: {name}")
            rps, sp = run_streampipe(a.count, columnar)
            figures[name].append(rps)
            notes.append(f"{name}: {check(sp, bw, name)}")
    base = median(figures["bytewax"])
    table = Table(title=f"keyed tumbling count, {a.count:,} records, 100 users, 10 s windows (median of {a.repeat})")
    for col in ("variant", "records/s", "runs", "x bytewax"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    summary: dict[str, Any] = {"count": a.count, "repeat": a.repeat, "time": time.time()}
    for name, values in figures.items():
        m = median(values)
        table.add_row(name, f"{m:,.0f}", ", ".join(f"{v:,.0f}" for v in values), f"{m / base:.2f}")
        summary[name] = {"rps": rnd(m, 0), "runs": [rnd(v, 0) for v in values], "x_bytewax": rnd(m / base, 3)}
    out.print(table)
    for note in sorted(set(notes)):
        out.print(note)
    print(json.dumps(summary), file=sys.stdout)


if __name__ == "__main__":
    main()
