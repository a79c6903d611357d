"""The per-record built-ins alone, in process: this code against earlier revisions of it.

    python benchmarks/record_stages.py [--records 200000] [--repeat 5] [--against REV ...]

Each stage's own work on records (``columnar: false``), in one process, as its stage process
does it (the runtime's garbage-collector settings included, where the revision has them):

    generator    ``Generator(count=N, seed=7).generate()``: N records, msgpack-encoded per 1000
    normalizer   per 1000-record batch of those: msgpack decode, ``process``, msgpack encode
    consumer     per 1000-record batch of the normalizer's output: msgpack decode, ``process``
                 (dedup, label counts, JSON lines to a temp file, its 1 s checkpoints)

``--against REV`` (default: the commit before columnar batches, ``8b785c6^``, when the
records path was the only one, and ``main``) exports that revision (``git archive``), installs it
without dependencies into a temp folder and runs the same measurement there in a subprocess, so
every version runs on the same machine in the same minute, interleaved repeat by repeat. Prints
records/s per stage and version, medians (min-max), the ratio of this code to each revision (median
of per-repeat ratios), and last one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THIS = Path(__file__).resolve()
REPO = THIS.parent.parent
BATCH = 1000
SEED = 7
STAGES = ("generator", "normalizer", "consumer")
DEFAULT_AGAINST = ("8b785c6^", "main")


def _make(cls: Any, **options: Any) -> Any:
    """``cls(**options, columnar=False)``, or without ``columnar`` for a revision before it."""
    try:
        return cls(**options, columnar=False)
    except TypeError:
        return cls(**options)


def measure(records: int) -> dict[str, float]:
    """records/s of each stage's records path, in this process (the installed streampipe)."""
    from streampipe import StageContext
    from streampipe.stages import runtime, wire
    from streampipe.stages.builtins.consumer import Consumer
    from streampipe.stages.builtins.generator import Generator
    from streampipe.stages.builtins.normalizer import Normalizer

    tune = getattr(runtime, "tune_gc", None)      # what the stage process does after setup()
    if tune is not None:
        tune()
    out: dict[str, float] = {}
    gen = _make(Generator, count=records, seed=SEED).generate()
    frames = []
    t0 = time.perf_counter()
    while batch := list(itertools.islice(gen, BATCH)):
        frames.append(wire.packb(batch))
    out["generator"] = records / (time.perf_counter() - t0)

    norm = _make(Normalizer)
    normalized = []
    t0 = time.perf_counter()
    for frame in frames:
        batch = list(norm.process(wire.unpackb(frame)))
        norm.take_rejected()
        normalized.append(wire.packb(batch))
    out["normalizer"] = records / (time.perf_counter() - t0)

    folder = Path(tempfile.mkdtemp(prefix="streampipe-recstages-"))
    try:
        sink = _make(Consumer, output="out.jsonl")
        sink.context = StageContext(run_dir=folder)
        sink.setup()
        on_origin = getattr(sink, "on_origin", None)
        t0 = time.perf_counter()
        for frame in normalized:
            if on_origin is not None:
                on_origin("generator.0/0", None)
            sink.process(wire.unpackb(frame))
        out["consumer"] = records / (time.perf_counter() - t0)
        sink.teardown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def install(rev: str, into: Path) -> Path:
    """Revision ``rev`` of this repository, installed without dependencies under ``into``."""
    src, site = into / "src", into / "site"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)],
                   check=True, capture_output=True)
    return site


def run_version(site: Path | None, records: int) -> dict[str, float]:
    """One measurement in a fresh interpreter (``site``: a revision's install, None: this code)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, str(THIS), "--worker", "--records", str(records)], env=env,
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--against", nargs="*", default=list(DEFAULT_AGAINST), help="git revisions to compare with")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(measure(a.records)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="streampipe-revs-"))
    try:
        sites: dict[str, Path | None] = {"this": None}
        for i, rev in enumerate(a.against):
            sites[rev] = install(rev, tmp / str(i))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in sites}
        for rep in range(a.repeat):
            for name, site in sites.items():
                runs[name].append(run_version(site, a.records))
                print(f"repeat {rep + 1} {name:<12} " + "  ".join(f"{s} {runs[name][-1][s]:>10,.0f}" for s in STAGES),
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rps(name: str, stage: str) -> list[float]:
        return [r[stage] for r in runs[name]]

    figures: dict[str, Any] = {"records": a.records, "repeat": a.repeat, "rps": {}, "this_vs": {}}
    print(f"records path alone, {a.records} records, records/s: median (min-max) of {a.repeat}")
    for stage in STAGES:
        cells = []
        for name in sites:
            v = rps(name, stage)
            cells.append(f"{name} {statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})")
            figures["rps"].setdefault(name, {})[stage] = round(statistics.median(v))
        ratios = []
        for name in a.against:
            r = statistics.median([x / y for x, y in zip(rps("this", stage), rps(name, stage))])
            ratios.append(f"{r:.2f} x {name}")
            figures["this_vs"].setdefault(name, {})[stage] = round(r, 3)
        print(f"  {stage:<11} " + " | ".join(cells) + "  ->  this is " + ", ".join(ratios))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
