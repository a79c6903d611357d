"""``streampipe report``: one PNG and a few lines of text about how the model did in a run.

Reads ``<run dir>/metrics.jsonl`` (the evaluator's rows), ``<run dir>/status-history.jsonl``
(the supervisor's samples, if present) and the checkpoints' metadata, and draws:

- top: the hold-out metrics over time (accuracy / F1 / log-loss, or MAE / RMSE / R2), a dotted
  line where the evaluated model version changes (with more than :data:`MAX_VERSION_LINES`
  versions, that many lines spread over the run and a tick on the top edge at every change), a
  red line at each drift detection; the legend beside the plot, where it hides nothing;
- bottom: the trainer's throughput in records/s, from status-history (records in of the
  trainer's replicas between samples) or, without it, from the checkpoints (records seen
  between two versions).

With a ``compare`` sink in the run (``compare.jsonl``), the summary also says how the
predictor's two sides (A/B, shadow) did on the same records; with a ``label_join`` sink
(``served.jsonl``), how the served predictions did against the labels that came later.

>>> import json, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> rows = [{"time": 100.0 + i, "model_version": 1 + i // 2, "records_evaluated": 500 * (i + 1),
...          "metrics": {"accuracy": 0.8 + i / 100, "f1": 0.8}, "drift": i == 3,
...          "trained_records": 5000 * (1 + i // 2), "checkpoint_time": 99.0 + i // 2 * 2} for i in range(6)]
>>> _ = (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
>>> print(make_report(d, d / "report.png"))  # doctest: +ELLIPSIS
run .../tmp...: 6 evaluations, 3000 hold-out records scored, model versions 1..3
accuracy (hold-out): first 0.8, last 0.85, best 0.85 (version 3)
drift: 1 point: at 3.0 s (version 2, 2000 records evaluated)
trainer throughput: 2500 records/s mean while busy, 2500 peak (from checkpoint metadata)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streampipe._rotating import files_of, last_row
from streampipe._rotating import read_json_lines as read_jsonl  # status history rotates
from streampipe.launcher import report_windows

# metric -> which way is better; the first one a run has is the headline (accuracy, else MAE)
PRIMARY = {"accuracy": "higher", "mae": "lower", "f1": "higher", "rmse": "lower", "r2": "higher", "log_loss": "lower"}
SCORES = {"accuracy", "f1", "r2"}          # 0..1, higher is better: they share an axis; losses get the other
TWIN_COLOURS = {"log_loss": "tab:purple", "r2": "tab:purple", "f1": "tab:brown", "accuracy": "tab:red"}   # apart from the left axis' cycle
MAX_VERSION_LINES = 10      # more version lines than this curtain the plot: a tick each on the top edge, ~10 lines


def _trainer_stage(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    from streampipe.stages.builtins import checkpoints

    metas = checkpoints.history(run_dir / "checkpoints")
    names = [str(m["stage"]) for m in metas if isinstance(m.get("stage"), str)]
    return (names[-1] if names else "trainer"), metas


def throughput_from_history(rows: list[dict[str, Any]], stage: str) -> list[tuple[float, float]]:
    """(time, records/s) of ``stage`` (all replicas) between consecutive status-history samples."""
    points: list[tuple[float, float]] = []
    prev: tuple[float, dict[str, int]] | None = None
    for row in rows:
        t, stages = row.get("time"), row.get("stages")
        if not isinstance(t, (int, float)) or not isinstance(stages, dict):
            continue
        counts = {ident: int(s.get("in", 0)) for ident, s in stages.items()
                  if isinstance(s, dict) and ident.rsplit(".", 1)[0] == stage}
        if not counts:
            continue
        if prev is not None and t > prev[0]:
            # a replica restarted (its counter went back) counts from 0 again
            done = sum(c - prev[1].get(i, 0) if c >= prev[1].get(i, 0) else c for i, c in counts.items())
            points.append((t, done / (t - prev[0])))
        prev = (t, counts)
    return points


def throughput_from_checkpoints(marks: list[tuple[float, int]]) -> list[tuple[float, float]]:
    """(time, records/s) between consecutive (checkpoint time, records seen) marks."""
    marks = sorted(set(marks))
    points = []
    for (t0, n0), (t1, n1) in zip(marks, marks[1:]):  # noqa: B905 - offset pairs
        if t1 > t0 and n1 >= n0:
            points.append((t1, (n1 - n0) / (t1 - t0)))
    return points


def make_report(run_dir: Path, out: Path, config: Path | None = None) -> str:
    """Draw the run's metrics and trainer throughput to ``out`` (PNG); return a text summary.

    ``config``: the run's services.yaml, where it tells more (which sink holds a window's results).
    """
    run_dir, out = Path(run_dir), Path(out)
    metrics_path = run_dir / "metrics.jsonl"
    rows = [r for r in read_jsonl(metrics_path) if isinstance(r.get("metrics"), dict)] if metrics_path.exists() else []
    if not rows:
        raise FileNotFoundError(
            f"no metrics yet in {metrics_path}: the evaluator writes a row once a checkpoint exists and it has "
            "scored `every` hold-out records (is an evaluator stage in services.yaml, fed by normalizer.holdout?)")
    rows.sort(key=lambda r: r.get("time", 0))

    stage, metas = _trainer_stage(run_dir)
    source = "status-history"
    history_path = run_dir / "status-history.jsonl"
    history = read_jsonl(history_path) if files_of(history_path) else []
    rate = throughput_from_history(history, stage)
    if not rate:
        source = "checkpoint metadata"
        marks = [(float(m["time"]), int(m["records_seen"])) for m in metas
                 if isinstance(m.get("time"), (int, float)) and isinstance(m.get("records_seen"), int)]
        marks += [(float(r["checkpoint_time"]), int(r["trained_records"])) for r in rows
                  if isinstance(r.get("checkpoint_time"), (int, float)) and isinstance(r.get("trained_records"), int)]
        rate = throughput_from_checkpoints(marks)

    t0 = min([rows[0]["time"]] + [t for t, _ in rate])
    names = [k for k in PRIMARY if any(isinstance(r["metrics"].get(k), (int, float)) for r in rows)]
    names += sorted({k for r in rows for k, v in r["metrics"].items() if isinstance(v, (int, float))} - set(names))
    primary = names[0] if names else None
    _draw(rows, rate, names, t0, out, title=f"{run_dir.resolve().parent.name}/{run_dir.name}: hold-out metrics")
    lines = [_summary(run_dir, rows, rate, primary, t0, source)]
    if (trained := trainer_line(stage, metas)) is not None:
        lines.append(trained)
    if (windows := report_windows.section(run_dir, history, _graph(config))) is not None:
        lines.append(windows)
    return "\n".join(lines)


def _graph(config: Path | None) -> report_windows.Graph | None:
    """The stages of ``config``, or None without one (or when it does not load: the report stands without it)."""
    if config is None or not Path(config).exists():
        return None
    from streampipe.launcher.config import load_config
    from streampipe.launcher.errors import ConfigError

    try:
        return report_windows.graph_of(load_config(config, check_stages=False))
    except ConfigError:
        return None


def trainer_line(stage: str, metas: list[dict[str, Any]]) -> str | None:
    """What the trainer's newest checkpoint says of itself: records learned and its prequential
    (test-then-train) metric when saved; None without a checkpoint.

    >>> print(trainer_line("trainer", [{"version": 9, "records_seen": 9200, "metric_name": "accuracy", "metric": 0.958,
    ...                                 "metric_window": 1000, "features": "x", "label": "y", "n_features": 3}]))
    trainer trainer: model v9 learned from 9200 records (x: 3 features, label y); prequential accuracy 0.958 over its last 1000 records
    """
    if not metas:
        return None
    m = metas[-1]
    metric = m.get("metric")
    figure = (f"; prequential {m.get('metric_name')} {metric:.4g} over its last {m.get('metric_window')} records"
              if isinstance(metric, (int, float)) else "")
    return (f"trainer {stage}: model v{m.get('version')} learned from {m.get('records_seen')} records "
            f"({m.get('features')}: {m.get('n_features')} features, label {m.get('label')}){figure}")


def version_lines(changes: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
    """The (time, version) changes drawn as labelled lines: all of up to :data:`MAX_VERSION_LINES`,
    else that many spread evenly from the first to the last.

    >>> [v for _, v in version_lines([(float(i), i + 1) for i in range(100)])]
    [1, 12, 23, 34, 45, 56, 67, 78, 89, 100]
    >>> len(version_lines([(0.0, 1), (5.0, 2)]))
    2
    """
    if len(changes) <= MAX_VERSION_LINES:
        return changes
    step = (len(changes) - 1) / (MAX_VERSION_LINES - 1)
    return [changes[round(i * step)] for i in range(MAX_VERSION_LINES)]


def _draw(rows: list[dict[str, Any]], rate: list[tuple[float, float]], names: list[str], t0: float, out: Path,
          title: str) -> None:
    fig = figure(rows, rate, names, t0, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out)


def figure(rows: list[dict[str, Any]], rate: list[tuple[float, float]], names: list[str], t0: float, title: str) -> Any:
    """The report's matplotlib ``Figure``: metrics with version and drift lines above, throughput below."""
    from streampipe.launcher.errors import import_extra

    import_extra("matplotlib", "plot", "streampipe report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # a bare Figure on an Agg canvas: no pyplot state, no backend switch

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_rate = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    times = [r["time"] - t0 for r in rows]
    ax_loss = None
    for name in names:
        pts = [(t, r["metrics"][name]) for t, r in zip(times, rows) if isinstance(r["metrics"].get(name), (int, float))]  # noqa: B905
        if not pts:
            continue
        target = ax
        if (name in SCORES) != (names[0] in SCORES):
            ax_loss = ax_loss or ax.twinx()
            target = ax_loss
        twin = target is ax_loss
        target.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", markersize=3, linewidth=1.2, label=name,
                    linestyle="--" if twin else "-", color=TWIN_COLOURS.get(name, "tab:gray") if twin else None)
    changes = [(times[i], rows[i].get("model_version")) for i in range(len(rows))
               if i == 0 or rows[i].get("model_version") != rows[i - 1].get("model_version")]
    thinned = len(changes) > MAX_VERSION_LINES
    for i, (t, version) in enumerate(version_lines(changes)):
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8,
                   label=None if i else "model version (some)" if thinned else "model version")
        ax.annotate(f"v{version}", (t, 1), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                    xytext=(2, -10), textcoords="offset points")
    if thinned:         # every change still shows: a short tick on the top edge
        ax.plot([t for t, _ in changes], [1.0] * len(changes), linestyle="none", marker="|", markersize=6,
                color="grey", transform=ax.get_xaxis_transform(), clip_on=False, label="each new version")
    drifts = [(t, r) for t, r in zip(times, rows) if r.get("drift")]  # noqa: B905
    for i, (t, _) in enumerate(drifts):
        ax.axvline(t, color="red", linewidth=1.2, alpha=0.8, label="drift" if i == 0 else None)
    ax.set_ylabel("hold-out score" if names and names[0] in SCORES else "hold-out error")
    ax.set_title(title, pad=10)          # above the version ticks
    handles, labels = ax.get_legend_handles_labels()
    if ax_loss is not None:
        ax_loss.set_ylabel("loss" if names[0] in SCORES else "score")
        h2, l2 = ax_loss.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:     # beside the plot, not over it: wherever it sat inside, it hid a drift line or a curve
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    ax.grid(alpha=0.3)
    if rate:
        ax_rate.plot([t - t0 for t, _ in rate], [v for _, v in rate], color="tab:green", linewidth=1.2, marker=".", markersize=3)
    else:
        ax_rate.text(0.5, 0.5, "no throughput data", transform=ax_rate.transAxes, ha="center", va="center", color="grey")
    for t, _ in drifts:
        ax_rate.axvline(t, color="red", linewidth=1.0, alpha=0.6)
    ax_rate.set_ylabel("trainer records/s")
    ax_rate.set_ylim(bottom=0)
    ax_rate.set_xlabel("seconds since the first evaluation")
    ax_rate.grid(alpha=0.3)
    return fig


