"""compare: the predictor's two answers (main and shadow) scored on the same records, side by side.

A sink for records that went through a ``predictor`` with ``pinned`` or ``shadow_dir`` (its A/B and
shadow mode): each carries ``prediction`` / ``model_version`` and ``shadow_prediction`` /
``shadow_model_version``, and, where the label is known (the normalizer's hold-out slice, say),
``y``. Over the last ``window`` records of each side's *current* version (a side's window starts
empty when its version changes, as the evaluator's does) it keeps:

- accuracy (a classifier: the prediction equals the label) or MAE (a regressor: the prediction
  is a float), for each side, on the records where that side answered and the label is known;
- agreement: the share of records where both answered the same (a classifier), or the mean
  absolute difference of their answers (a regressor); this needs no label, so a shadow is
  compared with the model in service before any label arrives.

Every ``every`` records one JSON object is appended and flushed to ``<run dir>/<output>``::

    {"time": 1764130000.1, "records": 3000, "task": "classification",
     "main": {"model_version": 27, "accuracy": 0.962, "window": 1000},
     "shadow": {"model_version": 25, "accuracy": 0.948, "window": 1000},
     "agreement": 0.981, "agreement_window": 1000}

Wire it like this (the hold-out slice, scored by both, then compared)::

    scored_holdout: {type: predictor, inputs: [normalizer.holdout], options: {shadow_dir: checkpoints-b}}
    compare: {type: compare, inputs: [scored_holdout]}

Options: ``label`` (``y``), ``prediction`` / ``version_field`` (the predictor's names), ``shadow_prefix``
(``shadow_``), ``task`` (``auto``, ``classification``, ``regression``), ``window`` (1000), ``every`` (500),
``output`` (``compare.jsonl``).

>>> c = Compare(every=10**9)
>>> _ = c.process([{"y": 1, "prediction": 1, "model_version": 3, "shadow_prediction": 0, "shadow_model_version": 2},
...                {"y": 0, "prediction": 0, "model_version": 3, "shadow_prediction": 0, "shadow_model_version": 2}])
>>> row = c.row()
>>> row["main"], row["shadow"], row["agreement"]
({'model_version': 3, 'accuracy': 1.0, 'window': 2}, {'model_version': 2, 'accuracy': 0.5, 'window': 2}, 0.5)
"""

from __future__ import annotations

import json
import time
from typing import IO, Any, Literal

import numpy as np

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.builtins.learning import DIGITS, Ring
from streampipe.stages.columns import MISSING, Columns
from streampipe.stages.state import json_default


class Side:
    """One scorer's figures: its current version and a window of per-record scores."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.version: Any = None
        self.scores = Ring(window)

    def push(self, version: Any, scores: list[float]) -> None:
        if version != self.version:
            self.version = version
            self.scores = Ring(self.window)        # a new version: its own window
        if scores:
            self.scores.push(np.asarray(scores, dtype=float))


class Compare(Stage):
    columnar = True

    def __init__(self, label: str = "y", prediction: str = "prediction", version_field: str = "model_version",
                 shadow_prefix: str = "shadow_", task: Literal["auto", "classification", "regression"] = "auto",
                 window: int = 1000, every: int = 500, output: str = "compare.jsonl") -> None:
        super().__init__()
        if window < 1 or every < 1:
            raise ValueError("window and every must be >= 1")
        self.label, self.output, self.every = label, output, int(every)
        self.names = ((prediction, version_field), (shadow_prefix + prediction, shadow_prefix + version_field))
        self.task: str | None = None if task == "auto" else task
        self.sides = (Side(int(window)), Side(int(window)))
        self.agreement = Ring(int(window))
        self.records = self.since_row = 0
        self._file: IO[str] | None = None

    def setup(self) -> None:
        path = self.context.replica_output(self.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def teardown(self) -> None:
        if self._file is not None:
            if self.since_row:
                self.write_row()
            self._file.close()
            self._file = None

    def process(self, batch: Batch | Columns) -> list[Record]:  # type: ignore[override]
        n = len(batch)
        if not n:
            return []
        truth = column(batch, self.label)
        answers = [(column(batch, p), column(batch, v)) for p, v in self.names]
        if self.task is None:
            first = next((a for preds, _ in answers for a in preds if a is not None), None)
            if first is not None:
                self.task = "regression" if isinstance(first, float) else "classification"
        classify = self.task != "regression"
        for side, (preds, versions) in zip(self.sides, answers, strict=True):
            # one version per batch is the predictor's rule; a batch that mixes them counts under its last
            version = next((v for v in reversed(versions) if v is not None), side.version)
            side.push(version, scores(preds, truth, classify))
        (main, _), (shadow, _) = answers
        both = scores(main, shadow, classify)
        if both:
            agree = np.asarray(both, dtype=float)
            self.agreement.push(1.0 - agree if classify else agree)
        self.records += n
        self.since_row += n
        if self.since_row >= self.every:
            self.write_row()
        return []

    def row(self) -> dict[str, Any]:
        metric = "accuracy" if self.task != "regression" else "mae"
        sides = {}
        for name, side in zip(("main", "shadow"), self.sides, strict=True):
            mean = side.scores.mean()
            if mean is not None and metric == "accuracy":
                mean = 1.0 - mean
            sides[name] = {"model_version": side.version, metric: None if mean is None else round(mean, DIGITS),
                           "window": len(side.scores)}
        agreement = self.agreement.mean()
        return {"time": time.time(), "records": self.records, "task": self.task, **sides,
                "agreement": None if agreement is None else round(agreement, DIGITS),
                "agreement_window": len(self.agreement)}

    def write_row(self) -> dict[str, Any]:
        row = self.row()
        if self._file is not None:
            self._file.write(json.dumps(row, default=json_default) + "\n")
            self._file.flush()
        self.since_row = 0
        return row

    def stats(self) -> dict[str, Any]:
        row = self.row()
        metric = "accuracy" if self.task != "regression" else "mae"
        return {"model_version": row["main"]["model_version"] or 0, "metric": row["main"][metric],
                "metric_name": metric, "shadow_version": row["shadow"]["model_version"],
                "shadow_metric": row["shadow"][metric], "agreement": row["agreement"]}


def column(batch: Batch | Columns, name: str) -> list[Any]:
    """A field of every record as Python values, None where a record lacks it."""
    if isinstance(batch, Columns):
        col = batch.data.get(name)
        if col is None:
            return [None] * len(batch)
        values = col.tolist() if isinstance(col, np.ndarray) else col
        return [None if v is MISSING else v for v in values]
    return [r.get(name) if isinstance(r, dict) else None for r in batch]


def scores(answers: list[Any], truth: list[Any], classify: bool) -> list[float]:
    """Per pair where both are given: 0 for a right answer and 1 for a wrong one (a classifier), the
    absolute error (a regressor; a pair that is not two numbers is left out)."""
    out: list[float] = []
    for answer, true in zip(answers, truth, strict=True):
        if answer is None or true is None:
            continue
        if classify:
            out.append(0.0 if answer == true else 1.0)
        elif isinstance(answer, (int, float)) and isinstance(true, (int, float)) and not isinstance(true, bool):
            out.append(abs(float(answer) - float(true)))
    return out
