"""An in-process harness: drive a stage with lists of records, no sockets, no processes.

Fast and exact, for unit tests and for trying a stage in a REPL. It calls the stage through the
same :class:`stages.process.Processor` the runtime uses, so failures isolate and dead-letter
the same way.

>>> from streampipe.stages.normalizer import Normalizer
>>> run = run_stage(Normalizer(), [[{"id": 0, "x": [1.0], "y": 0}, {"id": 1, "x": "bad", "y": 0}]])
>>> len(run.records), [reason for _, reason in run.dead_letters]
(1, ["field 'x': expected vector, got str"])
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streampipe.stages import wire
from streampipe.stages.api import Batch, Record, Stage, StageContext, as_stage, is_source
from streampipe.stages.process import Processor


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    by_output: dict[str, list[Record]] = field(default_factory=dict)
    dead_letters: list[tuple[Record, str]] = field(default_factory=list)


def run_stage(stage: Stage | object, batches: Iterable[Batch] = (), *, run_dir: Path | None = None,
              limit: int | None = None, setup: bool = True, teardown: bool = True,
              context: dict[str, Any] | None = None) -> Run:
    """Run ``stage`` over ``batches`` (or, for a source, take up to ``limit`` records, stopping
    early at the end of its stream or the first time it is idle, i.e. yields ``None``).

    Every record is round-tripped through msgpack as it would be on a socket, so a stage that
    emits something the wire cannot carry fails here too.
    """
    stage = as_stage(stage)    # a plain class's instance or a function works as in a pipeline
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="streampipe-test-"))
    stage.context = StageContext(run_dir=run_dir, **(context or {}))
    result = Run()
    if setup:
        stage.setup()
    if is_source(stage):
        for record in stage.generate():  # type: ignore[attr-defined]
            if record is None:
                break
            _collect(stage, [record], result)
            if limit is not None and len(result.records) >= limit:
                break
    else:
        processor = Processor(stage)
        for batch in batches:
            batch = wire.unpackb(wire.packb(batch))
            outcome = processor.run(batch)
            result.dead_letters.extend((r, reason) for r, reason, _ in outcome.rejected)
            _collect(stage, outcome.records, result)
        processor.close()
    if teardown:
        stage.teardown()
    return result


def _collect(stage: Stage, records: list[Record], result: Run) -> None:
    records = wire.unpackb(wire.packb(records))
    result.records.extend(records)
    for r in records:
        result.by_output.setdefault(stage.route(r), []).append(r)
