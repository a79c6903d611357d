"""User stages for the benchmarks (``type: bench_stages:LatencySink`` in a services.yaml beside a copy).

Kept free of benchmark machinery: these are ordinary streampipe stages, imported by the stage
process with the config's folder on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from streampipe import Batch, Record, Stage

SAVE_EVERY_S = 1.0     # the samples file is rewritten this often, and at teardown


class LatencySink(Stage):
    """A sink that records ``time.time() - record["t"]`` (ms) for every record it receives.

    ``output`` (relative to the run directory) gets ``{"samples": [[id, ms], ...]}``, written
    atomically every second and at teardown; the benchmark computes the percentiles from it.
    """

    def __init__(self, output: str = "latency.json", **options: Any) -> None:
        super().__init__(**options)
        self.output = output
        self.samples: list[list[float]] = []
        self._saved_at = 0.0

    def process(self, batch: Batch) -> list[Record]:
        now = time.time()
        for record in batch:
            self.samples.append([record.get("id", -1), (now - record["t"]) * 1000.0])
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self.save()
        return []

    def save(self) -> None:
        path = self.context.resolve_output(self.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"samples": self.samples}))
        os.replace(tmp, path)
        self._saved_at = time.monotonic()

    def teardown(self) -> None:
        self.save()

    def stats(self) -> dict[str, Any]:
        return {"written": len(self.samples)}


class SklearnStage(Stage):
    """Stand-in for the trainer (used only if ``stages/builtins/trainer.py`` is absent): imports
    scikit-learn and fits an ``SGDClassifier`` once in ``setup``, then learns from each batch."""

    def setup(self) -> None:
        import numpy as np
        from sklearn.linear_model import SGDClassifier

        self.model = SGDClassifier(loss="log_loss")
        self.model.partial_fit(np.zeros((2, 8)), [0, 1], classes=[0, 1])

    def process(self, batch: Batch) -> list[Record]:
        import numpy as np

        good = [r for r in batch if isinstance(r.get("x"), list) and len(r["x"]) == 8]
        if good:
            self.model.partial_fit(np.asarray([r["x"] for r in good], float), [int(r["y"]) for r in good])
        return []


def touch(record: Record) -> Record:
    """A plain function as a stage (``type: bench_stages:touch``): per-record Python work, the
    least a user's stage does."""
    record["hop"] = 1
    return record


class Seen:
    """The per-record user stage of ``throughput.py --peers`` (``type: bench_stages:Seen``): a
    plain class, no base, as the README teaches first; each record becomes a new one with one
    more field, what bytewax's ``map`` gets in the same run (``peer_work.seen``)."""

    def process(self, batch: Batch) -> list[Record]:
        return [{**r, "seen": 1} for r in batch]
