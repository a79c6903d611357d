"""consumer: the sink. Writes records to a JSON-lines file, once each, and keeps aggregates.

Every record is written as one line of ``output`` (relative to the run directory) and the file
is flushed after each batch, so ``tail -f`` sees records as they arrive. Under at-least-once
delivery a batch can arrive twice (it was resent after a crash); the consumer drops records
whose ``id`` it has already written, so the file holds each record once (effectively-once).

Dedup is exact and settled by knowledge, never by age (:mod:`streampipe.stages.seen`): one seen-id set per
**origin** (the source replica and id-space generation that made the record, stamped on every
batch), whose holes are closed only by that origin's **watermark** (every id below it is
acknowledged end to end). A partition that lags for hours keeps its holes open for hours;
memory is bounded by the ids in flight, not by a clock. Without acknowledgements
(``delivery: at-most-once``) no watermark exists: ids are kept exactly and the holes stay.

What is deduplicated: integer ids within int64. A record without an ``id``, or with an id that is
not such an integer (a string, a float, an int beyond 64 bits), is written every time it arrives, and counted as
``not_deduplicated`` in ``status``. A source whose integer ids do not increase is handled by the
runtime (:mod:`streampipe.stages.runtime`): it stops raising its watermark (this sink then keeps that
origin's ids exactly) and dead-letters a record whose id is below a watermark it already
announced, rather than letting it be dropped as a duplicate.

The seen-ids are saved atomically with the file offset they cover every ``checkpoint_s``, and a
small journal (``state/<stage>.<replica>.sink.journal``) notes the origin of the lines written
since, so after a crash the consumer cuts a torn last line and re-reads only the lines written
after the saved offset, each into its own origin's set. A state file of the older single-set
format is ignored with a warning (dedup restarts empty). Ids are marked seen only once their
records are on disk, so a failed write loses nothing. A record that cannot be written as JSON is
dead-lettered. With ``replicas > 1`` each replica writes its own file (``records.1.jsonl`` ...).
The option ``dedup_horizon_s`` of earlier versions is refused: no clock closes a hole.

Columns (``columnar: true``, the default): a batch arrives as :class:`Columns`; dedup reads the
``id`` column (one numpy test when the ids are above everything seen and increase, the usual case;
one ``searchsorted`` over the seen runs otherwise), the labels are counted with one ``np.unique``, and the JSON lines of the
whole batch are formatted column by column (one ``orjson.dumps`` per column, each line joined
from its row's pieces): the same bytes as one ``orjson.dumps`` per record. A batch with a list
column (values of mixed types, a record lacking a field) is written record by record. Records
(from a per-record stage upstream, or ``columnar: false``) are written as records, not turned
into columns first: their lines come from one ``orjson.dumps`` of the batch, cut at the record
boundaries (:func:`record_lines`), the same bytes again.

Parquet (``format: parquet``, needs ``pip install 'streampipe[parquet]'``; ``streampipe validate``
refuses it without pyarrow): ``output`` is a folder (default ``output/records``) of part files
``part-000042.parquet``, one per checkpoint (every ``checkpoint_s`` and at teardown), each record in
exactly one part (:mod:`streampipe.stages.builtins.parquet_parts` has the file protocol). Dedup, labels and
``status`` are the same as for JSON lines. Why staging rather than the other two designs:

- the runtime acknowledges a batch as soon as :meth:`process` returns, so rows only buffered in
  memory would be lost by a SIGKILL. Each batch is therefore appended at once to a staging file
  (an Arrow IPC stream under ``state/``, written straight to the kernel, as the JSON lines are:
  durable across a SIGKILL, not across a power cut, same as JSON lines), and a checkpoint turns
  it into one part file (temp name, fsync, rename), then saves the state that counts the part.
- a part per ``process`` call would be thousands of tiny files a second;
- holding acks until a part is durable (the ack points of stateful transforms,
  :mod:`streampipe.stages.ackpoints`) would cap throughput at ``max_inflight`` batches per part
  interval per sender (128 batches of 100 a second with ``checkpoint_s: 1``), or, at the ack
  points' own pace (20 ms), make ~50 parts a second.

A part has one schema: a batch whose types differ (a float where the part has ints, a new field)
is cast losslessly where it can be, else seals the part and starts the next; a record that breaks
its own batch's conversion and does not fit the part's schema is dead-lettered. Record batches
are converted through :meth:`Columns.from_records` (every record's keys, not only the first's as
``pa.Table.from_pylist`` would); ``x`` becomes a fixed-size list column. A quiet stream's staged
rows become a part at the next batch after ``checkpoint_s``, or at stop. Compaction of the parts
is left to the reader's tools.

>>> import tempfile, pathlib, json
>>> from streampipe.stages.api import StageContext
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> c = Consumer(output="out.jsonl"); c.context = StageContext(run_dir=d)
>>> c.setup(); _ = c.process([{"id": 0, "y": 1}, {"id": 1, "y": 0}]); _ = c.process([{"id": 1, "y": 0}])
>>> c.teardown(); [json.loads(l)["id"] for l in (d / "out.jsonl").read_text().splitlines()]
[0, 1]
"""

