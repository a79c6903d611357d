"""``run-stage``'s HTTP probe server: one thread and one selector, whatever the clients do.

A thread per connection (``http.server.ThreadingHTTPServer``) let 500 idle half-requests make
507 threads in the stage's process (issue 21). Here one thread serves every connection from a
selector: a connection has :data:`READ_TIMEOUT_S` to send its request line and headers (at most
:data:`MAX_REQUEST_BYTES`), at most :data:`MAX_CONNECTIONS` are open at once (a new one closes
the oldest), and the answer is a small body written at once. Only ``GET`` is served: the probes
(``/healthz``, ``/readyz``) and ``/metrics``.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

READ_TIMEOUT_S = 5.0        # a kubelet probe sends its request at once; an idle connection goes after this
MAX_REQUEST_BYTES = 8192    # request line and headers of a probe are a few hundred bytes
MAX_CONNECTIONS = 128       # open at once; the oldest is closed for a new one
SEND_TIMEOUT_S = 2.0        # writing the answer (a few KB of metrics) to a client that does not read
SELECT_S = 0.25             # how often timeouts and shutdown are looked at

Route = Callable[[str], tuple[int, str, str]]   # path -> (status, body, content type)


class HealthServer:
    """Serve ``route`` on ``host:port`` from one daemon thread (:meth:`start`, :meth:`shutdown`)."""

    def __init__(self, host: str, port: int, route: Route) -> None:
        self.route = route
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(MAX_CONNECTIONS)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.conns: dict[socket.socket, tuple[float, bytearray]] = {}   # insertion order: oldest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(SELECT_S * 8)

    # -- the loop ---------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                for key, _ in self.selector.select(SELECT_S):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._read(key.fileobj)   # type: ignore[arg-type]
                self._expire(time.monotonic())
        finally:
            for conn in list(self.conns):
                self._close(conn)
            self.selector.close()
            self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:      # EMFILE and the like: the backlog waits for the next round
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                self._close(next(iter(self.conns)))
            conn.setblocking(False)
            self.conns[conn] = (time.monotonic() + READ_TIMEOUT_S, bytearray())
            self.selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)
            return
        buf = self.conns[conn][1]
        buf += chunk
        if b"\r\n\r\n" in buf or b"\n\n" in buf:
            self._answer(conn, bytes(buf))
        elif len(buf) > MAX_REQUEST_BYTES:
            self._respond(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request too large\n", "text/plain; charset=utf-8")

    def _answer(self, conn: socket.socket, request: bytes) -> None:
        parts = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._respond(conn, HTTPStatus.BAD_REQUEST, "bad request\n", "text/plain; charset=utf-8")
        elif parts[0] != b"GET":
            self._respond(conn, HTTPStatus.METHOD_NOT_ALLOWED, "only GET\n", "text/plain; charset=utf-8")
        else:
            try:
                code, body, ctype = self.route(parts[1].decode("latin-1").split("?", 1)[0])
            except Exception as exc:   # a probe must not take the server down
                code, body, ctype = 500, f"{type(exc).__name__}: {exc}\n", "text/plain; charset=utf-8"
            self._respond(conn, code, body, ctype)

    def _respond(self, conn: socket.socket, code: int, body: str, ctype: str) -> None:
        data = body.encode()
        head = (f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode("latin-1")
        try:
            conn.setblocking(True)
            conn.settimeout(SEND_TIMEOUT_S)
            conn.sendall(head + data)
        except OSError:
            pass
        self._close(conn)

    def _expire(self, now: float) -> None:
        for conn, (deadline, _) in list(self.conns.items()):
            if deadline > now:
                break            # oldest first: the rest are younger
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        if self.conns.pop(conn, None) is not None:
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
        conn.close()
