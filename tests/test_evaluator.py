"""The evaluator (checkpoints -> metrics.jsonl) and the Page-Hinkley drift detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streampipe.stages.api import StageContext
from streampipe.stages.builtins.drift import PageHinkley
from streampipe.stages.builtins.evaluator import Evaluator
from streampipe.stages.builtins.trainer import Trainer
from streampipe.testing import run_stage
from tests.test_trainer import stream, warnings_logged  # noqa: F401 - the fixture is used by name


def started(stage: Any, run_dir: Path) -> Any:
    stage.context = StageContext(run_dir=run_dir)
    stage.setup()
    return stage


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rows_follow_new_versions(tmp_path: Path) -> None:
    train, hold = stream(16_000, holdout=0.25)
    trainer = started(Trainer(checkpoint_every=10**9, checkpoint_seconds=0), tmp_path)
    ev = started(Evaluator(every=300, poll_seconds=0), tmp_path)
    for i in range(0, len(train), 16):        # a checkpoint every 4000 records, evaluated on what follows
        for b in train[i:i + 16]:
            trainer.process(b)
        trainer.checkpoint()
        for b in hold[i:i + 16]:
            ev.process(b)
    ev.teardown()
    got = rows(tmp_path)
    versions = [r["model_version"] for r in got]
    assert versions == sorted(versions) and set(versions) == {1, 2, 3, 4}
    evaluated = [r["records_evaluated"] for r in got]
    assert evaluated == sorted(evaluated) and evaluated[-1] == sum(len(b) for b in hold)
    for r in got:
        assert set(r["metrics"]) == {"accuracy", "f1", "log_loss"} and isinstance(r["drift"], bool)
        assert isinstance(r["time"], float)
    assert got[-1]["metrics"]["accuracy"] > 0.85
    assert got[-1]["trained_records"] == 16_000 - sum(len(b) for b in hold)
    assert ev.stats() == {"model_version": 4, "metric": pytest.approx(got[-1]["metrics"]["accuracy"], abs=1e-4),
                          "metric_name": "accuracy", "drift_count": ev.drift_count, "records_evaluated": evaluated[-1]}


def test_counts_but_does_not_score_before_a_checkpoint(tmp_path: Path) -> None:
    _, hold = stream(2000, holdout=0.5)
    ev = Evaluator(poll_seconds=0)
    run_stage(ev, hold, run_dir=tmp_path)
    assert ev.records_received == sum(len(b) for b in hold) and ev.records_evaluated == 0
    assert ev.stats()["metric"] is None and ev.stats()["model_version"] == 0
    assert not (tmp_path / "metrics.jsonl").read_text()


def test_damaged_checkpoint_is_skipped(tmp_path: Path, warnings_logged: list[str]) -> None:  # noqa: F811
    train, hold = stream(4000, holdout=0.25)
    run_stage(Trainer(checkpoint_every=1000, checkpoint_seconds=0), train, run_dir=tmp_path)
    newest = tmp_path / "checkpoints" / "model-000003.joblib"
    newest.write_bytes(newest.read_bytes()[:-10])
    ev = Evaluator(every=100, poll_seconds=0)
    run_stage(ev, hold, run_dir=tmp_path)
    assert ev.version == 2 and {r["model_version"] for r in rows(tmp_path)} == {2}
    assert 3 in ev.bad_versions and any("version 3" in m for m in warnings_logged)


def test_resumes_counters_from_the_last_row(tmp_path: Path) -> None:
    train, hold = stream(4000, holdout=0.25)
    run_stage(Trainer(checkpoint_seconds=0), train, run_dir=tmp_path)
    run_stage(Evaluator(every=100, poll_seconds=0), hold[:8], run_dir=tmp_path)
    first = rows(tmp_path)[-1]["records_evaluated"]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "model_ver')                      # a line torn by a SIGKILL
    ev = Evaluator(every=100, poll_seconds=0)
    run_stage(ev, hold[8:], run_dir=tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[-1].startswith("{") and json.loads(lines[-1])["records_evaluated"] == first + sum(len(b) for b in hold[8:])


def test_regression_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, 8)

    def batch(k: int) -> list[dict[str, Any]]:
        X = rng.normal(0, 1, (200, 8))
        y = X @ w + rng.normal(0, 0.1, 200)
        return [{"id": k * 200 + i, "x": X[i].tolist(), "y": float(y[i])} for i in range(200)]

    run_stage(Trainer(estimator="sklearn.linear_model.SGDRegressor", checkpoint_seconds=0),
              [batch(k) for k in range(30)], run_dir=tmp_path)
    ev = Evaluator(every=200, poll_seconds=0)
    run_stage(ev, [batch(100 + k) for k in range(3)], run_dir=tmp_path)
    last = rows(tmp_path)[-1]["metrics"]
    assert set(last) == {"mae", "rmse", "r2"} and last["r2"] > 0.9 and last["mae"] <= last["rmse"]
    assert ev.stats()["metric_name"] == "mae"


def test_drift_in_the_stream_is_detected(tmp_path: Path, warnings_logged: list[str]) -> None:  # noqa: F811
    # The model learns the concept before the drift; the hold-out slice then crosses the drift.
    train, _ = stream(10_000)
    run_stage(Trainer(checkpoint_seconds=0), train, run_dir=tmp_path)
    _, hold = stream(40_000, holdout=0.2, drift_at=20_000)
    ev = Evaluator(every=200, poll_seconds=0)
    run_stage(ev, hold, run_dir=tmp_path)
    got = rows(tmp_path)
    flagged = [r["records_evaluated"] for r in got if r["drift"]]
    before = sum(len(b) for b in hold[:80])           # hold-out records with id < 20 000
    assert ev.drift_count >= 1 and flagged and flagged[0] > before
    assert any("drift detected" in m for m in warnings_logged)
    assert got[-1]["metrics"]["accuracy"] < 0.6        # the frozen model is now mostly wrong


def test_no_drift_on_a_stationary_stream(tmp_path: Path) -> None:
    train, _ = stream(10_000)
    run_stage(Trainer(checkpoint_seconds=0), train, run_dir=tmp_path)
    _, hold = stream(40_000, holdout=0.2, seed=5)
    ev = Evaluator(every=200, poll_seconds=0)
    run_stage(ev, hold, run_dir=tmp_path)
    assert ev.drift_count == 0 and not any(r["drift"] for r in rows(tmp_path))


def test_page_hinkley_fires_on_a_shift_only() -> None:
    rng = np.random.default_rng(3)
    calm = (rng.random(20_000) < 0.1).astype(float)
    assert PageHinkley().update_many(calm) == []
    shifted = np.r_[calm[:5000], (rng.random(2000) < 0.5).astype(float)]
    hits = PageHinkley().update_many(shifted)
    assert hits and 5000 <= hits[0] < 5300
    assert PageHinkley().update_many(np.r_[np.full(3000, 0.5), np.zeros(3000)]) == []   # getting better is no drift


def test_page_hinkley_resets_after_a_detection() -> None:
    ph = PageHinkley(threshold=5, min_instances=5)
    hits = ph.update_many([0.0] * 50 + [1.0] * 50)
    assert hits and ph.detections == len(hits) and ph.n < 50
    with pytest.raises(ValueError):
        PageHinkley(threshold=0)
