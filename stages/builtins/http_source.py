"""http: records ``POST``ed as JSON to a local port, answered 200 once they are durable.

A body is one JSON object, a JSON array of objects, or JSON lines (one object a line). Answers:

    200  {"accepted": n, "first_id": a, "last_id": b}: every record of the body is acknowledged
         end to end (the sinks have it) *and* the position covering it is in the replica's state
         file (:meth:`Source.saved`), so a restart neither loses nor renumbers it
    400  the body is not JSON, or a record is not an object (nothing of that body is taken)
    401  the ``Authorization: Bearer <token>`` header is missing or wrong (compared in constant time)
    404 / 405 / 411  another path, another method, no ``Content-Length``
    413  the body is larger than ``max_body_bytes`` (or holds more records than ``max_pending``)
    429  the buffer is full (``max_pending`` records accepted and not yet durable): ``Retry-After``
    503  the stage is stopping, or the records were not known durable within ``reply_timeout_s``
         (they may still arrive: a retry may then repeat them), with ``Retry-After``

Ids: the source sets ``id`` on each record (a client's own ``id`` moves to ``client_id``),
increasing per replica. A restarted replica must never give an id again that its last life may
have sent (the sink would take the new record for a copy of the old one), and its saved position
lags what it sent; so ids are *reserved* in blocks of :data:`RESERVE_BLOCK` in
``state/<stage>.<r>.http-ids`` (written and fsynced before an id of the block is given) and a
restart starts past the reservation. Ids therefore have gaps after a crash, never repeats.

At least once for the client: a 200 lost on the way (the connection dropped after the records
were durable) makes a client retry post them again, under new ids: they are then in the sink
twice. A client that needs exactly once puts its own key in the records and lets the sink
upsert by it (the ``postgres`` sink's ``key``).

Replicas (``replicas: N``) share the port (``SO_REUSEPORT``: the kernel spreads connections over
them; only processes of the same user can join it); each has its own ids and buffer. Every
answer closes its connection (``Connection: close``).

The server is one thread with one selector (as :mod:`streampipe.launcher.healthserver`; the plumbing
it shares with the ``serve`` stage is :mod:`streampipe.stages.builtins.httpserver`): at most
:data:`MAX_CONNECTIONS` open, :data:`READ_TIMEOUT_S` to send a request, the body bounded before
it is read. It binds ``host`` (default 127.0.0.1): anything else is an explicit choice, and ``validate``
refuses it without a ``token`` (the token travels in clear: put TLS in front, e.g. a reverse
proxy, when the port is reachable from other machines).

Options:
    port              TCP port (0: any free one, written to ``state/<stage>.<r>.http-port``)
    host              address to bind (default 127.0.0.1)
    path              the URL path records are posted to (default ``/``; ``/healthz`` answers GET)
    token             a bearer token a client must send (None: anyone who reaches the port)
    token_file        a file holding the token (relative to the config), instead of ``token``
    max_body_bytes    the largest body taken (default 4 MiB)
    max_pending       records accepted and not yet durable, at most (the buffer; default 20,000)
    reply_timeout_s   how long a request waits to be durable before a 503 (default 30)

>>> HttpSource(port=0).snapshot()
{'next': 0}
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streampipe.stages.api import Record, Source
from streampipe.stages.builtins.httpserver import (
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    READ_TIMEOUT_S,
    SELECT_S,
    UNAUTHORIZED,
    accept_all,
    authorized,
    check_listen_options,
    content_length,
    drop,
    listen,
    load_token,
    open_port_problems,
    parse_head,
    receive,
    response,
    send,
)
from streampipe.stages.state import atomic_write

RESERVE_BLOCK = 100_000      # ids reserved on disk at once: one fsync per this many records


class _Conn:
    __slots__ = ("sock", "buf", "deadline", "need", "body_at", "waiting")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.buf, self.deadline = sock, bytearray(), deadline
        self.need: int | None = None     # total bytes of head + body, once the head is read
        self.body_at = 0
        self.waiting: tuple[int, int] | None = None   # (first id, one past the last) while it waits to be durable


class HttpSource(Source):
    def __init__(self, port: int = 8080, host: str = "127.0.0.1", path: str = "/", token: str | None = None,
                 token_file: str | None = None, max_body_bytes: int = 4 << 20, max_pending: int = 20_000,
                 reply_timeout_s: float = 30.0) -> None:
        super().__init__()
        check_listen_options(port, token, token_file)
        if int(max_body_bytes) < 1 or int(max_pending) < 1 or float(reply_timeout_s) <= 0:
            raise ValueError("max_body_bytes, max_pending and reply_timeout_s must be > 0")
        self.port, self.host, self.path = int(port), host, path
        self.token, self.token_file = token, token_file
        self.max_body, self.max_pending, self.reply_timeout = int(max_body_bytes), int(max_pending), float(reply_timeout_s)
        self.next = 0                 # runtime thread: one past the id of the last record generated
        self.lock = threading.Lock()
        self.queue: deque[Record] = deque()   # accepted, not generated yet (ids set)
        self.assign = 0               # server thread (under lock): the next id to give
        self.reserved = 0             # ids below this are reserved on disk
        self.durable = 0              # ids below this are saved (set by saved(), read by the server)
        self.accepted = self.answered = self.refused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listener: socket.socket | None = None
        self._token: bytes | None = None

    @staticmethod
    def option_problems(options: dict[str, Any]) -> list[tuple[str | None, str]]:
        """What ``streampipe validate`` refuses beyond the signature: a port open beyond this
        machine that anyone may post to, and two sources of the token."""
        return open_port_problems(options, "ingest")

    # -- the runtime's side -----------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        self.next = int(state.get("next", 0))

    def snapshot(self) -> dict[str, Any]:
        return {"next": self.next}

    def setup(self) -> None:
        ctx = self.context
        state_dir = Path(ctx.run_dir) / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.reserve_path = state_dir / f"{ctx.name}.{ctx.replica}.http-ids"
        try:
            reserved = int(self.reserve_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            reserved = 0
        # past everything an earlier life may have sent: its saved position lags what it sent
        self.assign = self.reserved = self.durable = max(self.next, reserved)
        self.next = self.assign
        self._token = load_token(ctx, self.token, self.token_file)
        self.listener = listen(self.host, self.port, "http source", reuse_port=ctx.replicas > 1)
        self.address = self.listener.getsockname()
        atomic_write(state_dir / f"{ctx.name}.{ctx.replica}.http-port", f"{self.address[1]}\n".encode())
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._serve, name="http-source", daemon=True)
        self._thread.start()

    def generate(self) -> Iterator[Record | None]:
        while True:
            with self.lock:
                taken = [self.queue.popleft() for _ in range(min(len(self.queue), self.context.max_batch))]
            if not taken:
                yield None
                continue
            for record in taken:
                self.next = record["id"] + 1     # before the yield: a snapshot taken then covers this record
                yield record

    def saved(self, state: dict[str, Any]) -> None:
        durable = int(state.get("next", 0))
        if durable > self.durable:
            self.durable = durable
            self._wake()

    def teardown(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(SELECT_S * 20)
            self._thread = None
            self.wake_r.close()
            self.wake_w.close()

    @property
    def pending(self) -> int:
        """Records accepted and not yet durable (answered or not: a request that timed out still counts)."""
        return self.assign - self.durable

    def stats(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "answered": self.answered, "refused": self.refused,
                "pending": self.pending, "next_id": self.next, "port": getattr(self, "address", (None, self.port))[1]}

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except (OSError, AttributeError):
            pass        # the pipe is full (a wake-up is pending anyway) or the server never started

    # -- the server thread ------------------------------------------------------------------
    def _serve(self) -> None:
        assert self.listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        conns: dict[socket.socket, _Conn] = {}
        waiting: deque[_Conn] = deque()      # in id order
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(SELECT_S):
                    if key.fileobj is self.listener:
                        self._accept(sel, conns)
                    elif key.fileobj is self.wake_r:
                        try:
                            while self.wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        conn = conns.get(key.fileobj)  # type: ignore[call-overload]
                        if conn is not None:
                            self._read(sel, conns, conn, waiting)
                now = time.monotonic()
                durable = self.durable
                while waiting and waiting[0].waiting is not None and waiting[0].waiting[1] <= durable:
                    conn = waiting.popleft()
                    first, end = conn.waiting or (0, 0)
                    self.answered += end - first
                    self._respond(sel, conns, conn, 200, {"accepted": end - first, "first_id": first, "last_id": end - 1})
                for conn in list(conns.values()):
                    if conn.deadline <= now:
                        if conn.waiting is not None:
                            waiting.remove(conn)
                            self._respond(sel, conns, conn, 503, {"error": "not known durable in time: the records may "
                                                                           "still arrive, a retry may repeat them"})
                        else:
                            self._close(sel, conns, conn)
        finally:
            for conn in list(conns.values()):
                if conn.waiting is not None:
                    self._respond(sel, conns, conn, 503, {"error": "the source is stopping: the records may still "
                                                                   "arrive, a retry may repeat them"})
                else:
                    self._close(sel, conns, conn)
            sel.close()
            self.listener.close()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn]) -> None:
        assert self.listener is not None
        for sock in accept_all(self.listener):
            conn = _Conn(sock, time.monotonic() + READ_TIMEOUT_S)
            if len(conns) >= MAX_CONNECTIONS:
                conns[sock] = conn
                self._respond(sel, conns, conn, 503, {"error": "too many connections"})
                continue
            sock.setblocking(False)
            conns[sock] = conn
            sel.register(sock, selectors.EVENT_READ)

    def _read(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn,
              waiting: deque[_Conn]) -> None:
        chunk = receive(conn.sock)
        if chunk is None:
            return
        if not chunk:
            if conn.waiting is None:
                self._close(sel, conns, conn)
            else:                        # the client went; its records stay accepted
                sel.unregister(conn.sock)
            return
        if conn.waiting is not None:
            return                       # pipelined bytes after a request: ignored, the answer closes
        conn.buf += chunk
        if conn.need is None:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.buf) > MAX_HEADER_BYTES:
                    self._respond(sel, conns, conn, 431, {"error": "request head too large"})
                return
            if not self._head(sel, conns, conn, bytes(conn.buf[:end]), end + 4):
                return
        if conn.need is not None and len(conn.buf) >= conn.need:
            self._body(sel, conns, conn, bytes(conn.buf[conn.body_at:conn.need]), waiting)

    def _head(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn,
              head: bytes, body_at: int) -> bool:
        """Check the request line and headers; False once answered."""
        parsed = parse_head(head)
        if parsed is None:
            self._respond(sel, conns, conn, 400, {"error": "bad request line"})
            return False
        method, target, headers = parsed.method, parsed.path, parsed.headers
        if method == "GET" and target == "/healthz":
            self._respond(sel, conns, conn, 200, {"ok": True, "pending": self.pending})
            return False
        if target != self.path:
            self._respond(sel, conns, conn, 404, {"error": f"records are posted to {self.path}"})
            return False
        if method != "POST":
            self._respond(sel, conns, conn, 405, {"error": "only POST"})
            return False
        if not authorized(headers, self._token):
            self._respond(sel, conns, conn, 401, UNAUTHORIZED[0], extra=UNAUTHORIZED[1])
            return False
        length, code, why = content_length(headers, self.max_body)
        if code is not None:
            self._respond(sel, conns, conn, code, why or {})
            return False
        conn.body_at, conn.need = body_at, body_at + length
        return True

    def _body(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn, body: bytes,
              waiting: deque[_Conn]) -> None:
        try:
            records = parse_body(body)
        except ValueError as exc:
            self.refused += 1
            self._respond(sel, conns, conn, 400, {"error": str(exc)})
            return
        n = len(records)
        if n > self.max_pending:
            self._respond(sel, conns, conn, 413, {"error": f"{n} records in one body: at most {self.max_pending}"})
            return
        if self._stop.is_set():
            self._respond(sel, conns, conn, 503, {"error": "the source is stopping"}, retry=True)
            return
        if n == 0:
            self._respond(sel, conns, conn, 200, {"accepted": 0})
            return
        with self.lock:
            if self.pending + n > self.max_pending:
                full = True
            else:
                full = False
                first = self.assign
                if first + n > self.reserved:      # reserve before any id of the block leaves
                    self.reserved = first + n + RESERVE_BLOCK
                    atomic_write(self.reserve_path, f"{self.reserved}\n".encode())
                for i, record in enumerate(records, first):
                    if "id" in record:
                        record["client_id"] = record.pop("id")
                    record["id"] = i
                self.assign = first + n
                self.queue.extend(records)
        if full:
            self._respond(sel, conns, conn, 429, {"error": f"{self.pending} records wait to be durable "
                                                           f"(max_pending {self.max_pending}): retry later"}, retry=True)
            return
        self.accepted += n
        conn.waiting = (first, first + n)
        conn.deadline = time.monotonic() + self.reply_timeout
        waiting.append(conn)

    def _respond(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn, code: int,
                 body: dict[str, Any], retry: bool = False, extra: str = "") -> None:
        send(conn.sock, response(code, body, extra, retry=retry))
        self._close(sel, conns, conn)

    @staticmethod
    def _close(sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn) -> None:
        drop(sel, conns, conn.sock)


def parse_body(body: bytes) -> list[Record]:
    """The records of a body: one object, an array of objects, or JSON lines. ValueError says why not.

    >>> parse_body(b'{"a": 1}'), parse_body(b'[{"a": 1}, {"a": 2}]'), parse_body(b'{"a": 1}\\n{"a": 2}\\n')
    ([{'a': 1}], [{'a': 1}, {'a': 2}], [{'a': 1}, {'a': 2}])
    >>> parse_body(b'[1]')
    Traceback (most recent call last):
    ValueError: record 1 is a JSON int, not an object
    """
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"the body is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as whole:
        value = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if n == 1:
                    raise ValueError(f"not JSON: {whole}") from None
                raise ValueError(f"line {n} is not JSON: {exc}") from None
        if len(value) == 1 and not isinstance(value[0], dict):
            raise ValueError(f"not JSON: {whole}") from None
        for n, v in enumerate(value, 1):
            if not isinstance(v, dict):
                raise ValueError(f"line {n} is a JSON {type(v).__name__}, not an object") from None
        return value
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        for n, v in enumerate(value, 1):
            if not isinstance(v, dict):
                raise ValueError(f"record {n} is a JSON {type(v).__name__}, not an object")
        return value
    raise ValueError(f"a JSON {type(value).__name__}, not an object or an array of objects")


__all__ = ["HttpSource", "parse_body"]