def _summary(run_dir: Path, rows: list[dict[str, Any]], rate: list[tuple[float, float]], primary: str | None,
             t0: float, source: str) -> str:
    versions = [r["model_version"] for r in rows if isinstance(r.get("model_version"), int)]
    lines = [f"run {run_dir}: {len(rows)} evaluations, {rows[-1].get('records_evaluated', 0)} hold-out records scored, "
             f"model versions {min(versions, default=0)}..{max(versions, default=0)}"]
    if primary:
        scored = [r for r in rows if isinstance(r["metrics"].get(primary), (int, float))]
        values = [r["metrics"][primary] for r in scored]
        best_of = max if PRIMARY.get(primary, "higher") == "higher" else min
        best = best_of(scored, key=lambda r: r["metrics"][primary])
        lines.append(f"{primary} (hold-out): first {values[0]:.4g}, last {values[-1]:.4g}, "
                     f"best {best['metrics'][primary]:.4g} (version {best.get('model_version')})")
    drifts = [r for r in rows if r.get("drift")]
    if drifts:
        shown = ", ".join(f"at {r['time'] - t0:.1f} s (version {r.get('model_version')}, "
                          f"{r.get('records_evaluated')} records evaluated)" for r in drifts[:5])
        more = f" and {len(drifts) - 5} more" if len(drifts) > 5 else ""
        lines.append(f"drift: {len(drifts)} point{'s' if len(drifts) > 1 else ''}: {shown}{more}")
    else:
        lines.append("drift: none detected")
    if rate:
        busy = [v for _, v in rate if v > 0] or [0.0]     # idle samples (stream ended, stopped) would drag the mean
        lines.append(f"trainer throughput: {sum(busy) / len(busy):.0f} records/s mean while busy, {max(busy):.0f} peak "
                     f"(from {source})")
    else:
        lines.append("trainer throughput: no data (no status-history.jsonl and fewer than two checkpoints)")
    for line in (compare_line(run_dir / "compare.jsonl"), served_line(run_dir / "served.jsonl")):
        if line:
            lines.append(line)
    return "\n".join(lines)


