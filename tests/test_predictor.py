"""The predictor: every record scored by the trainer's newest valid checkpoint, swapped live.

In process (exact): predictions and probabilities equal ``model.predict`` / ``predict_proba`` of
the checkpoint that the record names, records and columns alike; a new version serves from the
next batch; a torn or garbage checkpoint, or one that loads but cannot predict, is skipped with a
logged reason while the previous version keeps serving; records pass with nulls before any
checkpoint; a record without features is dead-lettered; options are checked by ``validate``.

With real processes: generator -> normalizer -> trainer, and normalizer -> predictor -> consumer.
Every record at the sink carries a prediction and a version; versions never go back and rise
over the run with the predictor never restarted; garbage written as the newest checkpoint is
skipped (its log says why) and never named by a record; sampled records' predictions equal the
named checkpoint's ``predict`` on their features.

A/B and shadow: a pinned version or a second trainer's newest scores the same records under
``shadow_`` fields (each equal to its own checkpoint's ``predict``), a shadow that cannot score
gives nulls and never fails a batch; the ``compare`` sink's accuracy per side and agreement equal
what the records say; and in real processes, two trainers, the hold-out slice scored by both and
compared, nothing restarted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import SGDClassifier, SGDRegressor

from streampipe.stages.api import StageContext
from streampipe.stages.builtins import checkpoints
from streampipe.stages.builtins.compare import Compare
from streampipe.stages.builtins.predictor import Predictor
from streampipe.stages.builtins.trainer import Trainer
from streampipe.stages.columns import Columns
from streampipe.testing import run_stage
from tests.conftest import wait_for
from tests.test_trainer import stream, warnings_logged  # noqa: F401 - the fixture is used by name


def started(stage: Any, run_dir: Path) -> Any:
    stage.context = StageContext(run_dir=run_dir)
    stage.setup()
    return stage


def features(batch: list[dict[str, Any]]) -> np.ndarray:
    return np.asarray([r["x"] for r in batch], dtype=float)


def assert_matches_checkpoint(records: list[dict[str, Any]], folder: Path) -> None:
    """Each record's prediction (and probabilities) is what its named checkpoint says of its features."""
    by_version: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_version.setdefault(r["model_version"], []).append(r)
    for version, rs in by_version.items():
        model = checkpoints.load(folder, version).model
        X = features(rs)
        assert [r["prediction"] for r in rs] == model.predict(X).tolist(), f"version {version}"
        np.testing.assert_allclose([r["probabilities"] for r in rs], model.predict_proba(X), rtol=1e-12, atol=0)


def test_scores_with_the_newest_checkpoint_and_swaps_between_batches(tmp_path: Path) -> None:
    train, _ = stream(12_000)
    trainer = started(Trainer(checkpoint_every=10**9, checkpoint_seconds=0), tmp_path)
    pred = started(Predictor(poll_seconds=0), tmp_path)
    folder = tmp_path / "checkpoints"
    out: list[dict[str, Any]] = []
    for i, batch in enumerate(train):
        trainer.process(batch)
        if i % 12 == 11:
            trainer.checkpoint()
        out.extend(pred.process(batch))
    assert len(out) == sum(len(b) for b in train)
    versions = [r["model_version"] for r in out]
    scored = [v for v in versions if v is not None]
    assert versions[:len(versions) - len(scored)] == [None] * (len(versions) - len(scored))   # nulls first only
    assert scored == sorted(scored) and set(scored) == {1, 2, 3, 4}
    assert all(r["prediction"] is None and r["probabilities"] is None for r in out if r["model_version"] is None)
    assert_matches_checkpoint([r for r in out if r["model_version"] is not None], folder)
    # one version per batch: the swap happens between two batches
    at = 0
    for batch in train:
        assert len({r["model_version"] for r in out[at:at + len(batch)]}) == 1
        at += len(batch)
    assert pred.stats() == {"model_version": 4, "scored": len(scored), "unscored": len(out) - len(scored),
                            "skipped_versions": 0}


