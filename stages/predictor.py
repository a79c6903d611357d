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
(:mod:`streampipe.stages.serving`).

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

Options:
    checkpoint_dir      the trainer's checkpoint folder, relative to the run directory
    features            the field holding the vector (default: the checkpoint's, else ``x``)
    prediction          field name for the prediction
    probabilities       field name for the probabilities, or null for none
    version_field       field name for the model version
    poll_seconds        least time between two looks at the checkpoint folder

>>> import itertools, tempfile, pathlib
>>> from streampipe.stages.generator import Generator
>>> from streampipe.stages.normalizer import Normalizer
>>> from streampipe.stages.trainer import Trainer
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

from typing import Any

import numpy as np

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.columns import Column, Columns
from streampipe.stages.learning import Vectoriser
from streampipe.stages.serving import ModelFollower, Scores, score

DEFAULT_POLL_S = 0.25    # a new checkpoint serves within this (plus one batch) of its commit


class Predictor(Stage):
    columnar = True

    def __init__(self, checkpoint_dir: str = "checkpoints", features: str | None = None,
                 prediction: str = "prediction", probabilities: str | None = "probabilities",
                 version_field: str = "model_version", poll_seconds: float = DEFAULT_POLL_S,
                 columnar: bool = True) -> None:
        super().__init__()
        self.columnar = bool(columnar)
        if poll_seconds < 0:
            raise ValueError("poll_seconds must be >= 0")
        names = [n for n in (prediction, probabilities, version_field) if n is not None]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError("prediction, probabilities and version_field must be distinct field names")
        self.checkpoint_dir, self.features_option = checkpoint_dir, features
        self.prediction, self.probabilities, self.version_field = prediction, probabilities, version_field
        self.poll_seconds = float(poll_seconds)
        self.follower: ModelFollower | None = None
        self.scored = self.unscored = 0
        self._vectorise = Vectoriser(features or "x", label=None)
        self._serving = 0          # the version the vectoriser is set for

    def setup(self) -> None:
        self.follower = ModelFollower(self.context.resolve_output(self.checkpoint_dir), self.poll_seconds)
        self.follower.poll(force=True)

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
        if served is None:
            self.unscored += n
            return self._attach(arrays.records, None)
        out = score(served, arrays.X, proba=self.probabilities is not None)
        follower.remember(arrays.X)
        self.scored += n
        return self._attach(arrays.records, out)

    def _attach(self, records: list[Record] | Columns, out: Scores | None) -> list[Record] | Columns:
        n = len(records)
        if isinstance(records, Columns):
            cols: dict[str, Column] = {}
            if out is None:
                cols = {name: [None] * n for name in self._fields()}
            else:
                cols[self.prediction] = wire_column(out.prediction)
                if self.probabilities is not None and out.probabilities is not None:
                    cols[self.probabilities] = np.asarray(out.probabilities, dtype=np.float64)
                cols[self.version_field] = np.full(n, out.version, dtype=np.int64)
            return Columns({**records.data, **cols}, n)
        if out is None:
            nulls = dict.fromkeys(self._fields())
            return [{**r, **nulls} for r in records]
        pf, vf, version = self.prediction, self.version_field, out.version
        preds = out.prediction.tolist()
        if self.probabilities is not None and out.probabilities is not None:
            qf = self.probabilities
            return [{**r, pf: p, qf: q, vf: version}
                    for r, p, q in zip(records, preds, out.probabilities.tolist(), strict=True)]
        return [{**r, pf: p, vf: version} for r, p in zip(records, preds, strict=True)]

    def _fields(self) -> list[str]:
        return [n for n in (self.prediction, self.probabilities, self.version_field) if n is not None]

    def stats(self) -> dict[str, Any]:
        follower = self.follower
        return {"model_version": follower.version if follower else 0, "scored": self.scored,
                "unscored": self.unscored, "skipped_versions": len(follower.bad) if follower else 0}


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
