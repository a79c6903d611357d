"""postgres: a sink to a PostgreSQL table that holds each record exactly once (psycopg 3).

Each batch is one transaction: its rows (``COPY``, or a multi-row ``INSERT ... ON CONFLICT``
with ``key``) and the runtime's delivery marks (an upsert into ``streampipe_marks``, one row per
sink stage and replica), or neither; see :mod:`streampipe.stages.delivery`. At start the marks
are read back, so a batch sent again after a crash of any stage is dropped before it is written.

Columns: ``columns`` maps table columns to record fields, ``{col: field}``, or lists them
(``[y, score]``: each column takes the field of its name); the field ``"*"`` is the whole record
(as ``jsonb``). Without ``columns`` the table has ``id`` (the record's id) and ``record`` (the
whole record). A record lacking a mapped field is dead-lettered, the rest of its batch written.
A value for a ``json``/``jsonb`` column is sent as JSON, any other value as it is (psycopg adapts
it; a value the column's type refuses dead-letters its record).

``create: true`` makes the table if it is missing, each column of the SQL type in ``types``
(default ``bigint`` for the ``id`` field, ``jsonb`` otherwise), with ``PRIMARY KEY (key...)``
when ``key`` is set. ``key``: an upsert by these columns (a row whose key is there is updated);
without it rows are appended with ``COPY``.

A server that goes away: ``write`` reconnects with capped backoff and retries the same
transaction, blocking the stage (backpressure upstream), and after a lost connection in the
middle of a ``COMMIT`` it reads the marks back to learn whether that commit happened, so a batch
is never written twice. A stage blocked past its ``heartbeat_timeout`` is replaced as hung: set
``heartbeat_timeout`` above the server outages the pipeline should ride through. An unreachable
server, a missing table without ``create`` or a mapped column the table lacks fail ``setup``
with a clear error (``status`` shows it).

    db:
      type: postgres
      inputs: [normalizer]
      options: {dsn: "postgresql://app@127.0.0.1:5432/app", table: events, create: true,
                columns: {id: id, label: y, record: "*"}, types: {label: integer}}
"""

from __future__ import annotations

import re
import time
from operator import itemgetter
from typing import Any

from loguru import logger

from streampipe.stages.api import Batch, Record, Sink
from streampipe.stages.builtins.brokers import encode
from streampipe.stages.seen import holdable

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_ ,()\[\]]{0,62}")
MARKS_TABLE = "streampipe_marks"
WHOLE = "*"                   # the field that is the whole record
CONNECT_TIMEOUT_S = 5         # one connection attempt; setup fails after it, write() tries again
BACKOFF_INITIAL_S = 0.05      # write()'s reconnect backoff: 50 ms doubling ...
BACKOFF_MAX_S = 1.0           # ... to 1 s, so a server back is used within a second


class Missing(ValueError):
    """A record lacks a field the column mapping needs."""


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a plain SQL name (letters, digits, _)")
    return value


