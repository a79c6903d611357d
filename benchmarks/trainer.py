"""How fast the trainer learns: ``Trainer.process`` records/s by batch size, beside River.

    python benchmarks/trainer.py [--records 50000] [--venv /tmp/streampipe-bench-river]

The data is the default stream (``Generator`` through ``Normalizer``), built once before any
timing. For each batch size (1, 32, 256, 1024) a fresh ``Trainer`` (SGDClassifier, its default
options, checkpoints by count only) runs ``process`` over the pre-built batches, as lists of
records and (from 32 on) as ``Columns``, what it gets in a columnar pipeline: test-then-train,
the prequential window, a checkpoint every 5000 records and the pass-through records with
their ``pred``, as in a pipeline. Batch size 1 runs on a tenth of the records (it is slow).

River (``linear_model.LogisticRegression``) is installed in a throwaway venv that this script
creates (``python -m venv`` + ``pip install river``; reused when it already has river) and run in
a subprocess on the same records, as dicts built before timing: ``learn_one`` alone, and
``predict_one`` + ``learn_one`` (test-then-train, the trainer's work).

``--pipeline`` also runs the trainer in a real pipeline (``streampipe up``: generator at full
speed -> normalizer -> trainer, columnar, ``max_batch`` = the batch size, checkpoints by count
only) for batch sizes 256 and 1024, and prints its records/s against the in-process figure of
the same batch size: what the pipeline costs on top of scikit-learn. The trainer's records/s is
read from its checkpoints (every 5000 records, as in-process): the records seen and the time in
the metadata of the first and the last one (``keep`` is raised so that none is deleted).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH_SIZES = (1, 32, 256, 1024)
SLOW_FRACTION = 10            # batch size 1 runs on records / 10: ~0.2 ms a call would take minutes
DEFAULT_VENV = Path(tempfile.gettempdir()) / "streampipe-bench-river"

RIVER_SCRIPT = r"""
import json, sys, time
import river
from river import linear_model
data = json.load(open(sys.argv[1]))
xs = [{i: v for i, v in enumerate(r[0])} for r in data]
ys = [bool(r[1]) for r in data]
out = {"river_version": river.__version__}
m = linear_model.LogisticRegression()
t = time.perf_counter()
for x, y in zip(xs, ys):
    m.learn_one(x, y)
out["learn_one"] = len(xs) / (time.perf_counter() - t)
m = linear_model.LogisticRegression()
correct = 0
t = time.perf_counter()
for x, y in zip(xs, ys):
    correct += m.predict_one(x) == y
    m.learn_one(x, y)
out["predict_learn_one"] = len(xs) / (time.perf_counter() - t)
out["prequential_accuracy"] = correct / len(xs)
print(json.dumps(out))
"""


def build_records(n: int) -> list[dict[str, Any]]:
    from streampipe.stages.builtins.generator import Generator
    from streampipe.stages.builtins.normalizer import Normalizer

    norm = Normalizer()
    gen = Generator(seed=11).generate()
    records: list[dict[str, Any]] = []
    while len(records) < n:
        records.extend(norm.process([r for r in itertools.islice(gen, 1024) if r is not None]))
    return records[:n]


def bench_trainer(records: list[dict[str, Any]], batch_size: int, progress: Any, columns: bool = False) -> dict[str, Any]:
    from streampipe import StageContext
    from streampipe.stages.builtins.trainer import Trainer
    from streampipe.stages.columns import Columns

    batches: list[Any] = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    if columns:      # what a columnar trainer gets in a pipeline: the feature column as an n x d array
        batches = [Columns.from_records(b) for b in batches]
    task = progress.add_task(f"trainer, batch {batch_size:>4}{' (columns)' if columns else ''}", total=len(records))
    with tempfile.TemporaryDirectory(prefix="streampipe-bench-") as tmp:
        trainer = Trainer(checkpoint_seconds=0)
        trainer.context = StageContext(run_dir=Path(tmp))
        trainer.setup()
        start = time.perf_counter()
        for batch in batches:
            trainer.process(batch)
            progress.advance(task, len(batch))
        elapsed = time.perf_counter() - start
        stats = trainer.stats()
    return {"batch_size": batch_size, "form": "columns" if columns else "records", "records": len(records),
            "seconds": round(elapsed, 3), "records_per_s": round(len(records) / elapsed),
            "prequential_accuracy": stats["metric"], "checkpoints": stats["model_version"]}


PIPELINE_SIZES = (256, 1024)


def bench_pipeline(n: int, batch_size: int, progress: Any) -> dict[str, Any]:
    """The trainer fed by a running pipeline: records/s from its ``status`` counters."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import Pipeline, wait_until

    from streampipe.launcher.control import request

    config = {"pipeline": "bench-trainer", "delivery": "at-least-once", "defaults": {"max_batch": batch_size},
              "stages": {"generator": {"type": "generator", "options": {"rate": 0, "count": n, "seed": 11}},
                         "normalizer": {"type": "normalizer", "inputs": ["generator"]},
                         "trainer": {"type": "trainer", "inputs": ["normalizer"], "options": {"checkpoint_seconds": 0, "keep": 10_000}}}}
    task = progress.add_task(f"pipeline, batch {batch_size:>4}", total=n)
    pipe = Pipeline(config, tag="trainer")

    finished: list[float] = []

    def trained() -> bool:
        rows = {r["name"]: r for r in request(pipe.run_dir, "status")["stages"]}
        done = int(rows["trainer"]["records_in"])
        progress.update(task, completed=done)
        if done >= n:
            finished.append(time.time())
        return done >= n

    try:
        with pipe:
            # the rate comes from the checkpoints' own times, so polling slowly costs no accuracy; each
            # status request costs the supervisor CPU the pipeline needs (20 a second cost ~15 % here)
            wait_until(trained, 600, f"{n} records at the trainer", interval=0.5)
        # each checkpoint's metadata says when it was written and how many records the model had seen
        metas = sorted((json.loads(p.read_text()) for p in (pipe.run_dir / "checkpoints").glob("model-*.json")),
                       key=lambda m: m["records_seen"])
        metas = [m for m in metas if m["time"] <= finished[0]]     # not the one `down` makes at teardown
    finally:
        pipe.cleanup()
    first, last = metas[0], metas[-1]
    learned, elapsed = last["records_seen"] - first["records_seen"], last["time"] - first["time"]
    return {"batch_size": batch_size, "records": learned, "seconds": round(elapsed, 3),
            "records_per_s": round(learned / elapsed), "checkpoints": len(metas)}


