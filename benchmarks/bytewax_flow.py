"""The benchmark's job as a bytewax dataflow, written the way bytewax's documentation shows.

    python -m bytewax.run "bytewax_flow:get_flow(200000, '/tmp/out')"                  # 1 worker
    python -m bytewax.run "bytewax_flow:get_flow(200000, '/tmp/out')" -i 0 -a "127.0.0.1:2101;127.0.0.1:2102"
    python -m bytewax.run "bytewax_flow:get_flow(200000, '/tmp/out')" -i 1 -a "127.0.0.1:2101;127.0.0.1:2102"

(``throughput.py --peers`` runs it so; this folder on ``PYTHONPATH``; needs ``pip install -e '.[bench]'``.)

The stage work is :mod:`peer_work`'s (written once in the benchmark, never streampipe's stage
code, so this baseline does not move when streampipe's stages do):

- the source is a :class:`~bytewax.inputs.DynamicSource`: one partition per worker, worker ``i``
  of ``n`` making :func:`peer_work.batches` (the records of streampipe's generator, seed 7, ids
  ``i, i + n, ...``), 1000 records per ``next_batch``; so no record crosses between workers;
- the normalizer: ``filter_map`` with :class:`peer_work.RecordNormalizer` (per record, plain
  Python), or with ``batch=True`` ``flat_map_batch`` with :class:`peer_work.BatchNormalizer`
  (numpy per batch, bytewax's fastest form of the job);
- ``seen=True`` adds ``map`` with :func:`peer_work.seen` (``{**r, "seen": 1}``) after it: the
  per-record user stage of streampipe's ``sp-alo-userstage``;
- the sink is a :class:`~bytewax.outputs.DynamicSink`: each worker appends to its own
  ``records.<worker>.jsonl`` (:class:`peer_work.JsonLines`: one ``orjson`` line per record, one
  ``write`` + ``flush`` per batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peer_work
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

Record = dict[str, Any]


class _GeneratorPartition(StatelessSourcePartition[Record]):
    def __init__(self, count: int, worker: int, workers: int) -> None:
        self.batches: Iterator[list[Record]] = peer_work.batches(count, worker, workers)

    def next_batch(self) -> list[Record]:
        return next(self.batches)      # StopIteration at the end: bytewax's end of this partition


class GeneratorSource(DynamicSource[Record]):
    """The generator's stream, split between the workers by id (see the module docstring)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _GeneratorPartition:
        return _GeneratorPartition(self.count, worker_index, worker_count)


class _JsonLinesPartition(StatelessSinkPartition[Record]):
    def __init__(self, path: Path) -> None:
        self.sink = peer_work.JsonLines(path)

    def write_batch(self, items: list[Record]) -> None:
        self.sink.write(items)

    def close(self) -> None:
        self.sink.close()


class JsonLinesSink(DynamicSink[Record]):
    """Each worker appends to ``<folder>/records.<worker>.jsonl``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _JsonLinesPartition:
        return _JsonLinesPartition(self.folder / f"records.{worker_index}.jsonl")


def get_flow(count: int, folder: str, batch: bool = False, seen: bool = False) -> Dataflow:
    """generator -> normalizer [-> seen] -> JSON lines, ``count`` records, output files in ``folder``."""
    flow = Dataflow("streampipe-bench")
    records = op.input("generator", flow, GeneratorSource(count))
    if batch:
        normalized = op.flat_map_batch("normalizer", records, peer_work.BatchNormalizer())
    else:
        normalized = op.filter_map("normalizer", records, peer_work.RecordNormalizer())
    if seen:
        normalized = op.map("seen", normalized, peer_work.seen)
    op.output("sink", normalized, JsonLinesSink(folder))
    return flow
