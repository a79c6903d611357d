"""redis / redis_sink: Redis Streams in and out (redis-py; Redis, or Valkey, which speaks the same).

**Source** (type ``redis``): a consumer group (``group``, default the stage name; made with
``MKSTREAM`` at ``start`` if missing) read by one consumer per replica, named
``<stage>-<replica>``, so a restarted replica is the same consumer. An entry is ``XACK``-ed only in
:meth:`committed`, once every record up to it is acknowledged end to end. A record's ``id`` is
the entry id ``<ms>-<seq>`` as one integer, ``ms * 2**20 + seq``: stable (a redelivered entry has
the id it had, and the sinks' dedup drops the copy) and increasing. A payload's own ``id`` is kept
as ``source_id``. The record is the JSON object in the entry's ``field`` (default ``data``), or,
with ``field: null``, the entry's fields as they are (strings). An entry whose ``field`` is
missing or not a JSON object is dead-lettered and acked with the records around it.

Reclaiming: a replica reads its own pending entries (``XREADGROUP ... 0``) before new ones (``>``):
what its dead predecessor had delivered and not acked comes again, in order, first; entries at or
below its saved position are acked and dropped (their ``XACK`` was lost with the process). It
reads its pending entries again after a lost connection (a read the server answered while the
connection broke is pending and was never seen). Entries of other consumers of the group (a
replica scaled away) are left to them: ``XAUTOCLAIM`` them by hand.

Replicas: ``stream`` may hold ``{replica}`` (``events-{replica}``): one stream per replica, the way
partitions map onto replicas; without it replicas share the stream through the group, each
reading its own entries in order.

The server going away: each command fails, and the source waits with capped backoff without
blocking its loop (heartbeats go on, nothing is acked meanwhile; ``XACK`` s that failed are sent
again), then resumes; backpressure meanwhile, the stream keeps the entries. An unreachable
server at start, or a missing group without ``create``, fails ``setup`` with a clear error.

    events:
      type: redis
      options: {url: "redis://127.0.0.1:6379/0", stream: events, group: pipeline}

**Sink** (type ``redis_sink``, on the sink API): each batch is one ``MULTI``/``EXEC`` transaction
of an ``XADD`` per record (its JSON in ``field``) and a ``SET`` of the runtime's delivery marks
(key ``streampipe:marks:<stream>:<replica>``), so the stream holds each record once: a batch sent
again after any crash is dropped by the marks read back at start. After a connection lost in the
middle of an ``EXEC`` the marks are read back to learn whether it happened, so a batch is never
added twice. Exactly once as far as the server keeps what it acknowledged: with ``appendonly
yes`` and ``appendfsync always`` (a crash of the server then loses nothing it answered). A server
that is down blocks the sink (retried with capped backoff, backpressure upstream); a sink
blocked past its ``heartbeat_timeout`` is replaced as hung. ``maxlen`` trims the stream
(approximately, ``MAXLEN ~``).

    out:
      type: redis_sink
      inputs: [normalizer]
      options: {url: "redis://127.0.0.1:6379/0", stream: scored}
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import Any

from loguru import logger

from streampipe.stages.api import Batch, Record, Sink, Source
from streampipe.stages.builtins.brokers import Backoff, check_url, decode, encode, printable, safe_url

KEY = re.compile(r"[^\s]{1,500}")
CONNECT_TIMEOUT_S = 5.0       # one connection attempt; setup fails after it
COMMAND_TIMEOUT_S = 10.0      # a command's answer (a blocking read adds its block_ms)
SEQ_BITS = 20                 # an entry id <ms>-<seq> -> ms * 2**20 + seq: ms of 2026 take 41 bits, 61 in all
ACK_CHUNK = 10_000            # ids per XACK
MARKS_PREFIX = "streampipe:marks"


def _url(url: str) -> str:
    return check_url(url, "redis|rediss|unix", "redis://127.0.0.1:6379/0")


def _key(value: str, what: str) -> str:
    if not isinstance(value, str) or not KEY.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be a non-empty name without spaces")
    return value


def entry_number(entry_id: bytes | str) -> int:
    """An entry id as one increasing integer.

    >>> entry_number(b"1764130000123-5"), entry_number("0-1")
    (1849824379008974853, 1)
    """
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    s = int(seq or 0)
    if s >> SEQ_BITS:
        raise ValueError(f"entry {text}: more than {1 << SEQ_BITS} entries in one millisecond")
    return (int(ms) << SEQ_BITS) | s


def _connect(url: str, connect_timeout_s: float, extra_s: float = 0.0) -> Any:
    import redis  # here: the CLI validates options without the client

    client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                  socket_timeout=COMMAND_TIMEOUT_S + extra_s, health_check_interval=0)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        client.close()
        raise ConnectionError(f"redis: cannot connect to {safe_url(url)}: {exc}") from None
    return client


class RedisStreamSource(Source):
    def __init__(self, stream: str, url: str = "redis://127.0.0.1:6379/0", group: str | None = None,
                 field: str | None = "data", create: bool = True, start: str = "0", batch: int = 1000,
                 block_ms: int = 50, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__()
        self.url, self.stream = _url(url), _key(stream, "stream")
        self.group = _key(group, "group") if group is not None else None
        self.field = _key(field, "field") if field is not None else None
        self.create = bool(create)
        if start not in ("0", "$") and not re.fullmatch(r"\d+(-\d+)?", str(start)):
            raise ValueError(f"start {start!r} must be 0 (the whole stream), $ (only new entries) or an entry id")
        self.start = str(start)
        if not (isinstance(batch, int) and 1 <= batch <= 100_000):
            raise ValueError("batch must be an integer from 1 to 100000 (entries per read)")
        if not (isinstance(block_ms, int) and 0 <= block_ms <= 1000):
            raise ValueError("block_ms must be an integer from 0 to 1000 (a longer block delays heartbeats)")
        if not connect_timeout_s > 0:
            raise ValueError("connect_timeout_s must be above 0")
        self.batch, self.block_ms, self.connect_timeout_s = batch, block_ms, float(connect_timeout_s)
        self.position = 0                    # the highest entry (as a number) generated or dropped
        self.committed_n = 0                 # ... and acknowledged end to end
        self.held: deque[tuple[int, bytes]] = deque()   # generated, not acked: (number, entry id)
        self.to_ack: list[bytes] = []        # XACKs that failed: sent again
        self.own_pending = True              # reading this consumer's pending entries (from read_id), not new ones
        self.read_id: bytes | str = "0"
        self.client: Any = None
        self.retry_at = 0.0
        self.backoff = Backoff()
        self.read = self.redelivered = self.acked = self.malformed = self.deleted = self.reconnects = 0
        self.last_error = ""

    @property
    def key(self) -> str:
        return self.stream.replace("{replica}", str(self.context.replica))

    @property
    def group_name(self) -> str:
        return self.group or self.context.name

    @property
    def consumer(self) -> str:
        return f"{self.context.name}-{self.context.replica}"

    def restore(self, state: dict[str, Any]) -> None:
        self.position = self.committed_n = int(state.get("entry", 0))

    def setup(self) -> None:
        import redis

        self._redis = redis
        self.client = _connect(self.url, self.connect_timeout_s, self.block_ms / 1000)
        try:
            groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                      for g in self._groups()}
            if self.group_name not in groups:
                if not self.create:
                    raise LookupError(f"redis: stream {self.key!r} has no group {self.group_name!r} "
                                      "(make it with XGROUP CREATE, or set create: true)")
                try:
                    self.client.xgroup_create(self.key, self.group_name, id=self.start, mkstream=True)
                    logger.info(f"redis: created group {self.group_name} on {self.key} at {self.start}")
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        except BaseException:
            self.teardown()
            raise

    def _groups(self) -> list[dict[str, Any]]:
        try:
            return list(self.client.xinfo_groups(self.key))
        except self._redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return []
            raise

    # -- the stream --------------------------------------------------------------------------
    def generate(self) -> Any:
        while True:
            if time.monotonic() < self.retry_at:
                yield None
                continue
            try:
                if self.to_ack:
                    self._xack(self.to_ack)
                    self.to_ack = []
                entries = self._read()
            except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
                self._lost(exc)
                yield None
                continue
            except self._redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._lost(exc)               # the stream or group was deleted: setup's checks again
                self._regroup()
                yield None
                continue
            if self.reconnecting():
                self.reconnects += 1
                logger.info(f"redis: reconnected to {safe_url(self.url)}")
            self.backoff.reset()
            if not entries:
                if self.own_pending:
                    self.own_pending = False  # every pending entry read: new ones now
                    continue
                yield None
                continue
            if self.own_pending:
                self.read_id = entries[-1][0]
            for entry_id, fields in entries:
                record = self._take(entry_id, fields)
                if record is not None:
                    yield record
                elif self._rejected:
                    yield None               # the runtime dead-letters it now

    def reconnecting(self) -> bool:
        lost = bool(self.last_error)
        self.last_error = ""
        return lost

    def _lost(self, exc: Exception) -> None:
        if not self.last_error:
            logger.warning(f"redis: {type(exc).__name__}: {exc}; retrying")
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.retry_at = time.monotonic() + self.backoff.next()
        self.own_pending, self.read_id = True, "0"   # what a lost read delivered is pending: read it again

    def _regroup(self) -> None:
        try:
            self.setup_group()
        except Exception as exc:  # the server is still away, or refuses: tried again after the backoff
            self.last_error = f"{type(exc).__name__}: {exc}"

    def setup_group(self) -> None:
        if self.create:
            try:
                self.client.xgroup_create(self.key, self.group_name, id=self.start, mkstream=True)
            except self._redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _read(self) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        block = None if self.own_pending or not self.block_ms else self.block_ms
        got = self.client.xreadgroup(self.group_name, self.consumer, {self.key: self.read_id if self.own_pending else ">"},
                                     count=self.batch, block=block)
        if not got:
            return []
        entries = got[0][1] if isinstance(got, list) else next(iter(got.values()))[0]
        return list(entries)

    def _take(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> Record | None:
        self.read += 1
        try:
            n = entry_number(entry_id)
        except ValueError as exc:
            n = self.position + 1
            fields, why = None, str(exc)
        else:
            why = ""
        if n <= self.position:
            self.redelivered += 1
            if n <= self.committed_n:
                self.to_ack.append(entry_id)      # its XACK was lost: again
            return None
        self.position = n
        self.held.append((n, entry_id))
        if fields is None and not why:
            self.deleted += 1                     # pending, but deleted from the stream (XDEL, trimming)
            return None
        try:
            if why:
                raise ValueError(why)
            assert fields is not None
            record = self._record(fields)
        except ValueError as exc:
            self.malformed += 1
            shown = {k.decode(errors="replace"): printable(v) for k, v in (fields or {}).items()}
            self.reject({"stream": self.key, "entry": entry_id.decode(errors="replace"), "fields": shown},
                        f"redis entry {self.key} {entry_id.decode(errors='replace')}: {exc}")
            return None
        own = record.get("id")
        if own is not None and own != n:
            record["source_id"] = own
        record["id"] = n
        return record

    def _record(self, fields: dict[bytes, bytes]) -> Record:
        if self.field is None:
            return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        data = fields.get(self.field.encode())
        if data is None:
            raise ValueError(f"no field {self.field!r} (it has {', '.join(sorted(k.decode(errors='replace') for k in fields))})")
        return decode(data)

    def committed(self, state: dict[str, Any]) -> None:
        n = int(state.get("entry", 0))
        done = []
        while self.held and self.held[0][0] <= n:
            done.append(self.held.popleft()[1])
        self.committed_n = max(self.committed_n, n)
        if not done:
            return
        try:
            self._xack(done)
        except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
            self.to_ack.extend(done)              # sent again once the server is back
            self._lost(exc)

    def _xack(self, ids: list[bytes]) -> None:
        for start in range(0, len(ids), ACK_CHUNK):
            part = ids[start:start + ACK_CHUNK]
            self.client.xack(self.key, self.group_name, *part)
            self.acked += len(part)

    def snapshot(self) -> dict[str, Any]:
        return {"entry": self.position}

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"read": self.read, "acked": self.acked}
        for name in ("redelivered", "malformed", "deleted", "reconnects"):
            if getattr(self, name):
                stats[name] = getattr(self, name)
        if self.last_error:
            stats["error"] = self.last_error[:200]
        return stats

    def teardown(self) -> None:
        if self.client is not None:
            try:
                if self.to_ack:
                    self._xack(self.to_ack)
            except Exception:
                pass                              # the entries stay pending: the next life acks them
            self.client.close()
            self.client = None


class RedisStreamSink(Sink):
    def __init__(self, stream: str, url: str = "redis://127.0.0.1:6379/0", field: str = "data",
                 maxlen: int | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__()
        self.url, self.stream = _url(url), _key(stream, "stream")
        self.field = _key(field, "field")
        if maxlen is not None and not (isinstance(maxlen, int) and maxlen > 0):
            raise ValueError("maxlen must be a positive integer (entries the stream keeps, approximately)")
        self.maxlen = maxlen
        if not connect_timeout_s > 0:
            raise ValueError("connect_timeout_s must be above 0")
        self.connect_timeout_s = float(connect_timeout_s)
        self.client: Any = None
        self.written = self.reconnects = 0

    @property
    def marks_key(self) -> str:
        return f"{MARKS_PREFIX}:{self.stream}:{self.context.replica}"

    def setup(self) -> None:
        import redis

        self._redis = redis
        self.client = _connect(self.url, self.connect_timeout_s)
        kind = self.client.type(self.stream)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind not in ("none", "stream"):
            self.teardown()
            raise LookupError(f"redis: key {self.stream!r} holds a {kind}, not a stream")

    def load_marks(self) -> bytes | None:
        value = self.client.get(self.marks_key)
        return bytes(value) if value is not None else None

    def write(self, batch: Batch, marks: bytes) -> None:
        payloads = [encode(r) for r in batch]
        backoff, unsure = Backoff(), False
        while True:
            try:
                if unsure and self.load_marks() == marks:
                    break                         # the EXEC had gone through before the connection dropped
                pipe = self.client.pipeline(transaction=True)
                for data in payloads:
                    pipe.xadd(self.stream, {self.field: data}, maxlen=self.maxlen, approximate=True)
                pipe.set(self.marks_key, marks)
                pipe.execute()
                break
            except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
                if not unsure:
                    logger.warning(f"redis: connection lost ({exc}); retrying")
                unsure = True
                self.context.keepalive(f"redis at {safe_url(self.url)}")     # waiting, not hung
                time.sleep(backoff.next())
        if unsure:
            self.reconnects += 1
            logger.info(f"redis: reconnected to {safe_url(self.url)}")
        self.written += len(payloads)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"written": self.written}
        if self.reconnects:
            stats["reconnects"] = self.reconnects
        return stats

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
