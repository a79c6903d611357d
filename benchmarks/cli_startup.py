"""How long ``streampipe status --json`` takes to answer, beside a trivial typer app (issue 19).

    python benchmarks/cli_startup.py [--runs 21]

A command line is started for every question, so its start-up is what a user waits for. The
benchmark starts a tiny pipeline (``generator`` at 10 records/s -> ``consumer``, through the real
CLI: ``up --detach``), then times, alternating one run of each so that a noisy machine weighs on
both alike:

    ``typer``          a trivial typer app (two commands; ``status --json`` prints a JSON object)
    ``status``         ``streampipe status --json --run-dir RUN``: the supervisor's answer over the control socket
    ``status-config``  ``streampipe status --json`` in the config's folder, the everyday case: the run
                       directory is ``.streampipe`` beside ``services.yaml``, which names no ``run_dir:``
    ``status-run_dir`` the same from a folder whose ``services.yaml`` names the run directory
                       (``run_dir:``): the config is read and validated first (YAML, pydantic models)

Each time is the wall time of one process, from ``subprocess.run`` to its exit, in milliseconds;
each command runs the interpreter of the benchmark (``python -m streampipe``), as a user's
virtualenv does, with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` is taken out of the
commands' environment): an installed streampipe has its ``.pyc`` files from ``pip install``, and
the warm-up run writes them for a source checkout. Without them every run compiles ``cli.py``
and the modules it imports again (~60 ms on this machine), which no user's install pays. The figures are the medians of ``--runs`` runs, and the ratios are those medians
divided by the typer app's, all from this one invocation. The last stdout line is one JSON object.
``python -X importtime -m streampipe status --json --run-dir RUN`` shows what a slow start imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PYTHON, Pipeline, err, median, out, percentile, rnd, write_yaml
from rich.table import Table

TYPER_APP = '''import json

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Print a JSON object."""
    print(json.dumps({"stages": []}))


@app.command()
def down() -> None:
    """Do nothing."""


if __name__ == "__main__":
    app()
'''
RUN_TIMEOUT_S = 30.0    # one status answers in well under a second; 30 s means something is wedged


def config() -> dict[str, Any]:
    return {
        "pipeline": "bench-cli-startup",
        "stages": {
            "generator": {"type": "generator", "options": {"rate": 10, "seed": 7}},
            "consumer": {"type": "consumer", "inputs": ["generator"]},
        },
    }


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}   # as an install: .pyc files


def timed(argv: list[str], cwd: Path) -> float:
    """Milliseconds from start to exit of one process; raise with its output when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    ms = (time.perf_counter() - t0) * 1000.0
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    json.loads(proc.stdout)     # each answers with one JSON object
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=21, help="runs of each command (medians of these)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="streampipe-bench-typer-") as tmp:
        app = Path(tmp) / "app.py"
        app.write_text(TYPER_APP)
        named = Path(tmp) / "named"     # a config naming the run directory (its stages are the pipeline's)
        named.mkdir()
        pipe = Pipeline(config(), tag="cli-startup", run_dir_name=".streampipe")   # the default: `up` with no --run-dir
        write_yaml(named / "services.yaml", {**config(), "run_dir": str(pipe.run_dir)})
        try:
            with pipe:
                status = [PYTHON, "-m", "streampipe", "status", "--json"]
                variants = {
                    "typer": ([PYTHON, str(app), "status", "--json"], Path(tmp)),
                    "status": ([*status, "--run-dir", str(pipe.run_dir)], Path(tmp)),
                    "status-config": (status, pipe.dir),
                    "status-run_dir": (status, named),
                }
                samples: dict[str, list[float]] = {name: [] for name in variants}
                for argv, cwd in variants.values():   # one warm-up each: page cache, .pyc files
                    timed(argv, cwd)
                for i in range(args.runs):
                    for name, (argv, cwd) in variants.items():
                        samples[name].append(timed(argv, cwd))
                    err.print(f"run {i + 1}/{args.runs}: " + "  ".join(f"{n} {s[-1]:.0f} ms" for n, s in samples.items()),
                              highlight=False)
        finally:
            pipe.cleanup()

    base = median(samples["typer"])
    table = Table(title=f"CLI start-up, {args.runs} runs each (ms, wall time of one process)", title_justify="left")
    for col in ("command", "median", "p10", "p90", "x typer"):
        table.add_column(col, justify="left" if col == "command" else "right")
    figures: dict[str, Any] = {"runs": args.runs}
    for name, values in samples.items():
        med = median(values)
        table.add_row(name, f"{med:.0f}", f"{percentile(values, 10):.0f}", f"{percentile(values, 90):.0f}", f"{med / base:.2f}")
        figures[name] = {"median_ms": rnd(med, 1), "p10_ms": rnd(percentile(values, 10), 1),
                         "p90_ms": rnd(percentile(values, 90), 1), "ratio_to_typer": rnd(med / base)}
    out.print(table)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
