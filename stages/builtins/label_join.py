"""label_join: the serving model scored where the labels arrive later, on another input.

The predictor's answers go out at once; the truth comes later (a click, a chargeback, a reading
an hour on), from another system. This sink takes both streams as its inputs, joins each
prediction with its label by key, and scores the model version that made each prediction
prequentially: every matched pair counts once, under the version that answered.

    scored: {type: predictor, inputs: [normalizer]}
    outcomes: {type: label_join, inputs: [scored, labels], options: {key: id, label_key: ref, within: 300}}

A record carrying the ``prediction`` field is a prediction (any ``y`` it carries is ignored);
any other record is a label and must carry the ``label`` field. Both carry a key (``key``;
``label_key`` names the label's field when it differs) and an event time (``time``, a number:
seconds, or any ordered unit such as an id; ``label_time`` when it differs). One prediction and
one label per key: a second one for a key already waiting is counted as a duplicate and dropped.

**The window is event time, settled by watermarks, not by a clock.** A prediction at ``tp`` and
a label at ``tl`` match when they share a key and ``|tl - tp| <= within``. Each stream's
watermark is the greatest event time it has shown less ``lateness`` (the disorder it may have).
A waiting prediction is given up, counted as unmatched, once the *labels'* watermark passes
``tp + within``: no label that could match it can still come unless it is later than the
lateness allows; a waiting label likewise once the predictions' watermark passes ``tl + within``.
So the result does not depend on how the two streams interleave, how fast either runs or where
a replica was killed: it is what a brute-force join of the two streams after the fact gives
(``tests/test_label_join.py`` checks it under SIGKILLs). A record later than its stream's
lateness is counted (``late``) and still joined if its partner waits; what waits is bounded by
the event-time span ``within + lateness`` of each stream, not by how long anything was idle.

The stage's state (waiting records, watermarks, per-version tallies) is its snapshot, so the
runtime keeps it exact through SIGKILLs (each record applied once). Every ``every`` matched
pairs, and at a clean stop, one JSON row is appended to ``<run dir>/<output>``::

    {"time": 1764130000.1, "records": 8400, "predictions": 4000, "labels": 4400, "matched": 3100,
     "unscored": 120, "unmatched_predictions": 700, "unmatched_labels": 1000, "pending_predictions": 200,
     "pending_labels": 180, "late": 0, "duplicates": 0, "task": "classification", "model_version": 7,
     "metrics": {"accuracy": 0.951}, "overall": {"accuracy": 0.93},
     "versions": {"6": {"matched": 1900, "accuracy": 0.92}, "7": {"matched": 1080, "accuracy": 0.951}}}

``metrics`` are the newest version's, ``overall`` every scored pair's; a regressor gets ``mae``
and ``rmse``. ``unscored`` counts pairs whose prediction was made before any model existed (the
predictor's ``model_version`` null). A row is only written for more records than the file's last
row holds, so after a SIGKILL the rows the restored state repeats are not written twice.

Options: ``key`` (``id``), ``label_key``, ``time`` (``t``), ``label_time``, ``label`` (``y``),
``prediction`` / ``version_field`` (the predictor's names), ``within`` (60), ``lateness`` (5),
``task`` (``auto``, ``classification``, ``regression``), ``every`` (500), ``output``
(``served.jsonl``).

>>> j = LabelJoin(within=10, lateness=0, every=10**9)
>>> _ = j.process([{"id": 1, "t": 0, "prediction": 1, "model_version": 3},
...                {"id": 2, "t": 1, "prediction": 0, "model_version": 3},
...                {"id": 1, "t": 4, "y": 1},                  # 4 s after its prediction: a match
...                {"id": 9, "t": 5, "y": 0}])                 # no prediction has id 9 (yet)
>>> row = j.row(); row["matched"], row["metrics"], row["pending_predictions"], row["pending_labels"]
(1, {'accuracy': 1.0}, 1, 1)
>>> _ = j.process([{"id": 3, "t": 30, "prediction": 1, "model_version": 4}, {"id": 3, "t": 31, "y": 0}])
>>> row = j.row()          # both watermarks passed 11: id 2 and label 9 are given up
>>> row["unmatched_predictions"], row["unmatched_labels"], row["versions"]
(1, 1, {'3': {'matched': 1, 'accuracy': 1.0}, '4': {'matched': 1, 'accuracy': 0.0}})
"""