def test_columnar_batch_goes_to_predict_as_one_array(tmp_path: Path) -> None:
    train, _ = stream(4000)
    run_stage(Trainer(checkpoint_seconds=0), train[:8], run_dir=tmp_path)
    pred = started(Predictor(poll_seconds=0), tmp_path)
    batch = train[10]
    cols = Columns.from_records(batch)
    out = pred.process(cols)
    assert isinstance(out, Columns)
    assert out["prediction"].dtype == np.int64 and out["probabilities"].shape == (len(batch), 2)
    assert out["model_version"].tolist() == [1] * len(batch)
    assert out.to_records() == pred.process(batch)       # the same answers as record by record
    assert_matches_checkpoint(out.to_records(), tmp_path / "checkpoints")


def test_a_regressor_gets_values_and_no_probabilities(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(0, 1, (500, 3))
    model = SGDRegressor(random_state=0).fit(X, X @ [1.0, -2.0, 0.5])
    checkpoints.save(tmp_path / "checkpoints", 1, model, {"features": "f", "n_features": 3})
    pred = started(Predictor(poll_seconds=0), tmp_path)
    out = pred.process([{"id": i, "f": X[i].tolist()} for i in range(20)])
    assert [r["prediction"] for r in out] == model.predict(X[:20]).tolist()
    assert all("probabilities" not in r and r["model_version"] == 1 for r in out)


def test_a_bad_newest_checkpoint_is_skipped_and_the_previous_keeps_serving(
        tmp_path: Path, warnings_logged: list[str]) -> None:  # noqa: F811
    train, _ = stream(6000)
    run_stage(Trainer(checkpoint_every=2000, checkpoint_seconds=0), train[:8], run_dir=tmp_path)   # v1
    folder = tmp_path / "checkpoints"
    pred = started(Predictor(poll_seconds=0), tmp_path)
    assert {r["model_version"] for r in pred.process(train[9])} == {1}
    # garbage as the newest version: model and metadata files of random bytes, then a torn one
    (folder / "model-000002.joblib").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "model-000002.json").write_bytes(b"\x00\xffnot json")
    good = checkpoints.load(folder, 1).model
    checkpoints.save(folder, 3, good, checkpoints.read_meta(folder, 1))
    torn = folder / "model-000003.joblib"
    torn.write_bytes(torn.read_bytes()[:-7])
    # a version that loads but cannot predict: a model of 3 features where records have 8
    narrow = SGDClassifier(loss="log_loss").fit(np.zeros((4, 3)) + [[0], [1], [0], [1]], [0, 1, 0, 1])
    checkpoints.save(folder, 4, narrow, {"features": "x"})
    out = pred.process(train[10])
    assert {r["model_version"] for r in out} == {1}
    assert_matches_checkpoint(out, folder)
    assert pred.follower.bad == {2, 3, 4}
    said = "\n".join(warnings_logged)
    assert "version 2: unreadable metadata" in said and "version 3: model file has" in said
    assert "version 4 fails to predict (ValueError: X has 8 features" in said and "version 1 keeps serving" in said
    assert str(train[10][0]["x"][0]) not in said             # no user data in the log
    checkpoints.save(folder, 5, good, checkpoints.read_meta(folder, 1))       # a valid newer one serves
    assert {r["model_version"] for r in pred.process(train[14])} == {5}
    assert pred.stats()["skipped_versions"] == 3