from __future__ import annotations

import bisect
import importlib.metadata
import importlib.util
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
from loguru import logger

from streampipe.stages import outputs
from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.columns import MISSING as MISSING_VALUE
from streampipe.stages.columns import Columns
from streampipe.stages.delivery import Delivered
from streampipe.stages.seen import HIGH, SeenByOrigin
from streampipe.stages.state import json_default, load_state, save_state

if TYPE_CHECKING:
    from streampipe.stages.builtins.parquet_parts import Parts

try:
    import orjson

    def _dumps(record: Any) -> bytes:
        return orjson.dumps(record, default=json_default, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)

    def _dumps_array(column: np.ndarray) -> bytes:
        return orjson.dumps(column, option=orjson.OPT_SERIALIZE_NUMPY)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency; json is the fallback
    import json

    def _dumps(record: Any) -> bytes:
        return json.dumps(record, default=json_default).encode()

    def _dumps_array(column: np.ndarray) -> bytes:
        return json.dumps(column.tolist(), separators=(",", ":")).encode()

    _loads = json.loads  # type: ignore[assignment]

RATE_WINDOW_S = 1.0
PYARROW_MIN = 15      # read_next_batch_with_custom_metadata, and Parquet fixed-size lists read back as such
OUTPUT = {"jsonl": "output/records.jsonl", "parquet": "output/records"}   # the default output per format
_NONE = object()   # no journal entry yet since the last checkpoint