def served_line(path: Path) -> str | None:
    """The ``label_join`` sink's last row as one line (served predictions against late labels), or None.

    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "served.jsonl"
    >>> _ = p.write_text(json.dumps({"records": 9000, "matched": 4000, "unscored": 100, "unmatched_predictions": 300,
    ...     "unmatched_labels": 200, "pending_predictions": 50, "pending_labels": 40, "task": "classification",
    ...     "model_version": 7, "metrics": {"accuracy": 0.95}, "overall": {"accuracy": 0.93},
    ...     "versions": {"6": {"matched": 2500, "accuracy": 0.92}, "7": {"matched": 1400, "accuracy": 0.95}}}) + "\\n")
    >>> print(served_line(p))
    served (served.jsonl, labels joined later): v7 accuracy 0.95 over 1400 pairs, all versions 0.93 over 3900; 4000 matched (100 before any model), unmatched 300 predictions / 200 labels, waiting 50 / 40
    """
    row = last_row(path, lambda r: isinstance(r.get("versions"), dict)) if path.exists() else None
    if row is None:
        return None
    metric = "mae" if row.get("task") == "regression" else "accuracy"
    version = row.get("model_version")
    newest = row["versions"].get(str(version), {})
    overall = row.get("overall", {}).get(metric)
    scored = sum(v.get("matched", 0) for v in row["versions"].values())
    head = (f"v{version} {metric} {newest[metric]:.4g} over {newest.get('matched')} pairs, all versions {overall:.4g} "
            f"over {scored}") if metric in newest and isinstance(overall, (int, float)) else "no scored pairs yet"
    return (f"served ({path.name}, labels joined later): {head}; {row.get('matched')} matched "
            f"({row.get('unscored')} before any model), unmatched {row.get('unmatched_predictions')} predictions / "
            f"{row.get('unmatched_labels')} labels, waiting {row.get('pending_predictions')} / {row.get('pending_labels')}")