def test_pinned_version_scores_beside_the_newest(tmp_path: Path, warnings_logged: list[str]) -> None:  # noqa: F811
    train, _ = stream(8000)
    trainer = started(Trainer(checkpoint_every=10**9, checkpoint_seconds=0), tmp_path)
    pred = started(Predictor(poll_seconds=0, pinned=2), tmp_path)
    folder = tmp_path / "checkpoints"
    trainer.process(train[0])
    trainer.checkpoint()                                                  # v1 only: the pinned v2 is not there
    out = pred.process(train[1])
    assert {(r["model_version"], r["shadow_model_version"]) for r in out} == {(1, None)}
    assert all(r["shadow_prediction"] is None and r["shadow_probabilities"] is None for r in out)
    for b in train[2:6]:
        trainer.process(b)
        trainer.checkpoint()                                              # v2 .. v5
    out = pred.process(train[6])
    assert {(r["model_version"], r["shadow_model_version"]) for r in out} == {(5, 2)}
    assert_matches_checkpoint(out, folder)
    shadow = [{"model_version": 2, "prediction": r["shadow_prediction"], "probabilities": r["shadow_probabilities"],
               "x": r["x"]} for r in out]
    assert_matches_checkpoint(shadow, folder)
    # the same as columns
    cols = pred.process(Columns.from_records(train[7]))
    assert cols["shadow_model_version"].tolist() == [2] * len(train[7]) and cols["model_version"].tolist() == [5] * len(train[7])
    assert pred.stats()["shadow_version"] == 2
    assert not warnings_logged


def test_shadow_trainer_scores_the_same_records(tmp_path: Path, warnings_logged: list[str]) -> None:  # noqa: F811
    train, _ = stream(6000)
    run_stage(Trainer(checkpoint_seconds=0), train[:10], run_dir=tmp_path)                      # A: checkpoints/
    run_stage(Trainer(checkpoint_seconds=0, checkpoint_dir="other", params={"alpha": 0.01}), train[:10],
              run_dir=tmp_path)                                                                 # B: other/
    pred = started(Predictor(poll_seconds=0, shadow_dir="other", shadow_prefix="b_"), tmp_path)
    out = pred.process(train[12])
    assert {(r["model_version"], r["b_model_version"]) for r in out} == {(1, 1)}
    a = checkpoints.load(tmp_path / "checkpoints", 1).model
    b = checkpoints.load(tmp_path / "other", 1).model
    X = features(out)
    assert [r["prediction"] for r in out] == a.predict(X).tolist()
    assert [r["b_prediction"] for r in out] == b.predict(X).tolist()
    np.testing.assert_allclose([r["b_probabilities"] for r in out], b.predict_proba(X), rtol=1e-12, atol=0)
    assert not np.allclose(a.predict_proba(X), b.predict_proba(X))       # two models indeed
    # a shadow version that cannot score these rows: its fields are null, the main ones untouched
    narrow = SGDClassifier(loss="log_loss").fit(np.zeros((4, 3)) + [[0], [1], [0], [1]], [0, 1, 0, 1])
    checkpoints.save(tmp_path / "other", 2, narrow, {"features": "x"})
    out = pred.process(train[13])
    assert {(r["model_version"], r["b_model_version"]) for r in out} == {(1, 1)}    # v2 skipped: the probe failed
    assert any("version 2 fails to predict" in m for m in warnings_logged)
    with pytest.raises(ValueError, match="not both"):
        Predictor(pinned=1, shadow_dir="other")


def test_compare_scores_both_sides_on_the_same_records(tmp_path: Path) -> None:
    train, hold = stream(12_000, holdout=0.3)
    run_stage(Trainer(checkpoint_seconds=0), train, run_dir=tmp_path)
    run_stage(Trainer(checkpoint_seconds=0, checkpoint_dir="other", params={"alpha": 0.05}), train[:4], run_dir=tmp_path)
    scored = run_stage(Predictor(poll_seconds=0, shadow_dir="other"), hold, run_dir=tmp_path).records
    cmp = started(Compare(window=500, every=10**9), tmp_path)
    for i in range(0, len(scored), 200):
        cmp.process(Columns.from_records(scored[i:i + 200]) if i % 400 else scored[i:i + 200])   # both forms
    last = scored[-500:]
    y = [r["y"] for r in last]
    row = cmp.write_row()
    assert row["task"] == "classification" and row["records"] == len(scored)
    assert row["main"] == {"model_version": 2, "accuracy": pytest.approx(np.mean([r["prediction"] == t for r, t in zip(last, y)]), abs=1e-6),
                           "window": 500}
    assert row["shadow"]["model_version"] == 1
    assert row["shadow"]["accuracy"] == pytest.approx(np.mean([r["shadow_prediction"] == t for r, t in zip(last, y)]), abs=1e-6)
    assert row["agreement"] == pytest.approx(np.mean([r["prediction"] == r["shadow_prediction"] for r in last]), abs=1e-6)
    cmp.teardown()
    rows = [json.loads(line) for line in (tmp_path / "compare.jsonl").read_text().splitlines()]
    assert rows[-1]["main"] == row["main"]
    assert cmp.stats()["shadow_version"] == 1 and cmp.stats()["metric_name"] == "accuracy"


