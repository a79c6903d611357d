"""predictor: scores every record with the trainer's newest valid checkpoint, swapped live.

Wire it beside the trainer (``inputs: [normalizer]``) and point it at the trainer's
``checkpoint_dir``. Each record goes on with three fields more:

    prediction      the class (a classifier) or the value (a regressor) the model gives it
    probabilities   a classifier with ``predict_proba``: one per class, in the order of the
                    model's classes (the checkpoint's metadata ``classes``); absent otherwise
    model_version   the checkpoint version that scored it

The checkpoint folder is looked at (an ``os.scandir``) at most every ``poll_seconds``, before a
batch; a newer committed version is loaded, probed on the last rows scored, and swapped in
*between two batches*: a batch is scored by one version, every record is scored, the stage
is not restarted. A version that fails to load (torn, damaged, not a model) or to predict is
skipped with a logged reason and never tried again; the version in service keeps serving
(:mod:`streampipe.stages.builtins.serving`).

Before the first checkpoint exists the records pass with ``prediction``, ``probabilities`` and
``model_version`` set to null, at once: a stream is not held for a model that may take a while
(the trainer's first checkpoint comes after ``checkpoint_every`` records or
``checkpoint_seconds``), and holding would be a deadlock where the predictor and the trainer
share a producer (the producer blocks on the held edge, so the trainer never gets the records
that would make its first checkpoint). A sink that must see only scored records filters on
``model_version``. A record the model cannot take (no feature vector, the wrong width, not
finite) is dead-lettered with the reason, as the trainer does.

Columns: the predictor is columnar (``columnar: false`` turns it off): a batch of columns gives
``predict`` its feature column as one n x d array, and the answers go out as columns
(``probabilities`` an n x k column).

A/B and shadow: with ``pinned: 7`` every record is also scored by version 7 of the same folder
(kept while newer ones take over the main fields), with ``shadow_dir`` by the newest valid
checkpoint of a second trainer's folder; those answers go under the same names with
``shadow_prefix`` (``shadow_prediction``, ``shadow_probabilities``, ``shadow_model_version``), so
a sink or an evaluator downstream compares the two on the very same records. The shadow never
fails a batch: until its version exists (a pinned one not written yet or pruned: raise the
trainer's ``keep``), or when it cannot score the rows, its fields are null and a warning says why.

Options:
    checkpoint_dir      the trainer's checkpoint folder, relative to the run directory
    features            the field holding the vector (default: the checkpoint's, else ``x``)
    prediction          field name for the prediction
    probabilities       field name for the probabilities, or null for none
    version_field       field name for the model version
    poll_seconds        least time between two looks at the checkpoint folder
    pinned              a version of checkpoint_dir that also scores every record (A/B)
    shadow_dir          another trainer's checkpoint folder whose newest version also scores (shadow)
    shadow_prefix       put before the field names of the second scorer's answers

>>> import itertools, tempfile, pathlib
>>> from streampipe.stages.builtins.generator import Generator
>>> from streampipe.stages.builtins.normalizer import Normalizer
>>> from streampipe.stages.builtins.trainer import Trainer
>>> from streampipe.testing import run_stage
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> records = Normalizer().process(list(itertools.islice(Generator(seed=1).generate(), 2000)))
>>> _ = run_stage(Trainer(checkpoint_seconds=0), [records[:1000]], run_dir=d)   # version 1
>>> out = run_stage(Predictor(poll_seconds=0), [records[1000:1100]], run_dir=d).records
>>> r = out[0]
>>> r["model_version"], r["prediction"] in (0, 1), len(r["probabilities"]), r["id"] == records[1000]["id"]
(1, True, 2, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.builtins.learning import Vectoriser
from streampipe.stages.builtins.serving import ModelFollower, Scores, reason, score
from streampipe.stages.columns import Column, Columns

DEFAULT_POLL_S = 0.25    # a new checkpoint serves within this (plus one batch) of its commit
NOT_BOTH = "give pinned (a version of checkpoint_dir) or shadow_dir (another trainer's), not both"


@dataclass(frozen=True)
class Fields:
    """The names one scorer's answers go under in a record."""

    prediction: str
    probabilities: str | None
    version: str

    def names(self) -> list[str]:
        return [n for n in (self.prediction, self.probabilities, self.version) if n is not None]

    def prefixed(self, prefix: str) -> Fields:
        return Fields(prefix + self.prediction, None if self.probabilities is None else prefix + self.probabilities,
                      prefix + self.version)