class Consumer(Stage):
    columnar = True
    accepts_records = True     # records from a per-record stage are written as records: no columns built for them
    def __init__(self, output: str | None = None, dedup: bool = True, label: str = "y",
                 checkpoint_s: float = 1.0, columnar: bool = True, format: Literal["jsonl", "parquet"] = "jsonl") -> None:
        super().__init__()
        if format not in OUTPUT:
            raise ValueError(f"format must be one of {', '.join(OUTPUT)}, not {format!r}")
        self.columnar = bool(columnar)
        self.format = format
        self.output = output or OUTPUT[format]
        self.dedup, self.label, self.checkpoint_s = dedup, label, checkpoint_s
        self.count = 0
        self.labels: dict[str, int] = {}
        self.delivered = Delivered(self.dedup)    # which ids the output holds (stages.delivery)
        self._journal: IO[bytes] | None = None
        self._journaled: object = _NONE           # the origin of the last journal entry since the checkpoint
        self._file: IO[bytes] | None = None
        self._parts: Parts | None = None          # format: parquet
        self._path: Path | None = None
        self._saved_at = 0.0
        self._rate = 0.0
        self._window_start = time.monotonic()
        self._window_count = 0

    @staticmethod
    def option_problems(options: dict[str, Any]) -> list[tuple[str | None, str]]:
        """What ``streampipe validate`` refuses beyond the signature: parquet without pyarrow."""
        if options.get("format") != "parquet":
            return []
        if importlib.util.find_spec("pyarrow") is None:
            return [("format", "format: parquet needs pyarrow, which is not installed: pip install 'streampipe[parquet]'")]
        version = importlib.metadata.version("pyarrow")
        if int(version.split(".")[0]) < PYARROW_MIN:
            return [("format", f"format: parquet needs pyarrow>={PYARROW_MIN}, found {version}: pip install 'streampipe[parquet]'")]
        return []

    @property
    def seen(self) -> SeenByOrigin:
        """The ids the output holds, per origin."""
        return self.delivered.seen

    def on_origin(self, origin: str | None, watermark: int | None) -> None:
        """Called by the runtime before :meth:`process` with the batch's origin and watermark."""
        self.delivered.at(origin, watermark)

    # -- files -------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self.context.replica_output(self.output)
        return self._path

    @property
    def state_path(self) -> Path:
        return self.context.run_dir / "state" / f"{self.context.name}.{self.context.replica}.sink"

    @property
    def journal_path(self) -> Path:
        return self.state_path.with_name(self.state_path.name + ".journal")

    def setup(self) -> None:
        if self.format == "parquet":
            self._setup_parts()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        saved = load_state(self.state_path) or {}
        outputs.check_ours(self.path, saved)     # never cut or append to a file it did not write
        offset = 0
        if saved.get("path") == str(self.path):
            if "origins" not in saved and saved.get("seen"):
                logger.warning(f"{self.state_path}: dedup state of an older format (one set, holes closed by age); "
                               "starting dedup afresh")
            self._restore(saved)
            offset = int(saved.get("offset", 0))
        self._recover(offset)
        self._file = open(self.path, "ab")
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.journal_path, "ab")
        # what _recover read from the journal goes into the state before the journal is cleared:
        # a crash before the next checkpoint must find those lines' origins again
        self.checkpoint()

    def _setup_parts(self) -> None:
        """The Parquet folder: restore the saved state, then account for what the crash left
        (:meth:`Parts.recover`) and checkpoint at once, as :meth:`setup` does for JSON lines."""
        if (problem := self.option_problems({"format": "parquet"})):
            raise RuntimeError(problem[0][1])
        from streampipe.stages.builtins.parquet_parts import Parts

        saved = load_state(self.state_path) or {}
        next_part = 0
        if saved.get("path") == str(self.path) and saved.get("format") == "parquet":
            self._restore(saved)
            next_part = int(saved.get("parts", 0))
        tag = f".{self.context.replica}" if self.context.replicas > 1 and self.context.replica > 0 else ""
        self._parts = Parts(self.path, self.state_path, tag)
        self._recommit((origin, table.to_pylist()) for origin, table in self._parts.recover(next_part, ["id", self.label]))
        self.checkpoint()

    def _restore(self, saved: dict[str, Any]) -> None:
        """The seen-ids, count and labels of a saved checkpoint (either format)."""
        self.delivered = Delivered(self.dedup, SeenByOrigin.from_state(saved.get("origins") or {}))
        self.count = int(saved.get("count", 0))
        self.labels = dict(saved.get("labels", {}))

    def _recommit(self, found: Iterable[tuple[str | None, list[Record]]]) -> None:
        """Account for records a crash left written after the checkpoint, each under its origin."""
        for origin, written in found:
            self.delivered.at(origin, None)
            self.commit(self.delivered.fresh(written), written)
        self.delivered.at(None, None)

    def _journal_entries(self) -> tuple[list[int], list[str | None]]:
        """(offsets, origins) of the journal: the origin of the lines written from each offset on."""
        offsets: list[int] = []
        origins: list[str | None] = []
        try:
            lines = self.journal_path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return offsets, origins
        for line in lines:
            try:
                at, origin = _loads(line)
                offsets.append(int(at))
                origins.append(origin if isinstance(origin, str) else None)
            except (ValueError, TypeError):
                continue   # a torn last entry
        return offsets, origins

    def _recover(self, offset: int) -> None:
        """Cut a torn last line and account for lines written after the saved offset."""
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        if size < offset:  # the file was replaced or truncated by hand: start over
            self.delivered, self.count, self.labels, offset = Delivered(self.dedup), 0, {}, 0
        offsets, origins = self._journal_entries()
        with open(self.path, "rb+") as f:
            f.seek(offset)
            good = offset
            by_origin: dict[str | None, list[Record]] = {}
            for line in iter(f.readline, b""):
                if not line.endswith(b"\n"):
                    break
                k = bisect.bisect_right(offsets, good) - 1
                good += len(line)
                try:
                    record = _loads(line)
                except ValueError:
                    continue
                by_origin.setdefault(origins[k] if k >= 0 else None, []).append(record)
            self._recommit(by_origin.items())
            if good < size:
                f.truncate(good)

    def commit(self, written: list[Record], handled: list[Record]) -> None:
        """Count ``written``, mark every id of ``handled`` (written or dead-lettered) as seen, then
        close the origin's holes below the batch's watermark."""
        self.delivered.commit_ids(Delivered.ids_of(handled))
        self.count += len(written)
        self._count_labels(written)

    # -- the sink ----------------------------------------------------------------------------
    def process(self, batch: Batch | Columns) -> list[Record]:  # type: ignore[override]
        if isinstance(batch, Columns):
            return self.process_columns(batch)
        return self.process_records(batch)

    def process_columns(self, batch: Columns) -> list[Record]:
        """The sink's work on columns (module docstring); a batch it cannot format goes record by record."""
        assert self._file is not None or self._parts is not None, "setup() opens the output"
        ids = batch.data.get("id")
        if (not len(batch) or not (isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu")
                or (ids.dtype == np.uint64 and int(ids.max()) > HIGH)):
            return self.process_records(batch.to_records())
        ids = ids.astype(np.int64, copy=False)
        keep = self.delivered.fresh_rows(ids)
        fresh = batch if keep is None else batch.take(keep)
        if not self._write_columns(fresh):
            return self.process_records(fresh.to_records())
        self.delivered.commit_ids(ids if keep is None else ids[keep])
        self.count += len(fresh)
        label = fresh.data.get(self.label)
        if label is not None and len(fresh):
            if isinstance(label, np.ndarray) and label.ndim == 1:
                values, counts = np.unique(label, return_counts=True)
                pairs = zip(values.tolist(), counts.tolist())
            else:
                pairs = Counter(v for v in label if not isinstance(v, (list, dict))).items()  # type: ignore[assignment]
            for value, n in pairs:
                if value is not None:
                    key = str(value)
                    self.labels[key] = self.labels.get(key, 0) + n
        self._tick(len(fresh))
        return []

    def _write_columns(self, fresh: Columns) -> bool:
        """Write ``fresh`` as it is; False if it must go record by record."""
        if self._parts is not None:
            from streampipe.stages.builtins.parquet_parts import to_arrow

            if not len(fresh):
                return True         # all duplicates: no empty batch in the part
            try:
                table = to_arrow(fresh)
            except Exception:       # pyarrow raises several kinds: the records path sorts out which row
                return False
            self._stage(table)
            return True
        text = json_lines(fresh)
        if text is None:
            return False
        if text:
            self._write(text)
        return True

    def _stage(self, table: Any) -> None:
        """Stage an Arrow batch for the next part, sealing the part first if the schema changed."""
        assert self._parts is not None
        if not self._parts.append(table, self.delivered.origin):
            self.checkpoint()
            self._parts.append(table, self.delivered.origin)

    def _write(self, text: bytes) -> None:
        """Append lines to the output, their origin first noted in the journal."""
        assert self._file is not None
        if self.dedup and self._journal is not None and self.delivered.origin != self._journaled:
            self._journal.write(_dumps([self._file.tell(), self.delivered.origin]) + b"\n")   # before the lines it names
            self._journal.flush()
            self._journaled = self.delivered.origin
        self._file.write(text)
        self._file.flush()

    def process_records(self, batch: Batch) -> list[Record]:
        assert self._file is not None or self._parts is not None, "setup() opens the output"
        if self._parts is None and (ids := _int_ids(batch)) is not None:
            return self._process_int_ids(batch, ids)
        fresh = self.delivered.fresh(batch)
        written = self._write_parquet(fresh) if self._parts is not None else self._write_json(fresh)
        self.commit(written, fresh)
        self._tick(len(written))
        return []

    def _process_int_ids(self, batch: Batch, ids: np.ndarray) -> list[Record]:
        """:meth:`process_records` for JSON lines when every record has an int64 id: dedup on the
        id array as the columns path does, and the ids written marked seen without a second pass."""
        keep = self.delivered.fresh_rows(ids)
        fresh = batch if keep is None else [r for r, k in zip(batch, keep.tolist()) if k]
        written = self._write_json(fresh)
        if len(written) == len(fresh):
            self.delivered.commit_ids(ids if keep is None else ids[keep])
            self.count += len(written)
            self._count_labels(written)
        else:                           # some were dead-lettered: the general bookkeeping
            self.commit(written, fresh)
        self._tick(len(written))
        return []

    def _count_labels(self, written: list[Record]) -> None:
        labels = self.labels
        for label, n in Counter([r.get(self.label) for r in written]).items():
            if label is not None:
                key = str(label)
                labels[key] = labels.get(key, 0) + n

    def _write_parquet(self, fresh: list[Record]) -> list[Record]:
        """Stage ``fresh`` for the next part; a record Arrow cannot convert (or fit to the part's
        schema) is dead-lettered. Returns the records staged."""
        from streampipe.stages.builtins.parquet_parts import conform, to_arrow

        if not fresh:
            return []
        try:
            table = to_arrow(Columns.from_records(fresh))
        except Exception:           # pyarrow raises several kinds: find the records at fault, one at a time
            table = None
        if table is not None:
            self._stage(table)
            return fresh
        assert self._parts is not None
        schema, written = self._parts._schema, []
        for record in fresh:
            try:
                one = to_arrow(Columns.from_records([record]))
                if schema is None:
                    schema = one.schema
                elif conform(one, schema) is None:
                    raise TypeError("its fields' types differ from the other records'")
                written.append(record)
            except Exception as exc:
                self.reject(record, f"cannot be written as Parquet: {type(exc).__name__}: {exc}")
        if written:
            try:
                table = to_arrow(Columns.from_records(written))
            except Exception as exc:
                for record in written:
                    self.reject(record, f"cannot be written as Parquet: {type(exc).__name__}: {exc}")
                return []
            self._stage(table)
        return written

    def _write_json(self, fresh: list[Record]) -> list[Record]:
        """Append ``fresh`` as JSON lines; a record JSON cannot carry is dead-lettered. Returns the records written."""
        text = record_lines(fresh)
        if text is not None:
            if text:
                self._write(text)
            return fresh
        lines, written = [], []
        for record in fresh:
            try:
                lines.append(_dumps(record))
                written.append(record)
            except (TypeError, ValueError) as exc:   # orjson: a key or value JSON cannot carry
                self.reject(record, f"cannot be written as JSON: {exc}")
        if lines:
            self._write(b"\n".join(lines) + b"\n")
        return written

    def _tick(self, n: int) -> None:
        now = time.monotonic()
        self._window_count += n
        if now - self._window_start >= RATE_WINDOW_S:
            self._rate = self._window_count / (now - self._window_start)
            self._window_start, self._window_count = now, 0
        if (self.dedup or self._parts is not None) and now - self._saved_at >= self.checkpoint_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        if self._parts is not None:
            self._checkpoint_parts()
            return
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        save_state(self.state_path, {"path": str(self.path), "offset": self._file.tell(), "origins": self.delivered.state(),
                                     "count": self.count, "labels": self.labels,
                                     "file": outputs.identity(os.fstat(self._file.fileno()))})
        if self._journal is not None:    # the lines it named are covered by the state now
            self._journal.seek(0)
            self._journal.truncate()
            self._journaled = _NONE
        self._saved_at = time.monotonic()

    def _checkpoint_parts(self) -> None:
        """Seal the staged rows into a part file, then save the state that counts it, then drop its
        staging file: a crash between any two steps is recovered by :meth:`Parts.recover`."""
        assert self._parts is not None
        self._parts.seal()
        save_state(self.state_path, {"path": str(self.path), "format": "parquet", "parts": self._parts.next,
                                     "origins": self.delivered.state(), "count": self.count, "labels": self.labels})
        self._parts.drop_stale()
        self._saved_at = time.monotonic()

    def teardown(self) -> None:
        if self._parts is not None:
            self.checkpoint()
            self._parts.close()
            self._parts = None
        if self._file is not None:
            self.checkpoint()
            self._file.close()
            self._file = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def stats(self) -> dict[str, Any]:
        stats = {"written": self.count, "rate": round(self._rate, 1), **self.delivered.stats(),
                 "labels": dict(sorted(self.labels.items()))}
        return stats


def _int_ids(batch: Batch) -> np.ndarray | None:
    """The ids of ``batch`` as int64 when every record has an int id within int64, else None."""
    if not batch:
        return None
    try:
        ids = [r.get("id") for r in batch]
    except AttributeError:              # not a map: the general path dead-letters it
        return None
    if set(map(type, ids)) != {int}:
        return None
    try:
        return np.array(ids, np.int64)
    except OverflowError:
        return None


def record_lines(records: list[Record]) -> bytes | None:
    """The JSON lines of ``records``, byte for byte one ``_dumps`` per record, from one ``_dumps`` of
    the whole list (a call per record cost ~5 x the formatting itself); None when that cannot tell
    the records apart (a ``},{`` inside a value) or a record cannot be written: then one by one.

    ``[r0,r1,...]`` is ``_dumps(r0) + b"," + _dumps(r1) ...``; every boundary is ``},{`` and no
    other ``},{`` can overlap one, so exactly ``n - 1`` of them means they are the boundaries.

    >>> record_lines([{"id": 0, "s": "a"}, {"id": 1, "x": [1.5]}])
    b'{"id":0,"s":"a"}\\n{"id":1,"x":[1.5]}\\n'
    >>> record_lines([{"id": 0, "s": "},{"}, {"id": 1}]) is None
    True
    """
    if not records:
        return b""
    if not all(type(r) is dict for r in records):
        return None
    try:
        text = _dumps(records)
    except (TypeError, ValueError):
        return None
    body = text[1:-1]
    if body.count(b"},{") != len(records) - 1:
        return None
    return body.replace(b"},{", b"}\n{") + b"\n"


def json_lines(batch: Columns) -> bytes | None:
    """The JSON lines of ``batch`` (one ``orjson.dumps`` per record, byte for byte), built one column
    at a time; None when a list column holds what this cannot format alike (MISSING, a failure)."""
    if not len(batch):
        return b""
    pieces: list[list[bytes]] = []
    template = []
    for name, col in batch.items():
        key = _dumps(name).replace(b"%", b"%%") + b":"
        if isinstance(col, np.ndarray):
            if col.dtype.kind == "f" and col.dtype != np.float64:
                col = col.astype(np.float64)      # formatted as Python floats are, not as float32
            elif col.dtype.kind in "iu" and col.dtype != np.int64 and col.dtype != np.uint64:
                col = col.astype(np.int64)
            text = _dumps_array(col)
            if col.ndim == 1:
                pieces.append(text[1:-1].split(b","))
                template.append(key + b"%s")
            elif col.ndim == 2:
                pieces.append(text[2:-2].split(b"],["))
                template.append(key + b"[%s]")
            else:
                return None
            continue
        try:
            if any(v is MISSING_VALUE for v in col):
                return None
            pieces.append([_dumps(v) for v in col])
        except (TypeError, ValueError):
            return None
        template.append(key + b"%s")
    line = b"{" + b",".join(template) + b"}"
    return b"\n".join([line % row for row in zip(*pieces)]) + b"\n"