def test_no_label_needed_and_a_record_without_features_is_dead_lettered(tmp_path: Path) -> None:
    train, _ = stream(3000)
    run_stage(Trainer(checkpoint_seconds=0), train, run_dir=tmp_path)
    batch = [{k: v for k, v in r.items() if k != "y"} for r in train[0][:50]]
    run = run_stage(Predictor(poll_seconds=0), [[*batch, {"id": -1, "x": "nope"}, {"id": -2}]], run_dir=tmp_path)
    assert [r["id"] for r in run.records] == [r["id"] for r in batch]
    assert {r["id"] for r, _ in run.dead_letters} == {-1, -2}
    assert all(r["model_version"] == 1 for r in run.records)


def test_options_are_checked_by_validate(tmp_path: Path) -> None:
    from streampipe.launcher.config import load_config
    from streampipe.launcher.errors import ConfigError

    config = tmp_path / "services.yaml"
    base = "pipeline: p\nstages:\n  gen: {type: generator}\n  pred:\n    type: predictor\n    inputs: [gen]\n"
    config.write_text(base + "    options: {checkpoint_dri: ckpt}\n")
    with pytest.raises(ConfigError, match="unknown option 'checkpoint_dri' \\(did you mean 'checkpoint_dir'\\?\\)"):
        load_config(config)
    config.write_text(base + "    options: {poll_seconds: soon}\n")
    with pytest.raises(ConfigError, match="poll_seconds"):
        load_config(config)
    config.write_text(base + "    options: {pinned: 3, shadow_dir: other}\n")
    with pytest.raises(ConfigError, match="stages.pred.options.pinned.*not both"):
        load_config(config)
    config.write_text(base + "    options: {checkpoint_dir: ckpt, probabilities: null, poll_seconds: 1, pinned: 2}\n")
    load_config(config)
    with pytest.raises(ValueError, match="distinct"):
        Predictor(prediction="y", version_field="y")


PIPELINE = """
pipeline: serve-stream
defaults: {heartbeat_timeout: 60}
stages:
  generator: {type: generator, options: {rate: 1500, seed: 3}}
  normalizer: {type: normalizer, inputs: [generator]}
  trainer:
    type: trainer
    inputs: [normalizer]
    options: {checkpoint_every: 1500, checkpoint_seconds: 0, keep: 1000}
  predictor: {type: predictor, inputs: [normalizer], options: {poll_seconds: 0.2}}
  sink: {type: consumer, inputs: [predictor], options: {output: output/records.jsonl}}
"""


