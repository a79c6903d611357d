"""``make_report``: a PNG and a summary from metrics.jsonl, status-history.jsonl and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streampipe.launcher.report import make_report, throughput_from_history
from streampipe.stages.builtins.evaluator import Evaluator
from streampipe.stages.builtins.trainer import Trainer
from streampipe.testing import run_stage
from tests.test_trainer import stream

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_of_a_run_with_drift(tmp_path: Path) -> None:
    train, hold = stream(12_000, holdout=0.2)
    run_stage(Trainer(checkpoint_every=3000, checkpoint_seconds=0), train, run_dir=tmp_path)
    _, shifted = stream(20_000, holdout=0.2, drift_at=8000)
    run_stage(Evaluator(every=200, poll_seconds=0), hold + shifted, run_dir=tmp_path)
    out = tmp_path / "out" / "report.png"
    summary = make_report(tmp_path, out)
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    lines = summary.splitlines()
    assert "model versions 4..4" in lines[0]
    assert lines[1].startswith("accuracy (hold-out): first 0.9")
    assert lines[2].startswith("drift: 1 point") or lines[2].startswith("drift: 2 points")
    assert "records/s" in summary and str(out) in lines[-1]


def test_throughput_from_status_history(tmp_path: Path) -> None:
    rows = [{"time": 100.0 + 2 * i, "stages": {"trainer.0": {"in": 1000 * i, "out": 0, "state": "running"},
                                                 "consumer.0": {"in": 5, "out": 0}}} for i in range(5)]
    rows[3]["stages"]["trainer.0"]["in"] = 200          # the trainer restarted: its counter began again
    assert throughput_from_history(rows, "trainer") == [(102.0, 500.0), (104.0, 500.0), (106.0, 100.0), (108.0, 1900.0)]
    (tmp_path / "status-history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"time": 101.0, "model_version": 1, "records_evaluated": 500,
                                                        "metrics": {"mae": 0.5, "rmse": 0.7, "r2": 0.9}, "drift": False}) + "\n")
    summary = make_report(tmp_path, tmp_path / "r.png")
    assert "mae (hold-out): first 0.5, last 0.5, best 0.5" in summary
    assert "750 records/s mean while busy, 1900 peak (from status-history)" in summary
    assert "drift: none detected" in summary


def test_no_metrics_yet(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no metrics yet"):
        make_report(tmp_path, tmp_path / "r.png")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="evaluator"):
        make_report(tmp_path, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