from __future__ import annotations

import json
import math
import time
from typing import IO, Any, Literal

from streampipe._rotating import end_torn_line, last_row
from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.builtins.learning import DIGITS
from streampipe.stages.builtins.sides import Side, finite
from streampipe.stages.state import json_default

COUNTS = ("predictions", "labels", "matched", "unscored", "unmatched_predictions", "unmatched_labels",
          "late", "duplicates")


class LabelJoin(Stage):
    def __init__(self, key: str = "id", label_key: str | None = None, time: str = "t", label_time: str | None = None,
                 label: str = "y", prediction: str = "prediction", version_field: str = "model_version",
                 within: float = 60.0, lateness: float = 5.0,
                 task: Literal["auto", "classification", "regression"] = "auto",
                 every: int = 500, output: str = "served.jsonl") -> None:
        super().__init__()
        if within < 0 or lateness < 0 or every < 1:
            raise ValueError("within and lateness must be >= 0, every >= 1")
        self.fields = {"prediction": (key, time), "label": (label_key or key, label_time or time)}
        self.label, self.prediction, self.version_field = label, prediction, version_field
        self.within, self.lateness, self.every, self.output = float(within), float(lateness), int(every), output
        self.task: str | None = None if task == "auto" else task
        self.sides = {"prediction": Side(), "label": Side()}
        self.counts = dict.fromkeys(COUNTS, 0)
        self.tallies: dict[str, list[float]] = {}    # version -> [pairs, correct] or [pairs, |error| sum, error^2 sum]
        self.since_row = 0
        self.written = 0          # "records" of the file's last row: a row for no more than that is not written again
        self._file: IO[str] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        path = self.context.replica_output(self.output)   # one replica (validate refuses more); the rule is the house's
        path.parent.mkdir(parents=True, exist_ok=True)
        end_torn_line(path)
        self.written = int((last_row(path) or {}).get("records", 0))
        self._file = open(path, "a", encoding="utf-8")

    def teardown(self) -> None:
        if self._file is not None:
            self.write_row()
            self._file.close()
            self._file = None

    def snapshot(self) -> dict[str, Any]:
        return {"sides": {name: side.state() for name, side in self.sides.items()}, "counts": self.counts,
                "tallies": self.tallies, "task": self.task}

    def restore(self, state: dict[str, Any]) -> None:
        for name, side in self.sides.items():
            side.load(state.get("sides", {}).get(name, {}))
        self.counts = {**dict.fromkeys(COUNTS, 0), **state.get("counts", {})}
        self.tallies = {str(k): list(v) for k, v in state.get("tallies", {}).items()}
        self.task = state.get("task", self.task)

    # -- the join ----------------------------------------------------------------------------
    def process(self, batch: Batch) -> list[Record]:
        for record in batch:
            self.take(record)
        self.expire()
        if self.since_row >= self.every:
            self.write_row()
        return []

    def take(self, record: Record) -> None:
        kind = "prediction" if self.prediction in record else "label"
        if kind == "label" and self.label not in record:
            self.reject(record, f"neither a prediction (no {self.prediction!r} field) nor a label (no {self.label!r} field)")
            return
        key_field, time_field = self.fields[kind]
        key, t = record.get(key_field), record.get(time_field)
        if key is None or not isinstance(key, (int, str, bytes)) or isinstance(key, bool):
            self.reject(record, f"{kind} without a key: field {key_field!r} must be an integer or a string")
            return
        if not finite(t):
            self.reject(record, f"{kind} without an event time: field {time_field!r} must be a finite number")
            return
        mine, other = self.sides[kind], self.sides["label" if kind == "prediction" else "prediction"]
        self.counts[kind + "s"] += 1
        if mine.saw(t, self.lateness):
            self.counts["late"] += 1
        if mine.get(key):
            self.counts["duplicates"] += 1
            return
        arrival, partner = next(iter(other.get(key).items()), (0, None))
        if partner is not None and abs(partner[0] - t) <= self.within:
            other.remove(key, arrival)         # its heap entry is skipped when it comes up
            if kind == "prediction":
                self.score(record.get(self.version_field), record[self.prediction], partner[1])
            else:
                self.score(partner[1], partner[2], record[self.label])
            return
        if kind == "prediction":
            mine.add(key, [t, record.get(self.version_field), record[self.prediction]])
        else:
            mine.add(key, [t, record[self.label]])

    def expire(self) -> None:
        predictions, labels = self.sides["prediction"], self.sides["label"]
        if labels.newest is not None:
            self.counts["unmatched_predictions"] += len(predictions.expire(labels.newest - self.lateness - self.within))
        if predictions.newest is not None:
            self.counts["unmatched_labels"] += len(labels.expire(predictions.newest - self.lateness - self.within))

    def score(self, version: Any, predicted: Any, truth: Any) -> None:
        self.counts["matched"] += 1
        self.since_row += 1
        if predicted is None or version is None:
            self.counts["unscored"] += 1
            return
        if self.task is None:
            self.task = "regression" if isinstance(predicted, float) else "classification"
        tally = self.tallies.setdefault(str(version), [0, 0.0] if self.task == "classification" else [0, 0.0, 0.0])
        tally[0] += 1
        if self.task == "classification":
            tally[1] += predicted == truth
        else:
            error = float(predicted) - float(truth)
            tally[1] += abs(error)
            tally[2] += error * error

    # -- figures -----------------------------------------------------------------------------
    def figures(self, tally: list[float]) -> dict[str, float]:
        n = tally[0]
        if self.task == "classification":
            return {"accuracy": round(tally[1] / n, DIGITS)}
        return {"mae": round(tally[1] / n, DIGITS), "rmse": round(math.sqrt(tally[2] / n), DIGITS)}

    def newest_version(self) -> str | None:
        return max(self.tallies, key=_version_order, default=None)

    def row(self) -> dict[str, Any]:
        newest = self.newest_version()
        total = [sum(column) for column in zip(*self.tallies.values(), strict=True)] if self.tallies else []
        return {"time": time.time(), "records": self.counts["predictions"] + self.counts["labels"], **self.counts,
                "pending_predictions": len(self.sides["prediction"]),
                "pending_labels": len(self.sides["label"]), "task": self.task,
                "model_version": _as_version(newest), "metrics": self.figures(self.tallies[newest]) if newest else {},
                "overall": self.figures(total) if total else {},
                "versions": {v: {"matched": int(t[0]), **self.figures(t)}
                             for v, t in sorted(self.tallies.items(), key=lambda item: _version_order(item[0]))}}

    def write_row(self) -> None:
        self.since_row = 0
        row = self.row()
        if self._file is None or row["records"] <= self.written:
            return
        self._file.write(json.dumps(row, default=json_default) + "\n")
        self._file.flush()
        self.written = row["records"]

    def stats(self) -> dict[str, Any]:
        newest = self.newest_version()
        figures = self.figures(self.tallies[newest]) if newest else {}
        name = next(iter(figures), "accuracy" if self.task != "regression" else "mae")
        return {"model_version": _as_version(newest), "metric": figures.get(name), "metric_name": name,
                "matched": self.counts["matched"],
                "unmatched": self.counts["unmatched_predictions"] + self.counts["unmatched_labels"],
                "pending": len(self.sides["prediction"]) + len(self.sides["label"]),
                "predictions": self.counts["predictions"], "labels": self.counts["labels"]}


def _as_version(version: str | None) -> Any:
    return int(version) if version is not None and version.lstrip("-").isdigit() else version


def _version_order(version: str) -> tuple[int, Any]:
    """Versions sort as numbers when they are (``"10"`` after ``"9"``), else as text after them."""
    return (0, int(version)) if version.lstrip("-").isdigit() else (1, version)
