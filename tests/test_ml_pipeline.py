"""Trainer and evaluator in the real pipeline: checkpoints, metrics, resume after SIGKILL, report."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import joblib
import numpy as np

from streampipe.stages.builtins.normalizer import Normalizer
from tests.conftest import cli, wait_for

ML = """\
pipeline: ml
stages:
  generator:
    type: generator
    options: {{count: {count}, rate: {rate}, seed: 11, drift_at: {drift}}}
  normalizer:
    type: normalizer
    inputs: [generator]
    options: {{holdout: 0.1}}
  trainer:
    type: trainer
    inputs: [normalizer]
    options: {{checkpoint_every: 2000, checkpoint_seconds: 0, keep: 100{extra}}}
  seen_by_trainer:
    type: consumer
    inputs: [trainer]
    options: {{output: output/trained.jsonl}}
  evaluator:
    type: evaluator
    inputs: [normalizer.holdout]
    options: {{every: 100}}
"""


def metrics(p) -> list[dict]:
    path = p.run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def test_pipeline_learns_and_evaluates_on_holdout(pipeline, tmp_path: Path) -> None:
    p = pipeline(ML.format(count=40000, rate=5000, drift=10**9, extra=""))
    p.up()
    wait_for(lambda: p.row("generator")["state"] == "completed", timeout=120, what="the stream to complete")
    wait_for(lambda: len(p.output_ids("output/trained.jsonl")) >= 35000, timeout=60, what="the trainer to see its share")
    # hold-out records never reach the trainer
    holdout = Normalizer(holdout=0.1)
    trained = p.output_ids("output/trained.jsonl")
    assert not [i for i in trained if holdout.route({"id": i}) == "holdout"]
    assert len(set(trained)) == sum(1 for i in range(40000) if holdout.route({"id": i}) == "default")
    # checkpoints load with joblib and predict
    ckpts = sorted((p.run_dir / "checkpoints").glob("model-*.joblib"))
    assert len(ckpts) >= 10
    model = joblib.load(ckpts[-1])
    meta = json.loads(ckpts[-1].with_suffix(".json").read_text())
    assert meta["version"] == int(ckpts[-1].stem.split("-")[1]) and meta["records_seen"] >= 30000
    assert set(np.unique(model.predict(np.random.default_rng(0).normal(size=(50, 8))))) <= {0, 1}
    # metrics rows carry increasing versions, and hold-out accuracy ends far above chance
    rows = wait_for(lambda: (r := metrics(p)) and r[-1]["model_version"] >= 10 and r, timeout=60, what="metrics of late versions")
    versions = [r["model_version"] for r in rows]
    assert versions == sorted(versions) and len(set(versions)) >= 3
    assert rows[-1]["metrics"]["accuracy"] > 0.85
    status = p.row("trainer")
    assert status["stats"]["model_version"] == meta["version"] or status["stats"]["model_version"] >= meta["version"]
    # the report
    out = tmp_path / "report.png"
    proc = cli("report", "--config", str(p.config), "--out", str(out), cwd=p.folder, check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "accuracy" in proc.stdout


def test_killed_trainer_resumes_from_newest_checkpoint(pipeline) -> None:
    p = pipeline(ML.format(count=10**9, rate=3000, drift=10**9, extra=""))
    p.up()
    wait_for(lambda: (p.row("trainer")["stats"] or {}).get("model_version", 0) >= 3, timeout=60, what="three checkpoints")
    before = p.row("trainer")["stats"]
    old = p.row("trainer")["pid"]
    os.kill(old, signal.SIGKILL)
    row = wait_for(lambda: (r := p.row("trainer"))["pid"] not in (None, old) and r["state"] == "running" and r.get("stats") and r,
                   timeout=60, what="the trainer back")
    after = row["stats"]
    assert after["model_version"] >= before["model_version"], "versions continue, they do not restart at 1"
    assert after["records_seen"] >= 2000 * before["model_version"] - 2000
    wait_for(lambda: p.row("trainer")["stats"]["model_version"] > after["model_version"], timeout=60, what="a new version")
    logged = (p.run_dir / "logs" / "trainer.0.jsonl").read_text()
    assert "resum" in logged.lower() or "loaded" in logged.lower()


def test_regression_with_sgd_regressor(pipeline, tmp_path: Path) -> None:
    (tmp_path / "regress.py").write_text(textwrap.dedent("""
        from streampipe import Stage

        class Target(Stage):
            '''y becomes a real-valued linear function of x.'''
            def process(self, batch):
                return [{**r, "y": 3.0 * r["x"][0] - 2.0 * r["x"][1] + 0.5} for r in batch]
    """))
    p = pipeline("""\
        pipeline: reg
        stages:
          generator: {type: generator, options: {count: 20000, rate: 4000, seed: 2}}
          normalizer: {type: normalizer, inputs: [generator], options: {holdout: 0.1, schema: {id: int, x: vector}}}
          target: {type: "regress:Target", inputs: [normalizer]}
          target_holdout: {type: "regress:Target", inputs: [normalizer.holdout]}
          trainer:
            type: trainer
            inputs: [target]
            options: {estimator: sklearn.linear_model.SGDRegressor, checkpoint_every: 2000, checkpoint_seconds: 0}
          evaluator: {type: evaluator, inputs: [target_holdout], options: {every: 100}}
    """)
    p.up()
    rows = wait_for(lambda: (r := metrics(p)) and r[-1]["model_version"] >= 5 and r, timeout=120, what="regression metrics")
    assert {"mae", "rmse", "r2"} <= set(rows[-1]["metrics"])
    assert rows[-1]["metrics"]["r2"] > 0.9
