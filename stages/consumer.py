"""consumer: the sink. Writes records to a JSON-lines file, once each, and keeps aggregates.

Every record is written as one line of ``output`` (relative to the run directory) and the file
is flushed after each batch, so ``tail -f`` sees records as they arrive. Under at-least-once
delivery a batch can arrive twice (it was resent after a crash); the consumer drops records
whose ``id`` it has already written, so the file holds each record once (effectively-once).

Dedup state (:class:`stages.seen.SeenIds`) is a high-water mark (every id below it was written)
plus the ranges of ids seen above it, saved atomically with the file offset it covers every
``checkpoint_s``. Ids are marked seen only once their records are on disk, so a failed write
loses nothing. After a crash the consumer loads the state, cuts a torn last line, and re-reads
only the lines written after that offset, so restart cost does not grow with the file. Memory
grows with the number of holes in the id sequence, and a hole open longer than
``dedup_horizon_s`` (300 s) is closed. A record that cannot be written as JSON is dead-lettered.
With ``replicas > 1`` each replica writes its own file (``records.1.jsonl`` ...) and dedup holds
per file. Records without an ``id`` are not deduplicated.

>>> import tempfile, pathlib, json
>>> from streampipe.stages.api import StageContext
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> c = Consumer(output="out.jsonl"); c.context = StageContext(run_dir=d)
>>> c.setup(); _ = c.process([{"id": 0, "y": 1}, {"id": 1, "y": 0}]); _ = c.process([{"id": 1, "y": 0}])
>>> c.teardown(); [json.loads(l)["id"] for l in (d / "out.jsonl").read_text().splitlines()]
[0, 1]
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

from streampipe.stages.api import Batch, Record, Stage
from streampipe.stages.seen import DEFAULT_HORIZON_S, SeenIds
from streampipe.stages.state import json_default, load_state, save_state

try:
    import orjson

    def _dumps(record: Record) -> bytes:
        return orjson.dumps(record, default=json_default, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency; json is the fallback
    import json

    def _dumps(record: Record) -> bytes:
        return json.dumps(record, default=json_default).encode()

    _loads = json.loads  # type: ignore[assignment]

RATE_WINDOW_S = 1.0


class Consumer(Stage):
    def __init__(self, output: str = "output/records.jsonl", dedup: bool = True, label: str = "y",
                 checkpoint_s: float = 1.0, dedup_horizon_s: float = DEFAULT_HORIZON_S) -> None:
        super().__init__()
        self.output, self.dedup, self.label, self.checkpoint_s = output, dedup, label, checkpoint_s
        self.horizon_s = dedup_horizon_s
        self.count = 0
        self.duplicates = 0
        self.labels: dict[str, int] = {}
        self.seen = SeenIds(horizon_s=dedup_horizon_s)
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._saved_at = 0.0
        self._rate = 0.0
        self._window_start = time.monotonic()
        self._window_count = 0

    # -- files -------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        if self._path is None:
            p = self.context.resolve_output(self.output)
            if self.context.replicas > 1 and self.context.replica > 0:
                p = p.with_name(f"{p.stem}.{self.context.replica}{p.suffix}")
            self._path = p
        return self._path

    @property
    def state_path(self) -> Path:
        return self.context.run_dir / "state" / f"{self.context.name}.{self.context.replica}.sink"

    def setup(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        saved = load_state(self.state_path) or {}
        offset = 0
        if saved.get("path") == str(self.path):
            self.seen = SeenIds.from_state(saved.get("seen") or {}, self.horizon_s)
            self.count = int(saved.get("count", 0))
            self.labels = dict(saved.get("labels", {}))
            offset = int(saved.get("offset", 0))
        self._recover(offset)
        self._file = open(self.path, "ab")

    def _recover(self, offset: int) -> None:
        """Cut a torn last line and account for lines written after the saved offset."""
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        if size < offset:  # the file was replaced or truncated by hand: start over
            self.seen, self.count, self.labels, offset = SeenIds(horizon_s=self.horizon_s), 0, {}, 0
        with open(self.path, "rb+") as f:
            f.seek(offset)
            good = offset
            written = []
            for line in iter(f.readline, b""):
                if not line.endswith(b"\n"):
                    break
                good += len(line)
                try:
                    written.append(_loads(line))
                except ValueError:
                    continue
            self.commit(self.fresh(written), written)
            if good < size:
                f.truncate(good)

    def fresh(self, batch: Batch) -> list[Record]:
        """The records of ``batch`` not written before (all of them without ``dedup``).

        Reads the seen-id set but does not change it: ids are committed only once their records
        are on disk (:meth:`commit`), so a failed write loses nothing.
        """
        if not self.dedup:
            return list(batch)
        seen, in_batch, out = self.seen, set(), []
        top = seen.top
        for record in batch:
            rid = record.get("id")
            if type(rid) is int:
                if (rid < top and rid in seen) or rid in in_batch:
                    self.duplicates += 1
                    continue
                in_batch.add(rid)
            out.append(record)
        return out

    def commit(self, written: list[Record], handled: list[Record]) -> None:
        """Count ``written`` and mark every id of ``handled`` (written or dead-lettered) as seen."""
        self.seen.add_many([rid for r in handled if type(rid := r.get("id")) is int])
        self.count += len(written)
        labels = self.labels
        for label, n in Counter(r.get(self.label) for r in written).items():
            if label is not None:
                key = str(label)
                labels[key] = labels.get(key, 0) + n

    # -- the sink ----------------------------------------------------------------------------
    def process(self, batch: Batch) -> list[Record]:
        assert self._file is not None, "setup() opens the output"
        fresh = self.fresh(batch)
        lines, written = [], []
        for record in fresh:
            try:
                lines.append(_dumps(record))
                written.append(record)
            except (TypeError, ValueError) as exc:   # orjson: a key or value JSON cannot carry
                self.reject(record, f"cannot be written as JSON: {exc}")
        if lines:
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
        self.commit(written, fresh)
        self._tick(len(written))
        return []

    def _tick(self, n: int) -> None:
        now = time.monotonic()
        self._window_count += n
        if now - self._window_start >= RATE_WINDOW_S:
            self._rate = self._window_count / (now - self._window_start)
            self._window_start, self._window_count = now, 0
        if self.dedup and now - self._saved_at >= self.checkpoint_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self.seen.close_old_holes()
        save_state(self.state_path, {"path": str(self.path), "offset": self._file.tell(), "seen": self.seen.state(),
                                     "count": self.count, "labels": self.labels})
        self._saved_at = time.monotonic()

    def teardown(self) -> None:
        if self._file is not None:
            self.checkpoint()
            self._file.close()
            self._file = None

    def stats(self) -> dict[str, Any]:
        return {"written": self.count, "rate": round(self._rate, 1), "duplicates_dropped": self.duplicates,
                "dedup_holes": len(self.seen.starts),
                "labels": dict(sorted(self.labels.items()))}
