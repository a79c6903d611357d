"""The trainer: learns test-then-train, checkpoints atomically, resumes, skips damaged checkpoints."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from loguru import logger

from streampipe.stages.builtins import checkpoints
from streampipe.stages.builtins.generator import Generator
from streampipe.stages.builtins.normalizer import Normalizer
from streampipe.stages.builtins.trainer import Trainer
from streampipe.testing import run_stage


def stream(n: int, seed: int = 5, batch: int = 250, holdout: float = 0.0, drift_at: int | None = None,
           ) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """The default stream through a Normalizer: (training batches, hold-out batches)."""
    norm = Normalizer(holdout=holdout)
    gen = Generator(seed=seed, drift_at=drift_at).generate()
    train, hold = [], []
    for _ in range(0, n, batch):
        out = norm.process([r for r in itertools.islice(gen, batch) if r is not None])
        train.append([r for r in out if norm.route(r) == "default"])
        hold.append([r for r in out if norm.route(r) == "holdout"])
    return train, hold


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING", format="{message}")
    yield messages
    logger.remove(sink)


def versions(run_dir: Path) -> list[int]:
    return sorted(checkpoints.scan(run_dir / "checkpoints"))


def test_learns_far_above_chance(tmp_path: Path) -> None:
    train, _ = stream(20_000)
    trainer = Trainer(checkpoint_seconds=0)
    run = run_stage(trainer, train, run_dir=tmp_path)
    stats = trainer.stats()
    assert stats["records_seen"] == 20_000
    assert stats["metric_name"] == "accuracy"
    assert stats["metric"] > 0.85          # chance is ~0.5; the stream has 5 % label noise
    assert len(run.records) == 20_000 and not run.dead_letters
    assert "pred" not in run.records[0] and run.records[-1]["pred"] in (0, 1)


def test_checkpoints_load_with_joblib_and_predict(tmp_path: Path) -> None:
    train, _ = stream(6000)
    run_stage(Trainer(checkpoint_every=2000, checkpoint_seconds=0), train, run_dir=tmp_path)
    folder = tmp_path / "checkpoints"
    assert versions(tmp_path) == [1, 2, 3]
    model = joblib.load(folder / "model-000003.joblib")
    X = np.asarray([r["x"] for r in train[-1]])
    assert set(model.predict(X).tolist()) <= {0, 1}
    meta = json.loads((folder / "model-000003.json").read_text())
    assert meta["version"] == 3 and meta["records_seen"] == 6000
    assert meta["metric_name"] == "accuracy" and 0.5 < meta["metric"] <= 1
    assert meta["estimator"] == "sklearn.linear_model.SGDClassifier" and meta["params"]["loss"] == "log_loss"
    assert meta["features"] == "x" and meta["n_features"] == 8 and meta["classes"] == [0, 1]
    seen = [json.loads((folder / f"model-{v:06d}.json").read_text())["records_seen"] for v in (1, 2, 3)]
    assert seen == [2000, 4000, 6000]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_keeps_only_the_newest_checkpoints(tmp_path: Path) -> None:
    train, _ = stream(6000)
    run_stage(Trainer(checkpoint_every=1000, checkpoint_seconds=0, keep=2), train, run_dir=tmp_path)
    assert versions(tmp_path) == [5, 6]


def test_resume_continues_version_and_records_seen(tmp_path: Path) -> None:
    train, _ = stream(5000)
    run_stage(Trainer(checkpoint_every=1000, checkpoint_seconds=0), train[:12], run_dir=tmp_path)
    assert versions(tmp_path) == [1, 2, 3]
    again = Trainer(checkpoint_every=1000, checkpoint_seconds=0)
    run = run_stage(again, train[12:], run_dir=tmp_path)
    assert again.stats()["records_seen"] == 5000
    assert versions(tmp_path) == [1, 2, 3, 4, 5]
    assert "pred" in run.records[0]          # the resumed model predicts from its first batch
    assert again.stats()["metric"] > 0.8


def test_truncated_checkpoint_is_skipped(tmp_path: Path, warnings_logged: list[str]) -> None:
    train, _ = stream(3000)
    run_stage(Trainer(checkpoint_every=1000, checkpoint_seconds=0), train, run_dir=tmp_path)
    newest = tmp_path / "checkpoints" / "model-000003.joblib"
    newest.write_bytes(newest.read_bytes()[:100])
    again = Trainer(checkpoint_every=1000, checkpoint_seconds=0)
    run_stage(again, [], run_dir=tmp_path, teardown=False)
    assert again.version == 2 and again.records_seen == 2000 and again.next_version == 4
    assert any("version 3" in m for m in warnings_logged)
    again.process(train[0])
    assert again.checkpoint() == 4


def test_checkpoint_without_metadata_is_not_loaded(tmp_path: Path, warnings_logged: list[str]) -> None:
    train, _ = stream(2000)
    run_stage(Trainer(checkpoint_every=1000, checkpoint_seconds=0), train, run_dir=tmp_path)
    (tmp_path / "checkpoints" / "model-000002.json").unlink()      # killed between the two files
    again = Trainer()
    run_stage(again, [], run_dir=tmp_path, teardown=False)
    assert again.version == 1 and again.next_version == 3
    assert any("incomplete" in m for m in warnings_logged)
    again.process(train[0])
    assert again.checkpoint() == 3 and versions(tmp_path) == [1, 3]      # the leftover is pruned


def test_bad_records_are_dead_lettered(tmp_path: Path) -> None:
    train, _ = stream(500)
    good = train[0][:5]
    bad = [{"id": 900, "x": [1.0, 2.0], "y": 0}, {"id": 901, "x": ["a"] * 8, "y": 1}, {"id": 902, "y": 0},
           {"id": 903, "x": "oops", "y": 0}, {"id": 904, "x": good[0]["x"], "y": 7},
           {"id": 905, "x": [float("nan")] * 8, "y": 1}, {"id": 906, "x": good[0]["x"]}]
    trainer = Trainer(checkpoint_seconds=0)
    run = run_stage(trainer, [good + bad, train[1]], run_dir=tmp_path)
    assert sorted(r["id"] for r, _ in run.dead_letters) == [900, 901, 902, 903, 904, 905, 906]
    reasons = " | ".join(reason for _, reason in run.dead_letters)
    for words in ("expected 8 values", "non-numeric", "missing field 'x'", "expected a vector", "not one of the classes",
                  "not finite", "missing label"):
        assert words in reasons
    assert trainer.records_seen == 5 + len(train[1])


def test_sgd_regressor(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, 8)
    batches = []
    for b in range(40):
        X = rng.normal(0, 1, (250, 8))
        y = X @ w + rng.normal(0, 0.1, 250)
        batches.append([{"id": b * 250 + i, "x": X[i].tolist(), "y": float(y[i])} for i in range(250)])
    trainer = Trainer(estimator="sklearn.linear_model.SGDRegressor", checkpoint_every=5000, checkpoint_seconds=0)
    run_stage(trainer, batches, run_dir=tmp_path)
    stats = trainer.stats()
    assert stats["metric_name"] == "mae" and stats["metric"] < 0.2 * np.abs(w).sum()
    meta = checkpoints.load_newest(tmp_path / "checkpoints")
    assert meta is not None and meta.meta["task"] == "regression" and meta.meta["classes"] is None
    assert isinstance(meta.model.predict(np.zeros((1, 8)))[0], float)


def test_is_a_sink_when_nothing_is_downstream(tmp_path: Path) -> None:
    train, _ = stream(500)
    run = run_stage(Trainer(checkpoint_seconds=0), train, run_dir=tmp_path, context={"outputs": ()})
    assert run.records == []


def test_estimator_must_learn_online(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="partial_fit"):
        run_stage(Trainer(estimator="sklearn.linear_model.LogisticRegression"), [], run_dir=tmp_path)
    with pytest.raises(ValueError):
        Trainer(checkpoint_every=0)