def compare_line(path: Path) -> str | None:
    """The ``compare`` sink's last row as one line (a predictor's main and shadow sides), or None.

    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "compare.jsonl"
    >>> _ = p.write_text(json.dumps({"records": 3000, "task": "classification", "agreement": 0.994,
    ...     "main": {"model_version": 5, "accuracy": 0.975, "window": 1000},
    ...     "shadow": {"model_version": 4, "accuracy": 0.961, "window": 1000}}) + "\\n")
    >>> print(compare_line(p))
    A/B (compare.jsonl, 3000 records): main v5 accuracy 0.975, shadow v4 accuracy 0.961 (last 1000 / 1000 records); agreement 0.994
    """
    rows = [r for r in read_jsonl(path) if isinstance(r.get("main"), dict) and isinstance(r.get("shadow"), dict)] \
        if path.exists() else []
    if not rows:
        return None
    last = rows[-1]
    metric = "mae" if last.get("task") == "regression" else "accuracy"

    def side(name: str) -> str:
        s = last[name]
        value = s.get(metric)
        return f"{name} v{s.get('model_version')} {metric} {value:.4g}" if isinstance(value, (int, float)) \
            else f"{name} v{s.get('model_version')} {metric} n/a"

    agreement = last.get("agreement")
    agree = f"; agreement {agreement:.4g}" if isinstance(agreement, (int, float)) else ""
    return (f"A/B ({path.name}, {last.get('records')} records): {side('main')}, {side('shadow')} "
            f"(last {last['main'].get('window')} / {last['shadow'].get('window')} records){agree}")