def river_python(venv: Path, log: Any) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import river"], capture_output=True).returncode == 0:
        log(f"river: reusing the venv {venv}")
        return python
    log(f"river: creating a throwaway venv in {venv} (python -m venv, pip install river)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "river"], check=True)
    return python


def bench_river(records: list[dict[str, Any]], venv: Path, log: Any) -> dict[str, Any]:
    python = river_python(venv, log)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[r["x"], r["y"]] for r in records], f)
        data = Path(f.name)
    try:
        log(f"river: {len(records)} records, learn_one and predict_one + learn_one ...")
        proc = subprocess.run([python, "-c", RIVER_SCRIPT, str(data)], capture_output=True, text=True, check=True)
    finally:
        data.unlink()
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"records": len(records), "river_version": out["river_version"],
            "learn_one_records_per_s": round(out["learn_one"]),
            "predict_learn_one_records_per_s": round(out["predict_learn_one"]),
            "prequential_accuracy": round(out["prequential_accuracy"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--pipeline", action="store_true", help="also the trainer in a running pipeline (batch 256, 1024)")
    parser.add_argument("--no-river", action="store_true", help="skip River")
    args = parser.parse_args()

    import sklearn
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    console.print(f"building {args.records} records (generator -> normalizer) ...")
    records = build_records(args.records)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for size in BATCH_SIZES:
            subset = records[: len(records) // SLOW_FRACTION] if size == 1 else records
            results.append(bench_trainer(subset, size, progress))
            if size > 1:
                results.append(bench_trainer(subset, size, progress, columns=True))
        piped = [bench_pipeline(args.records, size, progress) for size in PIPELINE_SIZES] if args.pipeline else []
    river = None if args.no_river else bench_river(records, args.venv, console.print)

    table = Table(title="trainer records/s (SGDClassifier, test-then-train) vs River LogisticRegression")
    for col in ("learner", "batch", "records", "records/s", "prequential acc."):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"Trainer.process, {r['form']}", str(r["batch_size"]), str(r["records"]), f"{r['records_per_s']:,}",
                      str(r["prequential_accuracy"]))
    in_process = {r["batch_size"]: r["records_per_s"] for r in results if r["form"] == "columns"}
    for r in piped:
        r["vs_in_process"] = round(r["records_per_s"] / in_process[r["batch_size"]], 2)
        table.add_row("in a pipeline (up)", str(r["batch_size"]), str(r["records"]), f"{r['records_per_s']:,}",
                      f"{r['vs_in_process']:.2f} x in-process columns")
    if river is not None:
        table.add_row("river learn_one", "1", str(river["records"]), f"{river['learn_one_records_per_s']:,}", "")
        table.add_row("river predict+learn_one", "1", str(river["records"]), f"{river['predict_learn_one_records_per_s']:,}",
                      str(river["prequential_accuracy"]))
    console.print(table)
    print(json.dumps({"benchmark": "trainer", "python": platform.python_version(), "sklearn": sklearn.__version__,
                      "cpu_count": os.cpu_count(), "trainer": results, "pipeline": piped, "river": river}))


if __name__ == "__main__":
    main()
