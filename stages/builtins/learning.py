"""What the trainer and the evaluator share: estimators by name, records -> arrays, rolling metrics.

- :func:`import_estimator` turns ``"sklearn.linear_model.SGDClassifier"`` (or ``"pkg.mod:Cls"``)
  into the class.
- :class:`Vectoriser` turns a batch of records into ``X`` (n x d floats) and ``y`` in one numpy
  pass; a columnar batch (:class:`Columns`) gives its feature column, already an n x d array, and
  its label column to scikit-learn as they are (checked in numpy, no per-record work); a batch with any bad record falls back to checking records one by one, and each bad one
  (missing field, not a vector, wrong length, non-numeric, not finite, unknown label) is handed to
  ``reject(record, reason)`` so the stage can dead-letter it and go on.
- :class:`Ring` keeps the last ``capacity`` values of a stream (for metrics over a window).
- :func:`classification_metrics` / :func:`regression_metrics`: the figures over a window.

>>> v = Vectoriser(features="x", label="y", classes=[0, 1])
>>> bad = []
>>> arrays = v([{"x": [1.0, 2.0], "y": 1}, {"x": [1.0], "y": 0}, {"x": [3, "a"], "y": 0}],
...            lambda record, reason: bad.append(reason))
>>> arrays.X.tolist(), arrays.y.tolist(), bad
([[1.0, 2.0]], [1], ["field 'x': expected 2 values, got 1", "field 'x': non-numeric value 'a'"])
>>> r = Ring(3); r.push(np.array([1.0, 0.0, 1.0, 1.0])); len(r), float(r.values().mean())
(3, 0.6666666666666666)
>>> classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), n_classes=2)
{'accuracy': 0.75, 'f1': 0.666667}
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streampipe.stages.api import Batch, Record
from streampipe.stages.columns import Columns

Reject = Callable[[Record, str], None]
NO_LABELS = np.empty(0)   # ``y`` of a Vectoriser that reads features only (label=None)

LOG_LOSS_EPS = 1e-15   # sklearn's clip: a confident wrong answer costs ~34.5 nats, not infinity
DIGITS = 6             # metrics are rounded for JSON lines and status: more digits are noise


def import_estimator(path: str) -> type:
    """The class named by a dotted path (``"sklearn.linear_model.SGDRegressor"``) or ``"module:Class"``."""
    module_name, sep, name = path.partition(":")
    if not sep:
        module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"estimator {path!r}: expected a dotted path such as 'sklearn.linear_model.SGDClassifier'")
    module = importlib.import_module(module_name)
    try:
        cls = getattr(module, name)
    except AttributeError:
        raise ImportError(f"estimator {path!r}: module {module_name!r} has no attribute {name!r}") from None
    if not isinstance(cls, type):
        raise TypeError(f"estimator {path!r} is not a class")
    return cls


@dataclass
class Arrays:
    """The usable part of a batch: the records kept, in order, and their features and labels."""

    records: list[Record] | Columns
    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.records)


class Vectoriser:
    """Records -> ``(X, y)``; bad records go to ``reject``.

    ``classes`` (a sequence) makes labels categorical: a label outside it is rejected. Without
    it labels must be finite numbers (regression). ``label=None`` reads features only (a record
    to score has no label yet): ``y`` is then empty. ``n_features`` is fixed by the first good
    record unless given.
    """

    def __init__(self, features: str = "x", label: str | None = "y", classes: Sequence[Any] | None = None,
                 n_features: int | None = None) -> None:
        self.features, self.label = features, label
        self.n_features = n_features
        self.set_classes(classes)

    def set_classes(self, classes: Sequence[Any] | np.ndarray | None) -> None:
        self.classes = None if classes is None else np.asarray(list(classes))
        self._class_set = None if classes is None else set(np.asarray(list(classes)).tolist())

    def __call__(self, batch: Batch | Columns, reject: Reject) -> Arrays:
        if isinstance(batch, Columns):
            return self.columns(batch, reject)
        if not batch:
            return Arrays([], np.empty((0, self.n_features or 0)), np.empty(0))
        f, lab = self.features, self.label
        try:
            X = np.asarray([r[f] for r in batch])
            y = NO_LABELS if lab is None else np.asarray([r[lab] for r in batch])
        except (KeyError, TypeError, ValueError, IndexError):
            return self._one_by_one(batch, reject)
        if self._usable(X, y):
            self.n_features = X.shape[1]
            return Arrays(batch, X.astype(float, copy=False), y)
        return self._one_by_one(batch, reject)

    def columns(self, batch: Columns, reject: Reject) -> Arrays:
        """A columnar batch as it is when its columns are usable as they stand, else record by record."""
        X = batch.data.get(self.features)
        y = NO_LABELS if self.label is None else batch.data.get(self.label)
        if isinstance(X, np.ndarray) and isinstance(y, np.ndarray) and len(batch) and self._usable(X, y):
            self.n_features = X.shape[1]
            return Arrays(batch, X.astype(float, copy=False), y)
        return self(batch.to_records(), reject)

    def _usable(self, X: np.ndarray, y: np.ndarray) -> bool:
        """Whether ``X`` and ``y`` go to scikit-learn as they are: an n x d numeric, finite ``X`` of
        the known width and labels that fit."""
        return (X.ndim == 2 and X.shape[1] > 0 and X.dtype.kind in "fiu" and y.ndim == 1
                and self.n_features in (None, X.shape[1]) and bool(np.isfinite(X).all())
                and (self.label is None or self._labels_ok(y)))

    def _labels_ok(self, y: np.ndarray) -> bool:
        if self.classes is None:
            return y.dtype.kind in "fiu" and bool(np.isfinite(y).all())
        if y.dtype.kind == "O" or (y.dtype.kind in "US") != (self.classes.dtype.kind in "US"):
            return False
        return bool(np.isin(y, self.classes).all())

    def _one_by_one(self, batch: Batch, reject: Reject) -> Arrays:
        good: list[Record] = []
        for record in batch:
            reason = self.check(record)
            if reason is None:
                good.append(record)
                if self.n_features is None:
                    self.n_features = len(record[self.features])
            else:
                reject(record, reason)
        if not good:
            return Arrays([], np.empty((0, self.n_features or 0)), np.empty(0))
        X = np.asarray([r[self.features] for r in good], dtype=float)
        y = NO_LABELS if self.label is None else np.asarray([r[self.label] for r in good])
        return Arrays(good, X, y)

    def check(self, record: Any) -> str | None:
        """Why one record cannot be used, or None."""
        f, lab = self.features, self.label
        if not isinstance(record, dict):
            return f"record is {type(record).__name__}, not a map"
        if f not in record:
            return f"missing field {f!r}"
        vector = record[f]
        if not isinstance(vector, (list, tuple)):
            return f"field {f!r}: expected a vector, got {type(vector).__name__}"
        if not vector:
            return f"field {f!r}: empty vector"
        for value in vector:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"field {f!r}: non-numeric value {_short(value)}"
        if self.n_features is not None and len(vector) != self.n_features:
            return f"field {f!r}: expected {self.n_features} values, got {len(vector)}"
        if not all(math.isfinite(v) for v in vector):
            return f"field {f!r}: not finite"
        if lab is None:
            return None
        if lab not in record:
            return f"missing label {lab!r}"
        value = record[lab]
        if self._class_set is not None:
            try:
                known = value in self._class_set and not isinstance(value, (list, dict))
            except TypeError:
                known = False
            if not known:
                return f"label {lab!r}: {_short(value)} is not one of the classes {sorted(self._class_set, key=str)}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"label {lab!r}: expected a finite number, got {_short(value)}"
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Ring:
    """The last ``capacity`` values pushed. Order is not kept: every metric here ignores it.

    Pushing a batch is a slice assignment (two at the wrap), so it costs one numpy call per
    batch however large the batch.
    """

    def __init__(self, capacity: int, dtype: Any = float) -> None:
        if capacity < 1:
            raise ValueError("a window holds at least 1 value")
        self.capacity = capacity
        self.buf = np.zeros(capacity, dtype=dtype)
        self.pos = 0
        self.count = 0

    def push(self, values: np.ndarray) -> None:
        k, cap = len(values), self.capacity
        if k >= cap:
            self.buf[:] = values[k - cap:]
            self.pos, self.count = 0, cap
            return
        end = self.pos + k
        if end <= cap:
            self.buf[self.pos:end] = values
        else:
            first = cap - self.pos
            self.buf[self.pos:] = values[:first]
            self.buf[:k - first] = values[first:]
        self.pos = end % cap
        self.count = min(cap, self.count + k)

    def values(self) -> np.ndarray:
        return self.buf[:self.count]

    def mean(self) -> float | None:
        return float(self.buf[:self.count].mean()) if self.count else None

    def clear(self) -> None:
        self.pos = self.count = 0

    def __len__(self) -> int:
        return self.count


def classification_metrics(true_idx: np.ndarray, pred_idx: np.ndarray, n_classes: int,
                           log_loss: np.ndarray | None = None) -> dict[str, float | None]:
    """Accuracy, F1 (of the second class when binary, macro otherwise) and mean log-loss.

    Labels are class indices (``0 .. n_classes-1``). Macro F1 averages over the classes that
    occur in truth or prediction, as scikit-learn's ``f1_score(average="macro")`` does.
    """
    if len(true_idx) == 0:
        return {"accuracy": None, "f1": None}
    true_idx, pred_idx = true_idx.astype(np.int64), pred_idx.astype(np.int64)
    n = max(n_classes, 2)
    tp = np.bincount(true_idx[true_idx == pred_idx], minlength=n).astype(float)
    support = np.bincount(true_idx, minlength=n).astype(float)       # tp + fn
    predicted = np.bincount(pred_idx, minlength=n).astype(float)     # tp + fp
    denom = support + predicted
    f1_per = np.divide(2 * tp, denom, out=np.zeros(n), where=denom > 0)
    if n_classes <= 2:
        f1 = float(f1_per[1])
    else:
        present = denom > 0
        f1 = float(f1_per[present].mean()) if present.any() else 0.0
    out: dict[str, float | None] = {"accuracy": round(float((true_idx == pred_idx).mean()), DIGITS),
                                    "f1": round(f1, DIGITS)}
    if log_loss is not None and len(log_loss):
        out["log_loss"] = round(float(log_loss.mean()), DIGITS)
    return out


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    """MAE, RMSE and R2 (None while the window's labels do not vary)."""
    if len(y) == 0:
        return {"mae": None, "rmse": None, "r2": None}
    err = pred - y
    sse = float((err**2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    return {"mae": round(float(np.abs(err).mean()), DIGITS),
            "rmse": round(math.sqrt(sse / len(y)), DIGITS),
            "r2": round(1.0 - sse / sst, DIGITS) if sst > 0 else None}


def pointwise_log_loss(proba: np.ndarray, true_idx: np.ndarray) -> np.ndarray:
    """``-log p(true class)`` per row, clipped like scikit-learn's ``log_loss``."""
    p = proba[np.arange(len(true_idx)), true_idx]
    return -np.log(np.clip(p, LOG_LOSS_EPS, 1.0))
