"""How fast the trainer learns: ``Trainer.process`` records/s by batch size, beside River.

    python benchmarks/trainer.py [--records 50000] [--venv /tmp/streampipe-bench-river]

The data is the default stream (``Generator`` through ``Normalizer``), built once before any
timing. For each batch size (1, 32, 256, 1024) a fresh ``Trainer`` (SGDClassifier, its default
options, checkpoints by count only) runs ``process`` over the pre-built batches: test-then-train,
the prequential window, a checkpoint every 5000 records and the pass-through records with
their ``pred``, as in a pipeline. Batch size 1 runs on a tenth of the records (it is slow).

River (``linear_model.LogisticRegression``) is installed in a throwaway venv that this script
creates (``python -m venv`` + ``pip install river``; reused when it already has river) and run in
a subprocess on the same records, as dicts built before timing: ``learn_one`` alone, and
``predict_one`` + ``learn_one`` (test-then-train, the trainer's work).

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
    from streampipe.stages.generator import Generator
    from streampipe.stages.normalizer import Normalizer

    norm = Normalizer()
    gen = Generator(seed=11).generate()
    records: list[dict[str, Any]] = []
    while len(records) < n:
        records.extend(norm.process([r for r in itertools.islice(gen, 1024) if r is not None]))
    return records[:n]


def bench_trainer(records: list[dict[str, Any]], batch_size: int, progress: Any) -> dict[str, Any]:
    from streampipe import StageContext
    from streampipe.stages.trainer import Trainer

    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    task = progress.add_task(f"trainer, batch {batch_size:>4}", total=len(records))
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
    return {"batch_size": batch_size, "records": len(records), "seconds": round(elapsed, 3),
            "records_per_s": round(len(records) / elapsed), "prequential_accuracy": stats["metric"],
            "checkpoints": stats["model_version"]}


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
    river = bench_river(records, args.venv, console.print)

    table = Table(title="trainer records/s (SGDClassifier, test-then-train) vs River LogisticRegression")
    for col in ("learner", "batch", "records", "records/s", "prequential acc."):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row("streampipe Trainer", str(r["batch_size"]), str(r["records"]), f"{r['records_per_s']:,}",
                      str(r["prequential_accuracy"]))
    table.add_row("river learn_one", "1", str(river["records"]), f"{river['learn_one_records_per_s']:,}", "")
    table.add_row("river predict+learn_one", "1", str(river["records"]), f"{river['predict_learn_one_records_per_s']:,}",
                  str(river["prequential_accuracy"]))
    console.print(table)
    print(json.dumps({"benchmark": "trainer", "python": platform.python_version(), "sklearn": sklearn.__version__,
                      "cpu_count": os.cpu_count(), "trainer": results, "river": river}))


if __name__ == "__main__":
    main()
