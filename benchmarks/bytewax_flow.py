"""The benchmark's job as a bytewax dataflow, written the way bytewax's documentation shows.

    python -m bytewax.run "bytewax_flow:get_flow(200000, '/tmp/out')"                  # 1 worker
    python -m bytewax.run "bytewax_flow:get_flow(200000, '/tmp/out')" -i 0 -a "127.0.0.1:2101;127.0.0.1:2102"
    python -m bytewax.run "bytewax_flow:get_flow(200000, '/tmp/out')" -i 1 -a "127.0.0.1:2101;127.0.0.1:2102"

(``throughput.py --peers`` runs it so; this folder on ``PYTHONPATH``; needs ``pip install -e '.[bench]'``.)

``input`` -> ``filter_map`` -> ``output``, one record at a time (``batch=True``: ``flat_map_batch``
with ``Normalizer.process``, the raw chain's numpy work per batch, bytewax's fastest form of it):

- the source is a :class:`~bytewax.inputs.DynamicSource`: one partition per worker, worker ``i``
  of ``n`` making the records of streampipe's ``Generator`` (same seed) with ids ``i, i + n, ...``
  (what replica ``i`` of a streampipe generator with ``replicas: n`` makes), 100 records per
  ``next_batch`` (streampipe's ``max_batch``); so no record crosses between workers;
- the step is the normalizer's per-record work, per record: :meth:`Normalizer.check` (the same
  validation), then the running mean and variance updated with this record (Welford) and its
  vector standardised with them, in plain Python, as a bytewax user writes a ``map`` (a
  ``filter_map``: an invalid record is dropped). ``Normalizer.process([record])`` per record would
  cost ~140 us of numpy call overhead a record: that would measure numpy, not bytewax;
- the sink is a :class:`~bytewax.outputs.DynamicSink`: each worker appends to its own
  ``records.<worker>.jsonl`` one ``orjson`` line per record, one ``write`` + ``flush`` per batch
  (what the raw chain's sink does).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import orjson
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from streampipe import StageContext
from streampipe.launcher.config import StageSettings
from streampipe.stages.generator import Generator
from streampipe.stages.normalizer import Normalizer

SEED = 7          # throughput.py's SEED
BATCH = int(StageSettings.model_fields["max_batch"].default)   # records per batch: streampipe's default max_batch

Record = dict[str, Any]


class _GeneratorPartition(StatelessSourcePartition[Record]):
    def __init__(self, count: int, worker: int, workers: int) -> None:
        gen = Generator(count=count, seed=SEED)
        gen.context = StageContext(name="generator", replica=worker, replicas=workers)
        self.records = gen.generate()          # rate 0: never yields None

    def next_batch(self) -> list[Record]:
        batch = list(itertools.islice(self.records, BATCH))
        if not batch:
            raise StopIteration
        return batch


class GeneratorSource(DynamicSource[Record]):
    """streampipe's synthetic stream, split between the workers by id (see the module docstring)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _GeneratorPartition:
        return _GeneratorPartition(self.count, worker_index, worker_count)


class RecordNormalizer:
    """The normalizer, one record at a time: same validation, same scaling (population std, 0 -> 1,
    6 decimals), with statistics that include the record itself.

    >>> n = RecordNormalizer()
    >>> n({"id": 0, "x": [1.0, 10.0], "y": 0})["x"], n({"id": 1, "x": [3.0, 30.0], "y": 1})["x"]
    ([0.0, 0.0], [1.0, 1.0])
    >>> n({"id": 2, "x": "oops", "y": 0}) is None
    True
    """

    def __init__(self) -> None:
        self.check = Normalizer().check
        self.n = 0
        self.mean: list[float] = []
        self.m2: list[float] = []

    def __call__(self, record: Record) -> Record | None:
        if self.check(record) is not None:
            return None
        x = record["x"]
        if self.n and len(x) != len(self.mean):
            return None
        if not self.n:
            self.mean, self.m2 = [0.0] * len(x), [0.0] * len(x)
        self.n += 1
        n, mean, m2 = self.n, self.mean, self.m2
        scaled = []
        for i, v in enumerate(x):
            delta = v - mean[i]
            mean[i] += delta / n
            m2[i] += delta * (v - mean[i])
            std = math.sqrt(m2[i] / n) or 1.0
            scaled.append(round((v - mean[i]) / std, 6))
        return {**record, "x": scaled}


class _JsonLinesPartition(StatelessSinkPartition[Record]):
    def __init__(self, path: Path) -> None:
        self.file = open(path, "ab")

    def write_batch(self, items: list[Record]) -> None:
        lines = [orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in items]
        lines.append(b"")
        self.file.write(b"\n".join(lines))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class JsonLinesSink(DynamicSink[Record]):
    """Each worker appends to ``<folder>/records.<worker>.jsonl``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _JsonLinesPartition:
        return _JsonLinesPartition(self.folder / f"records.{worker_index}.jsonl")


def get_flow(count: int, folder: str, batch: bool = False) -> Dataflow:
    """generator -> normalizer -> JSON lines, ``count`` records, output files in ``folder``.

    ``batch``: the step is ``flat_map_batch`` with streampipe's own ``Normalizer.process`` (records
    path) on each batch bytewax hands it: exactly the raw chain's stage work, numpy per batch.
    """
    flow = Dataflow("streampipe-bench")
    records = op.input("generator", flow, GeneratorSource(count))
    if batch:
        normalized = op.flat_map_batch("normalizer", records, Normalizer(columnar=False).process)
    else:
        normalized = op.filter_map("normalizer", records, RecordNormalizer())
    op.output("sink", normalized, JsonLinesSink(folder))
    return flow