class Predictor(Stage):
    columnar = True

    def __init__(self, checkpoint_dir: str = "checkpoints", features: str | None = None,
                 prediction: str = "prediction", probabilities: str | None = "probabilities",
                 version_field: str = "model_version", poll_seconds: float = DEFAULT_POLL_S,
                 pinned: int | None = None, shadow_dir: str | None = None, shadow_prefix: str = "shadow_",
                 columnar: bool = True) -> None:
        super().__init__()
        self.columnar = bool(columnar)
        if poll_seconds < 0:
            raise ValueError("poll_seconds must be >= 0")
        if pinned is not None and shadow_dir is not None:
            raise ValueError(NOT_BOTH)
        if pinned is not None and int(pinned) < 1:
            raise ValueError("pinned is a checkpoint version: >= 1")
        self.fields = Fields(prediction, probabilities, version_field)
        self.shadow_fields = self.fields.prefixed(shadow_prefix) if pinned is not None or shadow_dir else None
        names = self.fields.names() + (self.shadow_fields.names() if self.shadow_fields else [])
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError("prediction, probabilities, version_field (and with a shadow, shadow_prefix + each) "
                             "must be distinct field names")
        self.checkpoint_dir, self.features_option = checkpoint_dir, features
        self.pinned, self.shadow_dir = None if pinned is None else int(pinned), shadow_dir
        self.poll_seconds = float(poll_seconds)
        self.follower: ModelFollower | None = None
        self.shadow: ModelFollower | None = None
        self.scored = self.unscored = 0
        self._vectorise = Vectoriser(features or "x", label=None)
        self._serving = 0          # the version the vectoriser is set for
        self._shadow_failed = 0    # the shadow version whose failure was logged

    @staticmethod
    def option_problems(options: dict[str, Any]) -> list[tuple[str | None, str]]:
        """What ``streampipe validate`` refuses beyond the signature: two second scorers."""
        if options.get("pinned") is not None and options.get("shadow_dir") is not None:
            return [("pinned", NOT_BOTH)]
        return []

    def setup(self) -> None:
        folder = self.context.resolve_output(self.checkpoint_dir)
        self.follower = ModelFollower(folder, self.poll_seconds)
        self.follower.poll(force=True)
        if self.shadow_fields is not None:
            shadow_folder = folder if self.shadow_dir is None else self.context.resolve_output(self.shadow_dir)
            self.shadow = ModelFollower(shadow_folder, self.poll_seconds, pinned=self.pinned)
            self.shadow.poll(force=True)

    def process(self, batch: Batch | Columns) -> list[Record] | Columns:  # type: ignore[override]
        follower = self.follower
        if follower is None:               # process() without setup(): a harness that skips it
            self.setup()
            follower = self.follower
        assert follower is not None
        follower.poll()
        served = follower.current          # taken once: the whole batch is scored by this version
        if served is not None and served.version != self._serving:
            self._serving = served.version
            self._vectorise.features = self.features_option or served.meta.get("features") or "x"
            self._vectorise.n_features = served.n_features
        arrays = self._vectorise(batch, self.reject)
        n = len(arrays)
        if not n:
            return []
        out = None
        if served is None:
            self.unscored += n
        else:
            out = score(served, arrays.X, proba=self.fields.probabilities is not None)
            follower.remember(arrays.X)
            self.scored += n
        parts = [(self.fields, out)]
        if self.shadow_fields is not None:
            parts.append((self.shadow_fields, self._shadow_scores(arrays.X)))
        return attach(arrays.records, parts)

    def _shadow_scores(self, X: np.ndarray) -> Scores | None:
        """The second version's answers on the same rows; None (null fields) when it has none or
        cannot score them: the shadow never fails a batch of the version in service."""
        shadow = self.shadow
        if shadow is None:
            return None
        shadow.remember(X)
        shadow.poll()
        other = shadow.current
        if other is None:
            return None
        try:
            return score(other, X, proba=self.fields.probabilities is not None)
        except Exception as exc:      # whatever the shadow model raises stays on the shadow side
            if self._shadow_failed != other.version:
                self._shadow_failed = other.version
                logger.warning(f"shadow checkpoint version {other.version} in {shadow.folder} fails to predict "
                               f"({reason(exc)}): its fields are null")
            return None

    def stats(self) -> dict[str, Any]:
        follower, shadow = self.follower, self.shadow
        out: dict[str, Any] = {"model_version": follower.version if follower else 0, "scored": self.scored,
                               "unscored": self.unscored, "skipped_versions": len(follower.bad) if follower else 0}
        if self.shadow_fields is not None:
            out["shadow_version"] = shadow.version if shadow else 0
        return out


def attach(records: list[Record] | Columns, parts: list[tuple[Fields, Scores | None]]) -> list[Record] | Columns:
    """The records with each scorer's answers under its fields (nulls where it gave none)."""
    n = len(records)
    if isinstance(records, Columns):
        cols: dict[str, Column] = {}
        for fields, out in parts:
            if out is None:
                cols.update({name: [None] * n for name in fields.names()})
                continue
            cols[fields.prediction] = wire_column(out.prediction)
            if fields.probabilities is not None and out.probabilities is not None:
                cols[fields.probabilities] = np.asarray(out.probabilities, dtype=np.float64)
            cols[fields.version] = np.full(n, out.version, dtype=np.int64)
        return Columns({**records.data, **cols}, n)
    if len(parts) == 1 and parts[0][1] is not None:       # the common case, one comprehension
        fields, out = parts[0]
        assert out is not None
        pf, vf, version = fields.prediction, fields.version, out.version
        preds = out.prediction.tolist()
        if fields.probabilities is not None and out.probabilities is not None:
            qf = fields.probabilities
            return [{**r, pf: p, qf: q, vf: version}
                    for r, p, q in zip(records, preds, out.probabilities.tolist(), strict=True)]
        return [{**r, pf: p, vf: version} for r, p in zip(records, preds, strict=True)]
    names: list[str] = []
    values: list[list[Any]] = []
    for fields, out in parts:
        if out is None:
            names += fields.names()
            values += [[None] * n for _ in fields.names()]
            continue
        names.append(fields.prediction)
        values.append(out.prediction.tolist())
        if fields.probabilities is not None and out.probabilities is not None:
            names.append(fields.probabilities)
            values.append(out.probabilities.tolist())
        names.append(fields.version)
        values.append([out.version] * n)
    return [{**r, **dict(zip(names, row))} for r, *row in zip(records, *values)]


def wire_column(values: np.ndarray) -> Column:
    """Predictions as a column the wire carries: int64, float64 or bool arrays; anything else
    (string labels, objects) a list of Python values."""
    kind = values.dtype.kind
    if kind in "iu":
        return values.astype(np.int64, copy=False)
    if kind == "f":
        return values.astype(np.float64, copy=False)
    if kind == "b":
        return values.astype(np.bool_, copy=False)
    return values.tolist()