@pytest.mark.timeout(330)
def test_pipeline_every_record_scored_versions_rise_without_a_restart(pipeline) -> None:
    p = pipeline(PIPELINE)
    p.up()
    folder = p.run_dir / "checkpoints"
    log = p.run_dir / "logs" / "predictor.0.jsonl"
    wait_for(lambda: checkpoints.latest_version(folder) >= 3, timeout=60, what="three checkpoints")
    # garbage as the newest checkpoint, far above the trainer's numbers: the trainer goes on below it
    bad = checkpoints.latest_version(folder) + 1000
    checkpoints.model_path(folder, bad).write_bytes(np.random.default_rng(1).bytes(5000))
    checkpoints.meta_path(folder, bad).write_text(json.dumps({"version": bad, "features": "x", "n_features": 8}))
    wait_for(lambda: f"version {bad}: joblib.load failed" in log.read_text(), timeout=120, what="the skip logged")
    after = bad - 1000 + 2
    wait_for(lambda: p.row("predictor")["stats"].get("model_version", 0) >= after, timeout=120,
             what=f"version {after}, written after the garbage, serving")
    row = p.row("predictor")
    assert row["restarts"] == 0 and row["state"] == "running"
    p.down()

    records = p.output_records()
    assert len(records) > 5000
    assert all("prediction" in r and "model_version" in r for r in records)
    versions = [r["model_version"] for r in records]
    unscored = versions.index(next(v for v in versions if v is not None))
    assert all(v is None for v in versions[:unscored])          # only before the first checkpoint
    scored = versions[unscored:]                                # in the order the predictor sent them
    assert None not in scored and scored == sorted(scored)      # never back, never a gap
    assert len(set(scored)) >= 5 and bad not in scored
    skip_line = next(json.loads(x)["record"] for x in log.read_text().splitlines() if f"version {bad}" in x)
    assert skip_line["level"]["name"] == "WARNING" and "skipping checkpoint" in skip_line["message"]
    # a sample per version: the prediction is what that checkpoint's model says of the record's features
    rng = np.random.default_rng(2)
    sample = [r for r in records[unscored:] if rng.random() < 0.05]
    assert_matches_checkpoint(sample, folder)


AB_PIPELINE = """
pipeline: ab
defaults: {heartbeat_timeout: 60}
stages:
  generator: {type: generator, options: {rate: 2000, seed: 4}}
  normalizer: {type: normalizer, inputs: [generator], options: {holdout: 0.25}}
  trainer: {type: trainer, inputs: [normalizer], options: {checkpoint_every: 2000, checkpoint_seconds: 0}}
  trainer_b:
    type: trainer
    inputs: [normalizer]
    options: {checkpoint_every: 3000, checkpoint_seconds: 0, checkpoint_dir: checkpoints-b, params: {alpha: 0.01}}
  scored: {type: predictor, inputs: [normalizer.holdout], options: {shadow_dir: checkpoints-b, poll_seconds: 0.2}}
  compare: {type: compare, inputs: [scored], options: {every: 200, window: 500}}
  evaluator: {type: evaluator, inputs: [normalizer.holdout], options: {every: 200}}
"""


@pytest.mark.timeout(120)
def test_pipeline_shadow_trainer_compared_on_the_hold_out_slice(pipeline) -> None:
    p = pipeline(AB_PIPELINE)
    p.up()
    path = p.run_dir / "compare.jsonl"

    def rows() -> list[dict[str, Any]]:
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    wait_for(lambda: any(r["main"]["model_version"] and r["main"]["model_version"] >= 3
                         and r["shadow"]["model_version"] and r["shadow"]["model_version"] >= 2
                         and r["main"]["window"] >= 200 and r["shadow"]["window"] >= 200 for r in rows()),
             timeout=90, what="both sides scored, v3 / v2")
    row, scorer = p.row("compare"), p.row("scored")
    p.down()
    last = rows()[-1]
    # the figures of a settled row: the last row may be the teardown's, a few records after a new version
    settled = [r for r in rows() if r["main"]["window"] >= 200 and r["shadow"]["window"] >= 200][-1]
    assert last["task"] == "classification" and settled["agreement"] > 0.8
    assert settled["main"]["accuracy"] > 0.8 and settled["shadow"]["accuracy"] > 0.8
    assert row["stats"]["shadow_version"] >= 2 and scorer["stats"]["shadow_version"] >= 2
    assert row["restarts"] == 0 and scorer["restarts"] == 0
    from streampipe.launcher.report import make_report

    summary = make_report(p.run_dir, p.folder / "report.png")
    assert f"A/B (compare.jsonl, {last['records']} records): main v{last['main']['model_version']} accuracy" in summary
