"""HTTP plumbing for stages that listen: the ``http`` source and the ``serve`` stage.

Both serve HTTP/1.1 from **one thread with one selector** (as :mod:`streampipe.launcher.healthserver`
does, issue 21: a thread per connection let idle half-requests make hundreds of threads), with
every size and wait bounded. The pieces they share:

- :func:`listen`: a non-blocking listening socket on ``host:port`` (``SO_REUSEPORT`` for replicas
  that share a port), with an error that names the address;
- :func:`open_port_problems` (what ``validate`` refuses: a host beyond loopback without a token,
  and two sources of the token), :func:`load_token` and :func:`authorized` (``Authorization:
  Bearer``, compared in constant time);
- :func:`parse_head` (request line and headers) and :func:`response` (a JSON answer's bytes);
- :class:`JsonServer`: the whole loop for a stage whose every request is answered at once by a
  ``handler(Request) -> Answer`` (the serve stage). Connections are kept alive (HTTP/1.1 unless
  ``Connection: close``; pipelined requests are answered in order; ``Expect: 100-continue`` is
  answered), a request has
  :data:`READ_TIMEOUT_S` to arrive once begun, an idle connection is closed after
  :data:`IDLE_TIMEOUT_S`, at most :data:`MAX_CONNECTIONS` are open (one more gets a 503), a body
  is bounded before it is read (and refused unread without the token), and a handler that raises
  gives a 500, never a dead server.

The http source keeps its own loop: its answers wait until records are durable.

>>> parse_head(b"POST /predict?x=1 HTTP/1.1\\r\\nContent-Length: 2\\r\\nAuthorization: Bearer t")
Head(method='POST', path='/predict', version='HTTP/1.1', headers={'content-length': '2', 'authorization': 'Bearer t'})
>>> authorized({"authorization": "Bearer t"}, b"t"), authorized({}, b"t"), authorized({}, None)
(True, False, True)
>>> response(400, {"error": "bad"}).split(b"\\r\\n")[0]
b'HTTP/1.1 400 Bad Request'
"""

from __future__ import annotations

import hmac
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

LOOPBACK = ("127.0.0.1", "localhost", "::1")   # a host that needs no token
READ_TIMEOUT_S = 10.0        # to send a request (line, headers, body) once its first byte came
IDLE_TIMEOUT_S = 30.0        # a kept-alive connection with no request in progress is closed after this
MAX_HEADER_BYTES = 16384     # request line and headers
MAX_CONNECTIONS = 256        # open at once; a new one past it gets a 503
SEND_TIMEOUT_S = 2.0         # writing an answer to a client that does not read
SELECT_S = 0.1               # how often timeouts and shutdown are looked at
RETRY_AFTER_S = 1            # what a 429 / 503 tells the client to wait


class _Context(Protocol):
    def resolve_input(self, path: str) -> Any: ...


@dataclass
class Head:
    method: str
    path: str
    version: str
    headers: dict[str, str]


@dataclass
class Request:
    head: Head
    body: bytes


@dataclass
class Answer:
    code: int
    body: Any                       # JSON-able: a dict, or a list (a batch of results)
    extra: str = ""                 # more header lines, each ending in CRLF
    raw: bytes | None = None        # the body already encoded (a handler that uses orjson)


def open_port_problems(options: dict[str, Any], what: str) -> list[tuple[str | None, str]]:
    """What ``streampipe validate`` refuses for a stage that listens: a port open beyond this
    machine that anyone may use (no token), and two sources of the token."""
    problems: list[tuple[str | None, str]] = []
    host = str(options.get("host", "127.0.0.1"))
    if host not in LOOPBACK and options.get("token") is None and options.get("token_file") is None:
        problems.append(("host", f"host {host} opens the {what} port beyond this machine: "
                                 "set token or token_file so that only your clients may use it"))
    if options.get("token") is not None and options.get("token_file") is not None:
        problems.append(("token", "give token or token_file, not both"))
    return problems


def load_token(context: _Context, token: str | None, token_file: str | None) -> bytes | None:
    """The bearer token as bytes: ``token``, or the stripped content of ``token_file`` (relative to the config)."""
    if token_file is not None:
        text = context.resolve_input(token_file).read_text().strip()
        if not text:
            raise ValueError(f"token_file {token_file} is empty")
        return str(text).encode()
    return None if token is None else str(token).encode()


