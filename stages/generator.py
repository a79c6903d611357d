"""generator: a synthetic labelled stream, or the replay of a CSV / JSON-lines file.

Synthetic records look like ``{"id": 42, "t": 1764130000.1, "x": [8 floats], "y": 1}``: ``x`` is
drawn around per-feature offsets and scales (so scaling matters), ``y`` is a linear concept of
``x`` plus label noise (so a linear model can learn it), and at ``drift_at`` the concept rotates
(so a learner must adapt). The stream is deterministic in ``seed``: record ``i`` is the same in
every run, which is what makes a restarted generator replay exactly what was lost.

Options:
    rate            records per second, 0 = as fast as downstream takes them
    count           stop after this many records (finite stream), None = endless
    seed            the stream's seed
    features        length of ``x``
    classes         number of labels (2 = binary)
    noise           fraction of labels flipped at random
    drift_at        record id at which the concept changes (None = never)
    malformed_every every N-th record is malformed on purpose (0 = never), for dead-letter demos
    file            replay this CSV (header row) or .jsonl file instead (relative to the config)
    loop            replay the file again from the start when it ends (endless)

>>> g = Generator(count=3, seed=1)
>>> [r["id"] for r in g.generate()]
[0, 1, 2]
>>> g2 = Generator(count=3, seed=1); g2.restore({"next": 2}); [r["id"] for r in g2.generate()]
[2]
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from streampipe.stages.api import Record, Source

_END: dict = {}  # sentinel: the wrapped stream is over
CHUNK = 1024   # records drawn per RNG call: per-record RNG calls would cost ~10x more


class Generator(Source):
    def __init__(self, rate: float = 0, count: int | None = None, seed: int = 7, features: int = 8,
                 classes: int = 2, noise: float = 0.05, drift_at: int | None = None,
                 malformed_every: int = 0, file: str | None = None, loop: bool = False) -> None:
        super().__init__()
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate, self.count, self.seed = float(rate), count, int(seed)
        self.features, self.classes, self.noise = int(features), int(classes), float(noise)
        self.drift_at, self.malformed_every = drift_at, int(malformed_every)
        self.file, self.loop = file, loop
        self.next = 0            # next record id to emit (replica-local counter k: id = k*n + r)
        self.offset = 0          # bytes read of the replayed file
        self.emitted = 0
        concept = np.random.default_rng([self.seed, 1 << 30])
        self.offsets = concept.normal(0, 5, self.features)
        self.scales = concept.uniform(0.5, 10, self.features)
        self.w_before = concept.normal(0, 1, (self.features, max(1, self.classes if self.classes > 2 else 1)))
        self.w_after = concept.normal(0, 1, self.w_before.shape)
        self._chunk_id = -1
        self._chunk: tuple[np.ndarray, np.ndarray] | None = None

    # -- the synthetic stream -------------------------------------------------------------
    def _draw(self, chunk_id: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, chunk_id])
        z = rng.normal(0, 1, (CHUNK, self.features))
        ids = np.arange(chunk_id * CHUNK, (chunk_id + 1) * CHUNK)
        drifted = (ids >= self.drift_at) if self.drift_at is not None else np.zeros(CHUNK, bool)
        score = np.where(drifted[:, None], z @ self.w_after, z @ self.w_before)
        if self.classes > 2:
            y = score.argmax(axis=1)
        else:
            y = (score[:, 0] > 0).astype(int)
        flip = rng.random(CHUNK) < self.noise
        y = np.where(flip, rng.integers(0, max(2, self.classes), CHUNK), y)
        x = z * self.scales + self.offsets
        return np.round(x, 6), y

    def synthetic(self, i: int) -> Record:
        chunk_id = i // CHUNK
        if chunk_id != self._chunk_id:
            self._chunk, self._chunk_id = self._draw(chunk_id), chunk_id
        assert self._chunk is not None
        x, y = self._chunk
        row = i % CHUNK
        record: Record = {"id": i, "t": time.time(), "x": x[row].tolist(), "y": int(y[row])}
        if self.malformed_every and (i + 1) % self.malformed_every == 0:
            record["x"] = "not-a-vector"
        return record

    # -- replay of a file -----------------------------------------------------------------
    def replay(self) -> Iterator[Record | None]:
        path = self.context.resolve_input(self.file or "")
        jsonl = path.suffix in (".jsonl", ".ndjson", ".json")
        while True:
            with open(path, "rb") as f:
                header: list[str] | None = None
                if not jsonl:
                    header = next(csv.reader([f.readline().decode()]))
                    self.offset = max(self.offset, f.tell())
                f.seek(self.offset)
                for raw in iter(f.readline, b""):
                    self.offset += len(raw)
                    line = raw.decode().strip()
                    if not line:
                        continue
                    record = json.loads(line) if jsonl else _csv_record(header or [], line)
                    record.setdefault("id", self.next)
                    record.setdefault("t", time.time())
                    self.next += 1
                    if self.count is not None and self.next > self.count:
                        return
                    yield record
            if not self.loop:
                return
            self.offset = 0

    def generate(self) -> Iterator[Record | None]:
        if self.file:
            yield from self.paced(self.replay())
            return
        n, r = self.context.replicas, self.context.replica

        def synthetic() -> Iterator[Record]:
            while True:
                i = self.next * n + r
                if self.count is not None and i >= self.count:
                    return
                self.next += 1
                yield self.synthetic(i)

        yield from self.paced(synthetic())

    def paced(self, records: Iterator[Record | None]) -> Iterator[Record | None]:
        """Yield at most ``rate`` records a second (None while ahead of schedule).

        A record is made only once its slot has come, so its event time ``t`` is when it was
        released, not when it started waiting.
        """
        start, sent = time.monotonic(), 0
        while True:
            if self.rate > 0:
                while sent >= (time.monotonic() - start) * self.rate:
                    yield None
            record = next(records, _END)
            if record is _END:
                return
            sent += 1
            self.emitted += 1
            yield record

    def snapshot(self) -> dict[str, Any]:
        return {"next": self.next, "offset": self.offset}

    def restore(self, state: dict[str, Any]) -> None:
        self.next = int(state.get("next", 0))
        self.offset = int(state.get("offset", 0))

    def stats(self) -> dict[str, Any]:
        return {"next_id": self.next * self.context.replicas + self.context.replica, "emitted": self.emitted}


def _csv_record(header: list[str], line: str) -> Record:
    values = next(csv.reader([line]))
    record: Record = {}
    for key, value in zip(header, values):
        record[key] = _number(value)
    return record


def _number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