class PostgresSink(Sink):
    def __init__(self, dsn: str, table: str | None = None, columns: dict[str, str] | list[str] | None = None,
                 create: bool = False, types: dict[str, str] | None = None, key: list[str] | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__()
        if not isinstance(dsn, str) or not dsn.strip():
            raise ValueError("dsn must be a libpq connection string or URL, e.g. postgresql://user@127.0.0.1:5432/db")
        self.dsn = dsn
        self.table = _name(table, "table") if table else None
        if columns is None:
            mapping = {"id": "id", "record": WHOLE}
        elif isinstance(columns, list):
            mapping = {c: c for c in columns}
        else:
            mapping = dict(columns)
        if not mapping:
            raise ValueError("columns must name at least one column")
        self.mapping = {_name(c, "column"): f for c, f in mapping.items()}
        self.types = {c: t for c, t in (types or {}).items()}
        for c, t in self.types.items():
            if c not in self.mapping:
                raise ValueError(f"types names column {c!r}, which columns does not map")
            if not isinstance(t, str) or not TYPE.fullmatch(t):
                raise ValueError(f"types.{c}: {t!r} is not an SQL type name")
        self.key = [_name(k, "key column") for k in (key or [])]
        for k in self.key:
            if k not in self.mapping:
                raise ValueError(f"key column {k!r} is not among the columns {sorted(self.mapping)}")
        self.create = create
        if not connect_timeout_s > 0:
            raise ValueError("connect_timeout_s must be above 0")
        self.connect_timeout_s = connect_timeout_s
        self.conn: Any = None
        self.json_cols: set[str] = set()
        self.written = self.reconnects = 0
        self.rejected_missing = 0

    # -- set-up ------------------------------------------------------------------------------
    @property
    def table_name(self) -> str:
        return self.table or _name(self.context.name, "stage name (as the table; set table:)")

    @property
    def marks_key(self) -> str:
        return f"{self.table_name}.{self.context.replica}"

    def setup(self) -> None:
        import psycopg  # here: the CLI validates options without the driver
        from psycopg import sql
        from psycopg.types.json import Jsonb

        self._psycopg, self._jsonb, self._sql = psycopg, Jsonb, sql
        try:
            self.conn = self._connect()
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"postgres: cannot connect to {self._safe_dsn()}: {str(exc).strip()}") from None
        try:
            self._prepare()
        except BaseException:
            self.teardown()                    # no connection left open by a failed start
            raise

    def _safe_dsn(self) -> str:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", self.dsn)

    def _connect(self) -> Any:
        return self._psycopg.connect(self.dsn, connect_timeout=max(1, int(self.connect_timeout_s)), autocommit=False)

    def _prepare(self) -> None:
        t = self.table_name
        with self.conn.transaction():
            if self.create:
                cols = ", ".join(f"{c} {self.types.get(c) or ('bigint' if f == 'id' else 'jsonb')}"
                                 for c, f in self.mapping.items())
                pk = f", PRIMARY KEY ({', '.join(self.key)})" if self.key else ""
                self.conn.execute(f"CREATE TABLE IF NOT EXISTS {t} ({cols}{pk})")
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {MARKS_TABLE} (sink text PRIMARY KEY, marks bytea NOT NULL)")
            have = dict(self.conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped", (t,)).fetchall())
        if not have:
            raise LookupError(f"postgres: table {t!r} does not exist (create it, or set create: true)")
        lacking = sorted(set(self.mapping) - set(have))
        if lacking:
            raise LookupError(f"postgres: table {t!r} has no column {', '.join(lacking)} (it has {', '.join(sorted(have))})")
        self.json_cols = {c for c in self.mapping if have[c] in ("json", "jsonb")}
        # _row's plan, made once: the fields in column order, and where the JSON and id columns are
        self._fields = list(self.mapping.values())
        self._json_at = [i for i, c in enumerate(self.mapping) if c in self.json_cols]
        self._id_at = [i for i, f in enumerate(self._fields) if f == "id" and list(self.mapping)[i] not in self.json_cols]
        # one C call takes every named field (itemgetter: a tuple for two or more); the whole
        # record is put in at its places, in ascending order
        named = [f for f in self._fields if f != WHOLE]
        self._get = (itemgetter(*named) if len(named) > 1 else
                     (lambda r, g=itemgetter(named[0]): (g(r),)) if named else (lambda r: ()))
        self._whole_at = [i for i, f in enumerate(self._fields) if f == WHOLE]
        if not self.written:
            self.written = self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            self.conn.commit()

    # -- the sink API ------------------------------------------------------------------------
    def load_marks(self) -> bytes | None:
        row = self.conn.execute(f"SELECT marks FROM {MARKS_TABLE} WHERE sink = %s", (self.marks_key,)).fetchone()
        self.conn.commit()
        return bytes(row[0]) if row else None

    def write(self, batch: Batch, marks: bytes) -> None:
        rows = []
        for record in batch:
            try:
                rows.append(self._row(record))
            except Missing as exc:
                self.rejected_missing += 1
                self.reject(record, str(exc))
        if self.key and rows:                 # one row per key in a batch: the last one wins
            at = [self.mapping_index(k) for k in self.key]
            rows = list({tuple(repr(r[i]) for i in at): r for r in rows}.values())
        delay, unsure = BACKOFF_INITIAL_S, False
        while True:
            try:
                if unsure and self.load_marks() == marks:
                    break                      # the COMMIT had gone through before the connection dropped
                self._commit(rows, marks)
                break
            except (self._psycopg.OperationalError, self._psycopg.InterfaceError) as exc:
                if not self._lost():
                    raise                      # the server answered: a data error, the Processor isolates it
                logger.warning(f"postgres: connection lost ({str(exc).strip()[:200]}); reconnecting")
                unsure = True
                self._reconnect_until_up(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        self.written += len(rows)

    def mapping_index(self, column: str) -> int:
        return list(self.mapping).index(column)

    def _commit(self, rows: list[tuple[Any, ...]], marks: bytes) -> None:
        t, cols = self.table_name, list(self.mapping)
        collist = ", ".join(cols)
        try:
            with self.conn.cursor() as cur:
                if rows and not self.key:
                    with cur.copy(f"COPY {t} ({collist}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                elif rows:
                    update = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in self.key)
                    action = f"DO UPDATE SET {update}" if update else "DO NOTHING"
                    places = "(" + ", ".join(["%s"] * len(cols)) + ")"
                    for start in range(0, len(rows), 1000):
                        part = rows[start:start + 1000]
                        cur.execute(f"INSERT INTO {t} ({collist}) VALUES {', '.join([places] * len(part))} "
                                    f"ON CONFLICT ({', '.join(self.key)}) {action}", [v for r in part for v in r])
                # the marks' upsert and the COMMIT in one message (one round trip, not two): a
                # simple query, so its values go as literals; psycopg learns the ended transaction
                # from the server's answer
                cur.execute(self._sql.SQL(f"INSERT INTO {MARKS_TABLE} (sink, marks) VALUES ({{}}, {{}}) "
                                          "ON CONFLICT (sink) DO UPDATE SET marks = EXCLUDED.marks; COMMIT")
                            .format(self._sql.Literal(self.marks_key), self._sql.Literal(marks)))
        except BaseException:
            try:
                self.conn.rollback()
            except Exception:
                pass                           # the connection is gone: nothing was committed on it
            raise

    def _lost(self) -> bool:
        return bool(self.conn is None or self.conn.closed or self.conn.broken)

    def _reconnect_until_up(self, delay: float) -> bool:
        """Reconnect, sleeping ``delay`` (doubling to BACKOFF_MAX_S) between attempts; True once connected."""
        try:
            self.conn.close()
        except Exception:
            pass
        while True:
            self.context.keepalive(f"postgres at {self._safe_dsn()}")   # waiting, not hung
            time.sleep(delay)
            try:
                self.conn = self._connect()
                self.reconnects += 1
                logger.info(f"postgres: reconnected to {self._safe_dsn()}")
                return True
            except self._psycopg.OperationalError:
                delay = min(delay * 2, BACKOFF_MAX_S)

    def _row(self, record: Record) -> tuple[Any, ...]:
        """The record as the table's row. JSON columns go as JSON text (orjson: numpy values too,
        ~3x json's speed) in a ``COPY``, which the server parses by the column's type, and as
        ``Jsonb`` in an upsert's parameters."""
        try:
            out = list(self._get(record))
            for i in self._whole_at:
                out.insert(i, record)
        except KeyError:
            col, field = next((c, f) for c, f in self.mapping.items() if f != WHOLE and f not in record)
            raise Missing(f"record has no field {field!r} for column {col!r}") from None
        for i in self._json_at:
            out[i] = self._jsonb(out[i], dumps=encode) if self.key else encode(out[i]).decode()
        for i in self._id_at:
            value = out[i]
            if type(value) is not int and not holdable(value):
                out[i] = value if value is None or isinstance(value, (int, str)) else str(value)
        return tuple(out)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"written": self.written}
        if self.reconnects:
            stats["reconnects"] = self.reconnects
        if self.rejected_missing:
            stats["missing_field"] = self.rejected_missing
        return stats

    def teardown(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

