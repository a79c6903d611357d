"""sqlite: a sink to a SQLite database that holds each record exactly once (the sink API's reference).

Each batch is one transaction: its records go into ``table`` and the runtime's delivery marks
into ``streampipe_marks`` (one row per sink replica), or neither (see
:mod:`streampipe.stages.delivery`). At start the marks are read back, so a batch sent again
after a crash of any stage (or of the supervisor) is dropped before it is written. Only the
standard library's ``sqlite3``.

The table: ``id INTEGER`` (the record's id, NULL without one), ``origin TEXT`` (the source
replica that made it), ``record TEXT`` (the whole record as JSON, for ``json_extract``), and one
column per name in ``columns`` (the record's field, NULL where it lacks it).

    consumer: {type: sqlite, inputs: [normalizer], options: {path: output/records.db, columns: [y]}}

``path`` is relative to the run directory. Replicas share one database file (SQLite's lock
serialises their transactions; ``busy_timeout_s`` bounds the wait).

>>> import tempfile, pathlib, sqlite3
>>> from streampipe.stages.api import StageContext
>>> from streampipe.stages.delivery import ExactSink
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> sink = ExactSink(SqliteSink(path="out.db", columns=["y"]))
>>> sink.context = StageContext(name="db", run_dir=d)
>>> sink.setup(); sink.on_origin("gen.0/0", None)
>>> _ = sink.process([{"id": 0, "y": 1}, {"id": 1, "y": 0}]); _ = sink.process([{"id": 1, "y": 0}])
>>> sink.teardown()
>>> sqlite3.connect(d / "out.db").execute("SELECT id, y FROM db ORDER BY id").fetchall()
[(0, 1), (1, 0)]
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from streampipe.stages.api import Batch, Sink
from streampipe.stages.seen import holdable
from streampipe.stages.state import json_default

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
MARKS_TABLE = "streampipe_marks"


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value) or value.lower().startswith("sqlite_"):
        raise ValueError(f"{what} {value!r} is not a plain SQL name (letters, digits, _; not sqlite_...)")
    return value


class SqliteSink(Sink):
    def __init__(self, path: str = "output/records.db", table: str | None = None, columns: list[str] | None = None,
                 busy_timeout_s: float = 30.0) -> None:
        super().__init__()
        self.path = path
        self.table = _name(table, "table") if table else None
        self.columns = [_name(c, "column") for c in (columns or [])]
        if len(set(self.columns)) != len(self.columns) or {"id", "origin", "record"} & set(self.columns):
            raise ValueError("columns must be distinct and not id, origin or record (those are always there)")
        if not busy_timeout_s > 0 or busy_timeout_s == float("inf"):
            raise ValueError("busy_timeout_s must be a finite number of seconds above 0")
        self.busy_timeout_s = busy_timeout_s
        self.db: sqlite3.Connection | None = None
        self.written = 0

    @property
    def key(self) -> str:
        """This replica's row in the marks table."""
        return f"{self.table_name}.{self.context.replica}"

    @property
    def table_name(self) -> str:
        return self.table or _name(self.context.name, "stage name (as the table; set table:)")

    def setup(self) -> None:
        file = Path(self.context.resolve_output(self.path))
        file.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(file, timeout=self.busy_timeout_s, isolation_level=None)  # transactions by hand
        self.db.execute("PRAGMA journal_mode=WAL")     # readers do not block the sink, nor it them
        self.db.execute("PRAGMA synchronous=FULL")     # a commit survives a power cut, not only a SIGKILL
        extra = "".join(f", {c}" for c in self.columns)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {self.table_name} (id INTEGER, origin TEXT, record TEXT{extra})")
        have = {row[1] for row in self.db.execute(f"PRAGMA table_info({self.table_name})")}
        for c in self.columns:
            if c not in have:
                self.db.execute(f"ALTER TABLE {self.table_name} ADD COLUMN {c}")
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {MARKS_TABLE} (sink TEXT PRIMARY KEY, marks BLOB NOT NULL)")
        self.written = self.db.execute(f"SELECT count(*) FROM {self.table_name}").fetchone()[0]

    def load_marks(self) -> bytes | None:
        assert self.db is not None, "setup() opens the database"
        row = self.db.execute(f"SELECT marks FROM {MARKS_TABLE} WHERE sink = ?", (self.key,)).fetchone()
        return bytes(row[0]) if row else None

    def write(self, batch: Batch, marks: bytes) -> None:
        assert self.db is not None, "setup() opens the database"
        origin = getattr(self, "origin", None)
        rows = [self._row(r, origin) for r in batch]
        marks_q = f"INSERT INTO {MARKS_TABLE} (sink, marks) VALUES (?, ?) ON CONFLICT(sink) DO UPDATE SET marks = excluded.marks"
        places = ", ".join("?" * (3 + len(self.columns)))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(f"INSERT INTO {self.table_name} (id, origin, record{''.join(', ' + c for c in self.columns)}) "
                                f"VALUES ({places})", rows)
            self.db.execute(marks_q, (self.key, marks))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.written += len(rows)

    def _row(self, record: dict[str, Any], origin: str | None) -> tuple[Any, ...]:
        rid = record.get("id")
        text = orjson.dumps(record, default=json_default, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode()
        values = [record.get(c) for c in self.columns]
        return (rid if holdable(rid) else None, origin, text,
                *(v if v is None or isinstance(v, (int, float, str, bytes)) else orjson.dumps(v, default=json_default).decode()
                  for v in values))

    def on_origin(self, origin: str | None, watermark: int | None) -> None:
        self.origin = origin

    def stats(self) -> dict[str, Any]:
        return {"written": self.written}

    def teardown(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