def authorized(headers: dict[str, str], token: bytes | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (always, when there is no token)."""
    if token is None:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), token)


UNAUTHORIZED = ({"error": "a valid Authorization: Bearer <token> is required"}, "WWW-Authenticate: Bearer\r\n")


def listen(host: str, port: int, what: str, reuse_port: bool = False) -> socket.socket:
    """A non-blocking socket listening on ``host:port`` (``OSError`` names the address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:                 # replicas share the port: the kernel spreads the connections
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise OSError(f"{what} cannot listen on {host}:{port}: {exc.strerror}") from None
    listener.listen(MAX_CONNECTIONS)
    listener.setblocking(False)
    return listener


def parse_head(head: bytes) -> Head | None:
    """The request line and headers (names lower-cased, the query cut from the path); None if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Head(parts[0], parts[1].split("?", 1)[0], parts[2], headers)


def content_length(headers: dict[str, str], limit: int) -> tuple[int, int | None, dict[str, Any] | None]:
    """``(length, None, None)`` for a usable ``Content-Length``, else ``(-1, code, body)`` to answer."""
    if "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" not in headers:
        return -1, 411, {"error": "a Content-Length is required"}
    try:
        length = int(headers["content-length"])
    except ValueError:
        length = -1
    if length < 0:
        return -1, 400, {"error": "bad Content-Length"}
    if length > limit:
        return -1, 413, {"error": f"body of {length} bytes: at most {limit}"}
    return length, None, None


def response(code: int, body: Any, extra: str = "", retry: bool = False, keep_alive: bool = False,
             raw: bytes | None = None) -> bytes:
    """The bytes of a JSON answer (``Retry-After`` on 429 / 503 or when ``retry``)."""
    data = raw if raw is not None else (json.dumps(body) + "\n").encode()
    if retry or code in (429, 503):
        extra += f"Retry-After: {RETRY_AFTER_S}\r\n"
    return (f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
            ).encode("latin-1") + data


def send(sock: socket.socket, data: bytes) -> bool:
    """Write a whole answer (blocking, at most :data:`SEND_TIMEOUT_S`); False if the client went."""
    try:
        sock.setblocking(True)
        sock.settimeout(SEND_TIMEOUT_S)
        sock.sendall(data)
        sock.setblocking(False)
        return True
    except OSError:
        return False


def check_listen_options(port: int, token: str | None, token_file: str | None) -> None:
    """What a listening stage's ``__init__`` refuses: a port out of range, two sources of the token."""
    if not 0 <= int(port) < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")


def accept_all(listener: socket.socket) -> Iterator[socket.socket]:
    """The connections waiting on a non-blocking listener (none once EMFILE and the like: the
    backlog waits for the next round)."""
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        yield sock


def receive(sock: socket.socket) -> bytes | None:
    """What a readable non-blocking socket holds: the bytes, ``b""`` once the peer closed (or the
    connection broke), None if nothing is there after all."""
    try:
        return sock.recv(1 << 16)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def drop(sel: selectors.BaseSelector, conns: dict[socket.socket, Any], sock: socket.socket) -> None:
    """Forget a connection (its selector registration, its entry in ``conns``) and close it."""
    if conns.pop(sock, None) is not None:
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
    sock.close()


Handler = Callable[[Request], Answer]
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    head: Head | None = None
    body_at: int = 0
    need: int = 0                   # bytes of head + body, once the head is read


class JsonServer:
    """Serve ``handler`` on a listening socket from one daemon thread (:meth:`start`, :meth:`stop`).

    ``token`` guards every path but ``open_paths`` (the probes). ``max_body`` bounds a body."""

    def __init__(self, listener: socket.socket, handler: Handler, token: bytes | None = None,
                 max_body: int = 1 << 20, open_paths: tuple[str, ...] = ("/healthz", "/readyz"),
                 name: str = "http") -> None:
        self.listener, self.handler, self.token, self.max_body = listener, handler, token, max_body
        self.open_paths = open_paths
        self.address = listener.getsockname()
        self.requests = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> JsonServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(SELECT_S * 20)

    # -- the loop ---------------------------------------------------------------------------
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        conns: dict[socket.socket, _Conn] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(SELECT_S):
                    if key.fileobj is self.listener:
                        self._accept(sel, conns)
                    else:
                        conn = conns.get(key.fileobj)  # type: ignore[call-overload]
                        if conn is not None:
                            self._read(sel, conns, conn)
                now = time.monotonic()
                for conn in [c for c in conns.values() if c.deadline <= now]:
                    self._close(sel, conns, conn)
        finally:
            for conn in list(conns.values()):
                self._close(sel, conns, conn)
            sel.close()
            self.listener.close()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn]) -> None:
        for sock in accept_all(self.listener):
            if len(conns) >= MAX_CONNECTIONS:
                send(sock, response(503, {"error": "too many connections"}))
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[sock] = _Conn(sock, time.monotonic() + IDLE_TIMEOUT_S)
            sel.register(sock, selectors.EVENT_READ)

    def _read(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn) -> None:
        chunk = receive(conn.sock)
        if chunk is None:
            return
        if not chunk:
            self._close(sel, conns, conn)
            return
        if not conn.buf:
            conn.deadline = time.monotonic() + READ_TIMEOUT_S   # a request has begun
        conn.buf += chunk
        while conns.get(conn.sock) is conn and self._next(sel, conns, conn):
            pass

    def _next(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn) -> bool:
        """Answer the request at the start of the buffer if it is complete; True if one was answered
        and the connection stays open (another may follow in the buffer)."""
        if conn.head is None:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.buf) > MAX_HEADER_BYTES:
                    self._finish(sel, conns, conn, Answer(431, {"error": "request head too large"}), False)
                return False
            head = parse_head(bytes(conn.buf[:end]))
            if head is None:
                self._finish(sel, conns, conn, Answer(400, {"error": "bad request line"}), False)
                return False
            if head.path not in self.open_paths and not authorized(head.headers, self.token):
                self.requests += 1
                self.errors += 1        # refused before its body is read: the connection closes
                self._finish(sel, conns, conn, Answer(401, UNAUTHORIZED[0], UNAUTHORIZED[1]), False)
                return False
            length = 0
            if head.method in ("POST", "PUT", "PATCH") or "content-length" in head.headers:
                length, code, why = content_length(head.headers, self.max_body)
                if code is not None:
                    self._finish(sel, conns, conn, Answer(code, why), False)
                    return False
            conn.head, conn.body_at, conn.need = head, end + 4, end + 4 + length
            if len(conn.buf) < conn.need and head.headers.get("expect", "").lower() == "100-continue":
                send(conn.sock, CONTINUE)      # curl waits a second for it before a body over 1 KiB
        if len(conn.buf) < conn.need:
            return False
        head, body = conn.head, bytes(conn.buf[conn.body_at:conn.need])
        del conn.buf[:conn.need]
        conn.head = None
        connection = head.headers.get("connection", "").lower()
        keep = connection != "close" if head.version == "HTTP/1.1" else connection == "keep-alive"
        self.requests += 1
        try:
            answer = self.handler(Request(head, body))
        except Exception as exc:   # a request must never take the server down
            answer = Answer(500, {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        if answer.code >= 400:
            self.errors += 1
        return self._finish(sel, conns, conn, answer, keep)

    def _finish(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn,
                answer: Answer, keep: bool) -> bool:
        sent = send(conn.sock, response(answer.code, answer.body, answer.extra, keep_alive=keep, raw=answer.raw))
        if not (sent and keep):
            self._close(sel, conns, conn)
            return False
        conn.deadline = time.monotonic() + (READ_TIMEOUT_S if conn.buf else IDLE_TIMEOUT_S)
        return True

    @staticmethod
    def _close(sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn) -> None:
        drop(sel, conns, conn.sock)


__all__ = ["Answer", "Head", "JsonServer", "Request", "accept_all", "authorized", "check_listen_options",
           "content_length", "drop", "listen", "load_token", "open_port_problems", "parse_head", "receive", "response", "send"]
