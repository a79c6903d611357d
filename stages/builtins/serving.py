"""What the predictor and the serve stage share: the newest valid checkpoint, followed and swapped.

A :class:`ModelFollower` watches a trainer's checkpoint folder (an ``os.scandir`` at most every
``poll_seconds``, as the evaluator does) and, when a newer version is committed, loads it with
:func:`streampipe.stages.builtins.checkpoints.load_newest` (size, SHA-256 and ``joblib.load`` checked) and
*probes* it: ``predict`` (and ``predict_proba``) on a few rows of the last features scored, or on
a row of zeros of the width the checkpoint declares. A version that fails to load or to predict
is skipped with a loguru warning that says why (the exception's type and message, never the
rows), remembered so that it is not tried again, and the version in service keeps serving.

The model in service is one immutable :class:`Served`, replaced by one assignment: a reader
takes ``follower.current`` once and scores a whole batch (or request) with it, so a batch is
never split between two versions and there is no moment without a model once the first one is
in. :func:`score` is the scoring itself: predictions, the probabilities when the estimator has
``predict_proba``, in the order of ``classes``.

``joblib.load`` unpickles, which runs code: point it only at a folder you trust (the trainer's).

>>> import tempfile, pathlib, numpy as np
>>> from sklearn.linear_model import SGDClassifier
>>> from streampipe.stages.builtins import checkpoints
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> X = np.array([[0.0, 1.0], [1.0, 0.0]] * 10); y = np.array([1, 0] * 10)
>>> model = SGDClassifier(loss="log_loss", random_state=0).fit(X, y)
>>> _ = checkpoints.save(d, 1, model, {"features": "x", "n_features": 2, "classes": [0, 1]})
>>> follower = ModelFollower(d, poll_seconds=0)
>>> follower.poll().version, follower.current.has_proba, follower.current.classes
(1, True, [0, 1])
>>> out = score(follower.current, np.array([[0.0, 1.0]]))
>>> out.version, out.prediction.tolist(), out.probabilities.shape
(1, [1], (1, 2))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from streampipe._rotating import last_row
from streampipe.stages.builtins import checkpoints

PROBE_ROWS = 8            # rows of real features a new checkpoint must score before it serves
REASON_CHARS = 200        # an exception message in a log line is cut here: no dumps of data


@dataclass(frozen=True)
class Served:
    """One checkpoint version in service: the model and what scoring needs to know of it."""

    version: int
    meta: dict[str, Any]
    model: Any
    classifier: bool
    has_proba: bool
    classes: list[Any] | None
    n_features: int | None
    loaded_at: float

    @classmethod
    def of(cls, cp: checkpoints.Checkpoint) -> Served:
        model = cp.model
        from sklearn.base import is_classifier

        classifier = bool(is_classifier(model)) and hasattr(model, "classes_")
        n_features = cp.meta.get("n_features") or getattr(model, "n_features_in_", None)
        return cls(cp.version, cp.meta, model, classifier, classifier and hasattr(model, "predict_proba"),
                   np.asarray(model.classes_).tolist() if classifier else None,
                   int(n_features) if n_features else None, time.time())


@dataclass
class Scores:
    """What one version said of a batch: a prediction per row and, for a classifier with
    ``predict_proba``, an n x k array of probabilities in the order of the version's classes."""

    version: int
    prediction: np.ndarray
    probabilities: np.ndarray | None


def score(served: Served, X: np.ndarray, proba: bool = True) -> Scores:
    """Score ``X`` (n x d, finite: the vectoriser checked it) with one version."""
    import sklearn

    with sklearn.config_context(assume_finite=True):
        prediction = served.model.predict(X)
        probabilities = served.model.predict_proba(X) if proba and served.has_proba else None
    return Scores(served.version, np.asarray(prediction), probabilities)


def reason(exc: BaseException) -> str:
    """An exception as a short log phrase: its type and the start of its message."""
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:REASON_CHARS]}{'...' if len(text) > REASON_CHARS else ''}"


class ModelFollower:
    """The newest valid checkpoint of ``folder``, swapped in by :meth:`poll` (see the module docstring).

    With ``pinned`` it serves that one version instead, loaded (and probed) once it is committed,
    never swapped: the fixed side of an A/B comparison."""

    def __init__(self, folder: Path, poll_seconds: float = 0.25, pinned: int | None = None) -> None:
        self.folder = folder
        self.poll_seconds = float(poll_seconds)
        self.pinned = pinned
        self.current: Served | None = None
        self.bad: set[int] = set()
        self.swaps = 0
        self.sample: np.ndarray | None = None      # the last rows scored, to probe a new version with
        self._polled_at = float("-inf")

    @property
    def version(self) -> int:
        return self.current.version if self.current is not None else 0

    def remember(self, X: np.ndarray) -> None:
        """Keep a few rows of features just scored: the next version is probed on them."""
        if len(X):
            self.sample = X[-PROBE_ROWS:]

    def poll(self, force: bool = False) -> Served | None:
        """Swap in a newer valid version if one was committed; return it (None: no change)."""
        now = time.monotonic()
        if not force and now - self._polled_at < self.poll_seconds:
            return None
        self._polled_at = now
        while True:
            cp = self._candidate()
            if cp is None:
                return None
            try:
                candidate = Served.of(cp)
                self._probe(candidate)
            except Exception as exc:      # a model that cannot score is not served, whatever it raised
                self.bad.add(cp.version)
                keeps = f"version {self.version} keeps serving" if self.current else "no model serves yet"
                logger.warning(f"skipping checkpoint in {self.folder}: version {cp.version} fails to predict "
                               f"({reason(exc)}); {keeps}")
                continue                  # an older version above the current one may still do
            previous, self.current = self.current, candidate
            self.swaps += 1
            logger.info(f"serving checkpoint version {candidate.version} (trained on "
                        f"{cp.meta.get('records_seen')} records)"
                        + (f", after version {previous.version}" if previous else ""))
            return candidate

    def _candidate(self) -> checkpoints.Checkpoint | None:
        """The version to try next: the newest valid one above the current, or the pinned one."""
        if self.pinned is None:
            return checkpoints.load_newest(self.folder, above=self.version, skip=self.bad)
        if self.current is not None or self.pinned in self.bad:
            return None
        if self.pinned not in checkpoints.committed_versions(self.folder):
            return None                   # not written yet (or pruned): looked for again at the next poll
        try:
            return checkpoints.load(self.folder, self.pinned)
        except checkpoints.CheckpointError as exc:
            logger.warning(f"pinned checkpoint in {self.folder} cannot serve: {exc}")
            self.bad.add(self.pinned)
            return None

    def _probe(self, served: Served) -> None:
        sample = self.sample               # the rows the stream carries: a model that cannot take them is no use
        if sample is None:
            if served.n_features is None:
                return            # nothing to probe with: the first batch will tell
            sample = np.zeros((1, served.n_features))
        out = score(served, sample)
        if len(out.prediction) != len(sample):
            raise ValueError(f"predict gave {len(out.prediction)} answers for {len(sample)} rows")


def holdout_scores(path: Path, version: int) -> dict[str, Any] | None:
    """The evaluator's last row for ``version`` in its ``metrics.jsonl`` (its end only), or None."""
    return last_row(path, lambda row: row.get("model_version") == version)
