"""``make_report``: a PNG and a summary from metrics.jsonl, status-history.jsonl and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streampipe.launcher.report import MAX_VERSION_LINES, figure, make_report, throughput_from_history
from streampipe.stages.builtins.evaluator import Evaluator
from streampipe.stages.builtins.trainer import Trainer
from streampipe.testing import run_stage
from tests.conftest import cli
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
    assert "records/s" in summary and "figure:" not in summary, "the CLI says where it wrote, once"


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


def _many_versions(folder: Path, versions: int = 100) -> None:
    rows = [{"time": 100.0 + i, "model_version": 1 + i // 3, "records_evaluated": 200 * (i + 1),
             "metrics": {"accuracy": 0.9 + (i % 7) / 100, "log_loss": 0.2 + (i % 5) / 50}, "drift": i == 150,
             "trained_records": 3000 * (1 + i // 3), "checkpoint_time": 99.0 + 3 * (i // 3)} for i in range(3 * versions)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_hundred_versions_do_not_curtain_the_plot(tmp_path: Path) -> None:
    """issue 27: ~100 dotted version lines hid the curves, and the legend sat on the drift line."""
    _many_versions(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fig = figure(rows, [], ["accuracy", "log_loss"], 100.0, "a run")
    fig.canvas.draw()
    ax = fig.axes[0]
    dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert 2 <= len(dotted) <= MAX_VERSION_LINES
    labelled = sorted(int(t.get_text()[1:]) for t in ax.texts if t.get_text().startswith("v"))
    assert labelled[0] == 1 and labelled[-1] == 100 and len(labelled) == len(dotted)
    ticks = [line for line in ax.lines if line.get_marker() == "|"]
    assert len(ticks) == 1 and len(ticks[0].get_xdata()) == 100, "every version change still has its tick"
    drift = [line for line in ax.lines if line.get_color() == "red"]
    assert [line.get_xdata()[0] for line in drift] == [150.0]
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for axes in fig.axes:
        assert not legend.overlaps(axes.get_window_extent(renderer)), "the legend is beside the plot, not on it"
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"accuracy", "log_loss", "drift", "each new version"}


def test_report_cli_says_once_where_it_wrote(tmp_path: Path) -> None:
    _many_versions(tmp_path, versions=5)
    out = tmp_path / "r.png"
    proc = cli("report", "--run-dir", str(tmp_path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if str(out) in line] == [f"wrote {out}"] == lines[-1:]
    assert "model versions 1..5" in lines[0]
    assert out.read_bytes()[:8] == PNG_MAGIC
