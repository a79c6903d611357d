"""evaluator: scores the trainer's newest checkpoint on a hold-out slice and writes metrics.jsonl.

Wire it to the normalizer's ``holdout`` output (records the trainer never learns from). It
watches the checkpoint folder (an ``os.scandir`` at most every ``poll_seconds``) and switches to
each new version as it appears; a damaged version is skipped with a warning, as the trainer does
(:mod:`streampipe.stages.builtins.checkpoints`). Until a first checkpoint exists records are counted, not scored.

Metrics are over the last ``window`` records scored by the *current* version (the window starts
empty at each new version): accuracy, F1 (of the second class when binary, macro otherwise) and,
when the model has ``predict_proba``, log-loss, for a classifier; MAE, RMSE and R2 for a
regressor. A Page-Hinkley test (:mod:`streampipe.stages.builtins.drift`) watches the error of every scored record
(0/1 mistakes, or absolute errors) across versions and logs a warning on drift.

Every ``every`` scored records, and when the version changes (closing the outgoing version's
rows), one JSON object is appended and flushed to ``<run dir>/<output>``::

    {"time": 1764130000.1, "model_version": 7, "records_evaluated": 3500, "metrics": {"accuracy": 0.93,
     "f1": 0.92, "log_loss": 0.21}, "drift": false, "drift_count": 0, "version_records": 500,
     "records_received": 3600, "trained_records": 35000, "checkpoint_time": 1764129999.0, "window": 500}

``drift`` is true on the first row written after a detection. ``records_evaluated`` and
``drift_count`` go on from the file's last row after a restart. The evaluator is a sink.

Options:
    checkpoint_dir      the trainer's checkpoint folder, relative to the run directory
    output              the metrics file, relative to the run directory
    every               scored records between rows
    window              records in the metrics' window
    features, label     record fields (default: those in the checkpoint's metadata, else x / y)
    poll_seconds        least time between two looks at the checkpoint folder
    drift_delta, drift_threshold, drift_min_instances   the Page-Hinkley test's settings

>>> import itertools, json, tempfile, pathlib
>>> from streampipe.stages.builtins.generator import Generator
>>> from streampipe.stages.builtins.normalizer import Normalizer
>>> from streampipe.testing import run_stage
>>> from streampipe.stages.builtins.trainer import Trainer
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> norm = Normalizer(holdout=0.2)
>>> records = norm.process(list(itertools.islice(Generator(seed=2).generate(), 6000)))
>>> train = [r for r in records if norm.route(r) == "default"]
>>> holdout = [r for r in records if norm.route(r) == "holdout"]
>>> _ = run_stage(Trainer(checkpoint_seconds=0), [train], run_dir=d)     # teardown saves version 1
>>> ev = Evaluator(every=200, poll_seconds=0)
>>> _ = run_stage(ev, [holdout[i:i + 100] for i in range(0, len(holdout), 100)], run_dir=d)
>>> rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
>>> rows[0]["model_version"], rows[0]["records_evaluated"], rows[0]["metrics"]["accuracy"] > 0.8
(1, 200, True)
>>> ev.stats()["metric_name"], ev.stats()["drift_count"]
('accuracy', 0)
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

import numpy as np
from loguru import logger

from streampipe._rotating import end_torn_line, last_row
from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.builtins import checkpoints
from streampipe.stages.builtins.drift import PageHinkley
from streampipe.stages.builtins.learning import (
    Ring,
    Vectoriser,
    classification_metrics,
    pointwise_log_loss,
    regression_metrics,
)
from streampipe.stages.columns import Columns
from streampipe.stages.state import json_default

# scikit-learn (and joblib) are imported where they are used, not here: `streampipe validate` imports
# this module to read Evaluator's options, and must stay fast (sklearn costs ~1.7 s; the fork server
# preloads it for the stages anyway).


class Evaluator(Stage):
    columnar = True

    def __init__(self, checkpoint_dir: str = "checkpoints", output: str = "metrics.jsonl", every: int = 500,
                 window: int = 1000, features: str | None = None, label: str | None = None,
                 poll_seconds: float = 0.5, drift_delta: float = 0.005, drift_threshold: float = 50.0,
                 drift_min_instances: int = 30, columnar: bool = True) -> None:
        super().__init__()
        self.columnar = bool(columnar)      # a batch of columns reaches predict() as its own arrays
        if every < 1 or window < 1 or poll_seconds < 0:
            raise ValueError("every and window must be >= 1, poll_seconds >= 0")
        self.checkpoint_dir, self.output = checkpoint_dir, output
        self.every, self.window, self.poll_seconds = int(every), int(window), float(poll_seconds)
        self.features_option, self.label_option = features, label
        self.detector = PageHinkley(delta=drift_delta, threshold=drift_threshold, min_instances=drift_min_instances)
        self.model: Any = None
        self.meta: dict[str, Any] = {}
        self.version = 0
        self.classifier = True
        self.has_proba = False
        self.bad_versions: set[int] = set()
        self.records_received = 0
        self.records_evaluated = 0
        self.version_records = 0
        self.since_row = 0
        self.drift_count = 0
        self.drift_pending = False
        self._polled_at = float("-inf")
        self._file: IO[str] | None = None
        self._vectorise = Vectoriser(features or "x", label or "y")
        self._reset_windows()

    def _reset_windows(self) -> None:
        self.truth = Ring(self.window, np.int64 if self.classifier else float)
        self.guess = Ring(self.window, np.int64 if self.classifier else float)
        self.losses = Ring(self.window)

    @property
    def metric_name(self) -> str:
        if self.model is None:
            return ""
        return "accuracy" if self.classifier else "mae"

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.folder = self.context.resolve_output(self.checkpoint_dir)
        self.path = path = self.context.replica_output(self.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._resume_counters()
        self._file = open(path, "a", encoding="utf-8")
        self.poll(force=True)

    def _resume_counters(self) -> None:
        """Go on from the last complete row (a line torn by a SIGKILL is terminated)."""
        end_torn_line(self.path)
        row = last_row(self.path)
        if row is not None:
            self.records_evaluated = int(row.get("records_evaluated", 0))
            self.records_received = int(row.get("records_received", 0))
            self.drift_count = int(row.get("drift_count", 0))

    def teardown(self) -> None:
        if self.since_row:
            self.write_row()
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- checkpoints -------------------------------------------------------------------------
    def poll(self, force: bool = False) -> bool:
        """Switch to a newer valid checkpoint if one appeared; True when the version changed."""
        now = time.monotonic()
        if not force and now - self._polled_at < self.poll_seconds:
            return False
        self._polled_at = now
        cp = checkpoints.load_newest(self.folder, above=self.version, skip=self.bad_versions)
        if cp is None:
            return False
        if self.since_row:
            self.write_row()      # close the outgoing version's figures
        self.model, self.meta, self.version = cp.model, cp.meta, cp.version
        from sklearn.base import is_classifier

        self.classifier = bool(is_classifier(cp.model)) and hasattr(cp.model, "classes_")
        self.has_proba = self.classifier and hasattr(cp.model, "predict_proba")
        v = self._vectorise
        v.features = self.features_option or cp.meta.get("features") or v.features
        v.label = self.label_option or cp.meta.get("label") or v.label
        v.n_features = cp.meta.get("n_features") or getattr(cp.model, "n_features_in_", None)
        v.set_classes(cp.model.classes_ if self.classifier else None)
        self.version_records = 0
        self._reset_windows()
        logger.info(f"evaluating checkpoint version {cp.version} (trained on {cp.meta.get('records_seen')} records)")
        return True

    # -- scoring -----------------------------------------------------------------------------
    def process(self, batch: Batch | Columns) -> list[Record]:  # type: ignore[override]
        self.records_received += len(batch)
        self.poll()
        if self.model is None or not batch:
            return []
        arrays = self._vectorise(batch, self.reject)
        n = len(arrays)
        if not n:
            return []
        X, y = arrays.X, arrays.y
        import sklearn

        with sklearn.config_context(assume_finite=True):     # the vectoriser checked X
            pred = self.model.predict(X)
            proba = self.model.predict_proba(X) if self.has_proba else None
        if self.classifier:
            classes = self.model.classes_
            true_idx, pred_idx = np.searchsorted(classes, y), np.searchsorted(classes, pred)
            self.truth.push(true_idx)
            self.guess.push(pred_idx)
            if proba is not None:
                self.losses.push(pointwise_log_loss(proba, true_idx))
            errors = (true_idx != pred_idx).astype(float)
        else:
            y = y.astype(float)
            self.truth.push(y)
            self.guess.push(pred.astype(float))
            errors = np.abs(pred - y)
        self._watch(errors)
        self.records_evaluated += n
        self.version_records += n
        self.since_row += n
        if self.since_row >= self.every:
            self.write_row()
        return []

    def _watch(self, errors: np.ndarray) -> None:
        for i in self.detector.update_many(errors):
            self.drift_count += 1
            self.drift_pending = True
            logger.warning(f"drift detected on the hold-out error stream: model version {self.version}, "
                           f"{self.records_evaluated + i + 1} records evaluated, "
                           f"window {self.metric_name} {self.primary()}")

    def metrics(self) -> dict[str, float | None]:
        if self.classifier:
            return classification_metrics(self.truth.values(), self.guess.values(), len(self.model.classes_),
                                          self.losses.values() if self.has_proba else None)
        return regression_metrics(self.truth.values(), self.guess.values())

    def primary(self) -> float | None:
        if self.model is None or not len(self.truth):
            return None
        if self.classifier:
            return round(float((self.truth.values() == self.guess.values()).mean()), 4)
        return round(float(np.abs(self.truth.values() - self.guess.values()).mean()), 4)

    def write_row(self) -> dict[str, Any]:
        row = {"time": time.time(), "model_version": self.version, "records_evaluated": self.records_evaluated,
               "metrics": self.metrics(), "drift": self.drift_pending, "drift_count": self.drift_count,
               "version_records": self.version_records, "records_received": self.records_received,
               "trained_records": self.meta.get("records_seen"), "checkpoint_time": self.meta.get("time"),
               "window": len(self.truth)}
        if self._file is not None:
            self._file.write(json.dumps(row, default=json_default) + "\n")
            self._file.flush()
        self.since_row = 0
        self.drift_pending = False
        return row

    def stats(self) -> dict[str, Any]:
        return {"model_version": self.version, "metric": self.primary(), "metric_name": self.metric_name,
                "drift_count": self.drift_count, "records_evaluated": self.records_evaluated}

