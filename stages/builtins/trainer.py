"""trainer: fits a scikit-learn estimator online, test-then-train, and writes versioned checkpoints.

Any estimator with ``partial_fit`` works, a classifier (``is_classifier``) or a regressor. Each
batch is turned into arrays in one numpy pass (bad records are dead-lettered: missing or
non-numeric features, a vector of the wrong length, a label outside ``classes``), then

1. *test*: once the model has been fitted, it predicts the batch and the prequential metric is
   updated over the last ``window`` records: accuracy for a classifier, MAE for a regressor;
2. *train*: ``partial_fit`` on the batch (a classifier gets ``classes=`` on its first call).

Checkpoints (see :mod:`streampipe.stages.builtins.checkpoints`): every ``checkpoint_every`` records, every
``checkpoint_seconds`` when new records were learned (0 = only by count), and at teardown, the
model goes to ``<run dir>/<checkpoint_dir>/model-000042.joblib`` with ``model-000042.json``
beside it; the ``keep`` newest are kept. On setup the newest *valid* checkpoint is loaded (a
damaged or incomplete one is skipped with a warning), and version numbers and ``records_seen``
go on from it. A SIGKILL therefore loses at most the records learned since the last checkpoint.
Run one replica: replicas would each train their own model and race for version numbers.

Columns: the trainer is columnar (``columnar: false`` turns it off): a batch of columns gives
scikit-learn its ``features`` column (already an n x d array) and its ``label`` column directly,
and the prediction goes out as one more column. A batch with a bad row is checked record by record.

Output: with a stage connected downstream the trainer passes its good records on, each with
the field ``predictions`` (default ``"pred"``) set to the model's prediction made *before* it
learned from the record (absent until the model is first fitted; ``predictions: null`` passes
records unchanged). With nothing connected downstream it is a sink and returns nothing.

Options:
    estimator           dotted path of the estimator class (default SGDClassifier)
    params              its keyword arguments; for the default SGDClassifier they are merged over
                        ``loss="log_loss"`` (which gives it ``predict_proba``), ``alpha=1e-4``,
                        ``learning_rate="constant"``, ``eta0=0.01`` (steady, and quick to adapt)
    features, label     the record fields holding the vector and the target
    classes             the labels a classifier knows (default [0, 1])
    checkpoint_every    records between checkpoints
    checkpoint_seconds  seconds between checkpoints while learning (0 = off)
    keep                checkpoints kept
    checkpoint_dir      folder, relative to the run directory
    window              records in the prequential metric's window
    predictions         field name for the prediction in passed-on records, or null

>>> import itertools, tempfile, pathlib
>>> from streampipe.stages.builtins.generator import Generator
>>> from streampipe.stages.builtins.normalizer import Normalizer
>>> from streampipe.testing import run_stage
>>> norm = Normalizer()
>>> records = list(itertools.islice(Generator(seed=1).generate(), 4000))
>>> batches = [norm.process(records[i:i + 200]) for i in range(0, 4000, 200)]
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> trainer = Trainer(checkpoint_every=1000, checkpoint_seconds=0)
>>> out = run_stage(trainer, batches, run_dir=d)
>>> stats = trainer.stats()
>>> stats["model_version"], stats["records_seen"], stats["metric_name"], stats["metric"] > 0.8
(4, 4000, 'accuracy', True)
>>> sorted(p.name for p in (d / "checkpoints").iterdir())[-2:]
['model-000004.joblib', 'model-000004.json']
>>> out.records[-1]["pred"] in (0, 1)
True
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.builtins import checkpoints
from streampipe.stages.builtins.learning import Ring, Vectoriser, import_estimator
from streampipe.stages.columns import Columns

# scikit-learn (and joblib) are imported where they are used, not here: `streampipe validate` imports
# this module to read Trainer's options, and must stay fast (sklearn costs ~1.7 s; the fork server
# preloads it for the stages anyway).
DEFAULT_ESTIMATOR = "sklearn.linear_model.SGDClassifier"
# log_loss: logistic regression, which has predict_proba (the evaluator's log-loss). A constant
# step keeps adapting forever: on the default stream it holds ~0.96 hold-out accuracy (Bayes
# ~0.975) and recovers from a concept drift within ~2000 records, where sklearn's default
# "optimal" schedule wanders between 0.86 and 0.95 and makes the drift detector see ghosts.
DEFAULT_PARAMS: dict[str, Any] = {"loss": "log_loss", "alpha": 1e-4, "learning_rate": "constant", "eta0": 0.01}
DEFAULT_CLASSES = (0, 1)
CHECKPOINT_RETRY_S = 5.0   # after a failed save (disk full...), do not retry on every batch


class Trainer(Stage):
    columnar = True

    def __init__(self, estimator: str = DEFAULT_ESTIMATOR, params: dict[str, Any] | None = None,
                 features: str = "x", label: str = "y", classes: list[Any] | None = None,
                 checkpoint_every: int = 5000, checkpoint_seconds: float = 10.0, keep: int = 5,
                 checkpoint_dir: str = "checkpoints", window: int = 1000, predictions: str | None = "pred",
                 columnar: bool = True) -> None:
        super().__init__()
        self.columnar = bool(columnar)
        if not isinstance(estimator, str) or not estimator.strip():
            raise ValueError("estimator must be a dotted path such as 'sklearn.linear_model.SGDClassifier'")
        if params is not None and not isinstance(params, dict):
            raise ValueError("params must be a mapping of the estimator's keyword arguments")
        if checkpoint_every < 1 or keep < 1 or window < 1 or checkpoint_seconds < 0:
            raise ValueError("checkpoint_every, keep and window must be >= 1; checkpoint_seconds >= 0")
        if classes is not None and len(classes) < 2:
            raise ValueError("classes must list at least two labels")
        self.estimator = estimator
        self.params = {**DEFAULT_PARAMS, **(params or {})} if estimator == DEFAULT_ESTIMATOR else dict(params or {})
        self.features, self.label = features, label
        self.classes_option = list(classes) if classes is not None else None
        self.checkpoint_every, self.checkpoint_seconds, self.keep = int(checkpoint_every), float(checkpoint_seconds), int(keep)
        self.checkpoint_dir, self.predictions = checkpoint_dir, predictions
        self.scores = Ring(int(window))       # per record: 1.0 correct / 0.0 wrong, or |error|
        self.model: Any = None
        self.classifier = True
        self.classes: np.ndarray | None = None
        self.fitted = False
        self.version = 0                      # version of the last checkpoint written or loaded
        self.next_version = 1
        self.records_seen = 0
        self.since_checkpoint = 0
        self.event_time: float | None = None
        self._saved_at = time.monotonic()
        self._vectorise = Vectoriser(features, label)
        self._folder: Path | None = None

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.classifier else "mae"

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = self.context.resolve_output(self.checkpoint_dir)
        return self._folder

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        if self.context.replicas > 1:
            logger.warning("trainer runs with replicas > 1: each replica trains its own model and they share "
                           f"{self.folder}; use one replica")
        self.folder.mkdir(parents=True, exist_ok=True)
        checkpoints.clean_temp(self.folder)
        cls = import_estimator(self.estimator)
        if not callable(getattr(cls, "partial_fit", None)):
            raise TypeError(f"estimator {self.estimator!r} has no partial_fit: the trainer learns online")
        self.model = cls(**self.params)
        from sklearn.base import is_classifier

        self.classifier = bool(is_classifier(self.model))
        if self.classifier:
            self.classes = np.asarray(self.classes_option if self.classes_option is not None else DEFAULT_CLASSES)
        self._vectorise.set_classes(self.classes)
        self.next_version = checkpoints.latest_version(self.folder) + 1
        self._resume()
        self._saved_at = time.monotonic()

    def _resume(self) -> None:
        found = checkpoints.scan(self.folder)
        for version, kinds in sorted(found.items()):
            if "json" not in kinds:
                logger.warning(f"skipping checkpoint in {self.folder}: version {version}: no metadata file (incomplete)")
        cp = checkpoints.load_newest(self.folder)
        if cp is None:
            if found:
                logger.warning(f"no valid checkpoint in {self.folder}: starting a new model at version {self.next_version}")
            return
        meta = cp.meta
        clash = [k for k, mine in (("estimator", self.estimator), ("features", self.features), ("label", self.label))
                 if meta.get(k, mine) != mine]
        if clash or not hasattr(cp.model, "partial_fit"):
            logger.warning(f"checkpoint version {cp.version} was made with other {', '.join(clash) or 'estimator'}: "
                           f"starting a new model at version {self.next_version}")
            return
        self.model, self.fitted, self.version = cp.model, True, cp.version
        self.records_seen = int(meta.get("records_seen", 0))
        n_features = meta.get("n_features") or getattr(cp.model, "n_features_in_", None)
        self._vectorise.n_features = int(n_features) if n_features else None
        if self.classifier and hasattr(cp.model, "classes_"):
            if self.classes_option is not None and list(cp.model.classes_) != sorted(self.classes_option):
                logger.warning(f"checkpoint version {cp.version} knows classes {list(cp.model.classes_)}, "
                               f"not {self.classes_option}: keeping the checkpoint's")
            self.classes = np.asarray(cp.model.classes_)
            self._vectorise.set_classes(self.classes)
        logger.info(f"resumed from checkpoint version {cp.version} ({self.records_seen} records seen); "
                    f"next version {self.next_version}")

    def teardown(self) -> None:
        if self.since_checkpoint:
            self.checkpoint()

    # -- test, then train --------------------------------------------------------------------
    def process(self, batch: Batch | Columns) -> list[Record] | Columns:  # type: ignore[override]
        arrays = self._vectorise(batch, self.reject)
        n = len(arrays)
        pred = None
        if n:
            X, y = arrays.X, arrays.y
            # The vectoriser let only finite values through: sklearn need not check again (-40 % per call).
            import sklearn

            with sklearn.config_context(assume_finite=True):
                if self.fitted:
                    pred = self.model.predict(X)
                if self.fitted or not self.classifier:
                    self.model.partial_fit(X, y)
                else:
                    self.model.partial_fit(X, y, classes=self.classes)
            self.fitted = True
            if pred is not None:
                self.scores.push((pred == y).astype(float) if self.classifier else np.abs(pred - y))
            self.records_seen += n
            self.since_checkpoint += n
            t = last_value(arrays.records, "t")
            if isinstance(t, (int, float)):
                self.event_time = float(t)
        self._maybe_checkpoint()
        if not n or "default" not in self.context.outputs:
            return []
        if pred is None or not self.predictions:
            return arrays.records
        field = self.predictions
        if isinstance(arrays.records, Columns):
            return arrays.records.with_column(field, pred)
        return [{**r, field: p} for r, p in zip(arrays.records, pred.tolist(), strict=True)]

    # -- checkpoints -------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        if not self.since_checkpoint:
            return
        due = self.since_checkpoint >= self.checkpoint_every or (
            self.checkpoint_seconds > 0 and time.monotonic() - self._saved_at >= self.checkpoint_seconds)
        if not due:
            return
        try:
            self.checkpoint()
        except OSError as exc:
            # Raising here would make the runtime retry the batch record by record, learning it twice.
            logger.error(f"checkpoint failed, retrying in {CHECKPOINT_RETRY_S:g}s: {exc}")
            self._saved_at = time.monotonic() - max(0.0, self.checkpoint_seconds - CHECKPOINT_RETRY_S)

    def checkpoint(self) -> int:
        """Write the model as the next version now; returns the version. Needs a fitted model."""
        if not self.fitted:
            return self.version
        metric = self.scores.mean()
        meta = {
            "version": self.next_version,
            "records_seen": self.records_seen,
            "metric_name": self.metric_name,
            "metric": None if metric is None else round(metric, 6),
            "metric_window": len(self.scores),
            "task": "classification" if self.classifier else "regression",
            "estimator": self.estimator,
            "params": self.params,
            "features": self.features,
            "label": self.label,
            "n_features": self._vectorise.n_features,
            "classes": None if self.classes is None else self.classes.tolist(),
            "event_time": self.event_time,
            "stage": self.context.name,
            "time": time.time(),
        }
        checkpoints.save(self.folder, self.next_version, self.model, meta)
        self.version, self.next_version = self.next_version, self.next_version + 1
        self.since_checkpoint = 0
        self._saved_at = time.monotonic()
        checkpoints.prune(self.folder, self.keep)
        return self.version

    def stats(self) -> dict[str, Any]:
        metric = self.scores.mean()
        return {"model_version": self.version, "metric": None if metric is None else round(metric, 4),
                "metric_name": self.metric_name, "records_seen": self.records_seen}


def last_value(batch: list[Record] | Columns, name: str) -> Any:
    """The field ``name`` of a batch's last row (None where it has none)."""
    if isinstance(batch, Columns):
        col = batch.data.get(name)
        value = col[-1] if col is not None and len(col) else None
        return value.item() if isinstance(value, np.generic) else value
    return batch[-1].get(name) if batch else None
