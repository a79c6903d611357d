"""The consumer's Parquet output (``format: parquet``): a folder of part files, one per checkpoint.

A Parquet file is unreadable until its footer is written, so nothing is ever appended to one.
The sink's rows go first to a **staging file** beside its state (``state/<stage>.<r>.sink.part-
000042.arrows``, an Arrow IPC stream: one record batch per ``process`` call, written straight to
the kernel, so a SIGKILL loses nothing the sink acknowledged). A checkpoint (:meth:`Parts.seal`)
turns the staging file into ``<folder>/part-000042.parquet``: written to a temp name in the
folder, fsynced, renamed (:func:`~streampipe.stages.state.atomic_write`). A reader of the folder
sees whole parts only; the temp names start with a dot and end in ``.tmp``, which pyarrow,
Polars and DuckDB skip (``*.parquet``).

Staging file ``k`` becomes part ``k``, and the consumer's saved state names the next part number
(:attr:`Parts.next`), so after a crash the folder says how far it got (:meth:`Parts.recover`):

- a temp file: a part that was never renamed; deleted (its rows are still in the staging file);
- a part numbered at or above the saved counter: complete (renamed atomically) but not yet in the
  saved state: its rows are handed back so the sink marks their ids seen, and the staging file of
  the same number is deleted (its rows are in the part);
- a staging file at or above the counter with no part: its complete batches become that part now
  (a torn last batch was never acknowledged, and comes again).

The origin of every row (which source replica made it, for the sink's per-origin dedup) is kept
in the files without a column the user would see: per batch in the staging file's batch metadata,
as runs ``[[first row, origin], ...]`` in the part's schema metadata (key ``streampipe.origins``).

A part has one schema. A batch whose columns differ is cast to it where that is lossless (an int
column into a float one, a null column into any, a missing column as nulls); otherwise the part
is sealed early and the next one takes the new schema (:meth:`Parts.append` says so).

Replica ``r > 0`` of a sink with ``replicas > 1`` names its parts ``part-000042.r.parquet``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from streampipe.stages.columns import MISSING, Columns
from streampipe.stages.state import atomic_write

ORIGINS_KEY = b"streampipe.origins"   # part metadata: [[first row, origin], ...]
ORIGIN_KEY = b"origin"                # staging batch metadata: the batch's origin (absent: None)
DIGITS = 6                            # part-000042: a million parts sort by name before a wider number appears

Staged = list[tuple[pa.RecordBatch, "str | None"]]


def to_arrow(batch: Columns) -> pa.RecordBatch:
    """``batch`` as one Arrow record batch: a 2-D numpy column becomes a fixed-size list column.

    Raises (``pa.ArrowException``, ``TypeError``, ``ValueError``) for a column Arrow cannot type.
    """
    arrays = []
    for col in batch.data.values():
        if isinstance(col, np.ndarray):
            if col.ndim == 1:
                arrays.append(pa.array(col))
            elif col.ndim == 2:
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(col).reshape(-1)), col.shape[1]))
            else:
                raise ValueError(f"a {col.ndim}-D column")
        else:
            arrays.append(pa.array([None if v is MISSING else v for v in col]))
    return pa.RecordBatch.from_arrays(arrays, names=batch.names())


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch | None:
    """``batch`` cast to ``schema`` without loss (missing columns as nulls), or None if it cannot be."""
    if batch.schema.equals(schema):
        return batch
    if not set(batch.schema.names) <= set(schema.names):
        return None
    arrays = []
    for field in schema:
        if field.name not in batch.schema.names:
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        col = batch.column(field.name)
        try:
            arrays.append(col if col.type == field.type else col.cast(field.type, safe=True))
        except (pa.ArrowException, TypeError, ValueError):
            return None
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class Parts:
    """One sink replica's part files in ``folder`` and its staging file under ``staging``."""

    def __init__(self, folder: Path, staging: Path, tag: str = "") -> None:
        self.folder, self.staging, self.tag = folder, staging, tag
        self.next = 0                                # the part the staging file becomes
        self.rows = 0                                # rows staged for it
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._sink: pa.OSFile | None = None
        self._schema: pa.Schema | None = None        # of the part being staged
        self._part = re.compile(rf"part-(\d+){re.escape(tag)}\.parquet")
        self._temp = re.compile(rf"\.part-\d+{re.escape(tag)}\.parquet\..*\.tmp")

    # -- names -------------------------------------------------------------------------------
    def part_path(self, k: int) -> Path:
        return self.folder / f"part-{k:0{DIGITS}d}{self.tag}.parquet"

    def staging_path(self, k: int) -> Path:
        return self.staging.with_name(f"{self.staging.name}.part-{k:0{DIGITS}d}.arrows")

    def numbers(self) -> list[int]:
        """The numbers of this replica's complete parts, ascending."""
        found = (self._part.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def staged_numbers(self) -> list[int]:
        prefix = f"{self.staging.name}.part-"
        return sorted(int(p.name[len(prefix):-len(".arrows")]) for p in self.staging.parent.glob(f"{prefix}*.arrows")
                      if p.name[len(prefix):-len(".arrows")].isdigit())

    # -- writing -----------------------------------------------------------------------------
    def append(self, batch: pa.RecordBatch, origin: str | None) -> bool:
        """Stage ``batch`` for the next part; False if it does not fit that part's schema (seal first)."""
        if self._writer is None:
            self.staging.parent.mkdir(parents=True, exist_ok=True)
            self._sink = pa.OSFile(str(self.staging_path(self.next)), "wb")   # unbuffered: each write reaches the kernel
            self._writer, self._schema = ipc.new_stream(self._sink, batch.schema), batch.schema
        else:
            assert self._schema is not None
            fitted = conform(batch, self._schema)
            if fitted is None:
                return False
            batch = fitted
        self._writer.write_batch(batch, custom_metadata={ORIGIN_KEY: origin.encode()} if origin is not None else None)
        self.rows += batch.num_rows
        return True

    def seal(self) -> Path | None:
        """Write the staged rows as part :attr:`next` (atomically), then count on to the next part."""
        if self._writer is None:
            return None
        self.close()
        path = self.write_part(self.next, read_staging(self.staging_path(self.next)))
        self.next += 1
        self.rows = 0
        return path

    def write_part(self, k: int, staged: Staged) -> Path:
        runs: list[list[object]] = []
        at = 0
        for batch, origin in staged:
            if not runs or runs[-1][1] != origin:
                runs.append([at, origin])
            at += batch.num_rows
        table = pa.Table.from_batches([b for b, _ in staged])
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), ORIGINS_KEY: json.dumps(runs).encode()})
        out = pa.BufferOutputStream()
        pq.write_table(table, out)
        path = self.part_path(k)
        atomic_write(path, out.getvalue().to_pybytes())
        return path

    def drop_stale(self) -> None:
        """Delete staging files whose part exists (below :attr:`next`): the saved state covers them."""
        for k in self.staged_numbers():
            if k < self.next:
                self.staging_path(k).unlink(missing_ok=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = self._schema = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # -- after a crash -----------------------------------------------------------------------
    def recover(self, next_part: int, columns: list[str]) -> Iterator[tuple[str | None, pa.Table]]:
        """Clean up after a crash (module docstring) and yield the rows the saved state lacks, as
        ``(origin, table of columns)`` (only those of ``columns`` a file has)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next = next_part
        for p in self.folder.iterdir():
            if self._temp.fullmatch(p.name):
                p.unlink(missing_ok=True)
        for k in self.numbers():
            if k >= self.next:
                yield from _slices(pq.read_table(self.part_path(k), columns=_present(pq.read_schema(self.part_path(k)), columns)))
                self.next = k + 1
        for k in self.staged_numbers():
            if k < self.next:
                continue
            staged = read_staging(self.staging_path(k))
            if staged:
                self.write_part(k, staged)
                yield from _slices(pq.read_table(self.part_path(k), columns=_present(staged[0][0].schema, columns)))
            self.next = k + 1
        self.drop_stale()


def read_staging(path: Path) -> Staged:
    """The complete batches of a staging file and their origins (a torn last batch is left out)."""
    out: Staged = []
    try:
        reader = ipc.open_stream(pa.memory_map(str(path)))
    except (OSError, pa.ArrowException):       # empty, or torn inside the schema message
        return out
    while True:
        try:
            batch, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except (OSError, pa.ArrowException):   # a torn last batch: it was never acknowledged
            break
        origin = meta.get(ORIGIN_KEY) if meta is not None else None
        out.append((batch, origin.decode() if origin is not None else None))
    return out


def _present(schema: pa.Schema, columns: list[str]) -> list[str]:
    return [c for c in columns if c in schema.names]


def _slices(table: pa.Table) -> Iterator[tuple[str | None, pa.Table]]:
    """``table`` cut into its origin runs (from the part's metadata)."""
    raw = (table.schema.metadata or {}).get(ORIGINS_KEY)
    runs = json.loads(raw) if raw else [[0, None]]
    for i, (start, origin) in enumerate(runs):
        stop = runs[i + 1][0] if i + 1 < len(runs) else table.num_rows
        if stop > start:
            yield origin, table.slice(start, stop - start)
