"""``streampipe dashboard``: a live web page of a running pipeline, served on 127.0.0.1 only.

A process of the CLI (not the supervisor): it asks the supervisor's control socket for the status
once a second, as ``streampipe status`` does, reads the run directory's files as the other
commands do (``events.jsonl``, ``deadletter/*.jsonl``, the evaluator's ``metrics.jsonl``), and
pushes one JSON picture a second to every open page by server-sent events. Actions (restart,
scale) go through :func:`streampipe.launcher.control.restart_stage` / ``scale_stage``, the code
of ``streampipe restart`` and ``streampipe scale``, with their checks.

Access is by a random token in the URL it prints (as Jupyter does): any request without it, or
with another, is answered 401; a ``Host`` header naming another host is refused too (DNS
rebinding). The page and its script ship in the package (``launcher/dashboard_static``): no CDN,
it works offline. The process stops by itself when the pipeline stops (``streampipe down``), and
on Ctrl-C; it leaves no socket or process behind (the HTTP server is closed, its threads are
daemons that each end with their connection, an event stream within :data:`TICK_S`).

Routes (``?token=T`` on each but the page's code, ``/app.js`` and ``/app.css``): ``/`` the page, ``/state`` one
picture (JSON), ``/events`` the stream of pictures, ``POST /api/restart`` ``{"stage"}``,
``POST /api/scale`` ``{"stage", "replicas"}``, ``/api/logs?stage=S`` the last lines of a
stage's logs.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loguru import logger

from streampipe._logtail import LogTail, follow_file
from streampipe.launcher.control import request, restart_stage, scale_stage
from streampipe.launcher.errors import NotRunning, StreampipeError

TICK_S = 1.0                # a picture a second: what a person follows, and what `status` rates are computed over
KEEP_EVENTS = 200           # events kept for the timeline
KEEP_DEAD = 10              # latest dead letters kept per stage
KEEP_METRICS = 2000         # evaluator rows kept for the chart (one per `every` hold-out records)
MAX_STREAMS = 32            # open event streams at once; one more is refused (503)
MAX_BODY_BYTES = 4096       # an action's JSON body is a few dozen bytes
LOG_LINES = 100             # /api/logs: the last lines of each replica's log
LOG_TAIL_BYTES = 64 << 10   # ... read from the end of each file
CLIENT_TIMEOUT_S = 15.0     # a browser sends its request at once and reads an event a second; a silent socket goes
STATUS_TIMEOUT_S = 5.0      # a status request of the dashboard's tick; longer, the picture says so
GONE_AFTER = 3              # ticks in a row with no supervisor: the pipeline is down, the dashboard stops
STATIC = ("index.html", "app.js", "app.css")
PUBLIC = ("app.js", "app.css")    # served without the token (a <script src> carries none); the page and all data need it
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _short(value: Any, n: int = 300) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= n else text[: n - 1] + "…"


class Picture:
    """What the page shows, kept up to date by :meth:`tick` (one thread) and read by the handlers."""

    def __init__(self, run_dir: Path) -> None:
        self.rd = run_dir
        self.lock = threading.Lock()
        self.events: deque[dict[str, Any]] = deque(maxlen=KEEP_EVENTS)
        self.metrics: deque[dict[str, Any]] = deque(maxlen=KEEP_METRICS)
        self.dead_counts: dict[str, int] = {}
        self.dead_latest: dict[str, deque[dict[str, Any]]] = {}
        self.tails = {"events": follow_file(run_dir / "events.jsonl"), "metrics": follow_file(run_dir / "metrics.jsonl"),
                      "dead": LogTail([run_dir / "deadletter" / "*.jsonl"])}
        self.graph: dict[str, Any] = {"stages": [], "edges": [], "layers": []}
        self.config_key: tuple[str, float, tuple[str, ...]] | None = None
        self.last_sent: dict[tuple[str, str], tuple[float, int]] = {}    # (stage, edge) -> (time, records sent)
        self.edge_rates: dict[str, float] = {}
        self.status: dict[str, Any] | None = None
        self.error = ""
        self.version = 0
        self.seen = False           # the supervisor answered once (`up --dashboard` starts before it does)
        self.missing = 0
        self.changed = threading.Condition(self.lock)

    def close(self) -> None:
        for tail in self.tails.values():
            tail.close()

    # -- reading ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """One new picture; False once the pipeline is gone (no supervisor for GONE_AFTER ticks)."""
        try:
            st = request(self.rd, "status", timeout=STATUS_TIMEOUT_S)
            st.pop("ok", None)
            error, self.missing, self.seen = "", 0, True
        except NotRunning as exc:
            st, error = None, str(exc)
            self.missing += self.seen
        except StreampipeError as exc:
            st, error = None, str(exc)
        now = time.time()
        if st is not None:
            self._graph(st)
            self._edge_rates(st, now)
        events = [e for e in (_json(line.text) for line in self.tails["events"].poll()) if e]
        metrics = [m for m in (_json(line.text) for line in self.tails["metrics"].poll()) if m and isinstance(m.get("metrics"), dict)]
        dead = [(line.stream.rsplit(".", 1)[0], _json(line.text)) for line in self.tails["dead"].poll()]
        with self.changed:
            if st is not None:
                self.status = st
            self.error = error
            self.events.extend({k: e.get(k) for k in ("time", "event", "stage", "replica", "pid", "reason")} for e in events)
            self.metrics.extend({"time": m.get("time"), "version": m.get("model_version"), "drift": bool(m.get("drift")),
                                 "records": m.get("records_evaluated"),
                                 "metrics": {k: v for k, v in m["metrics"].items() if isinstance(v, (int, float))}} for m in metrics)
            for stage, entry in dead:
                self.dead_counts[stage] = self.dead_counts.get(stage, 0) + 1
                if entry:
                    latest = self.dead_latest.setdefault(stage, deque(maxlen=KEEP_DEAD))
                    latest.append({"time": entry.get("time"), "error": _short(entry.get("error", ""), 500),
                                   "record": _short(entry.get("record", ""))})
            self.version += 1
            self.changed.notify_all()
        return self.missing < GONE_AFTER

    def _graph(self, st: dict[str, Any]) -> None:
        """The topology from the config the supervisor runs (read again when it or the stages change)."""
        names = tuple(dict.fromkeys(r["name"] for r in st["stages"]))
        path = Path(st.get("config") or "")
        try:
            key = (str(path), path.stat().st_mtime, names)
        except OSError:
            key = (str(path), 0.0, names)
        if key == self.config_key:
            return
        self.config_key = key
        from streampipe.launcher.config import load_config
        from streampipe.launcher.errors import ConfigError
        from streampipe.launcher.graph import layers

        try:
            cfg = load_config(path, check_stages=False)
        except (ConfigError, OSError) as exc:
            logger.warning(f"dashboard: cannot read {path} for the graph: {exc}")
            return
        self.graph = {"stages": [{"name": n, "type": s.type, "source": not s.inputs} for n, s in cfg.stages.items()],
                      "edges": [{"src": e.src, "dest": e.dest, "output": e.output, "name": e.name} for e in cfg.edges()],
                      "layers": layers(cfg)}

    def _edge_rates(self, st: dict[str, Any], now: float) -> None:
        """Records/s of each edge: what its source's replicas sent on it, between two ticks."""
        sent: dict[tuple[str, str], int] = {}
        for r in st["stages"]:
            for edge, n in (r.get("edges_out") or {}).items():
                if isinstance(n, int):
                    sent[(r["name"], str(edge))] = sent.get((r["name"], str(edge)), 0) + n
        for key, n in sent.items():
            before = self.last_sent.get(key)
            if before is not None and now > before[0]:
                # a replica restarted counts from 0 again: a drop is no negative rate
                self.edge_rates[f"{key[0]}|{key[1]}"] = round(max(0, n - before[1]) / (now - before[0]), 1)
            self.last_sent[key] = (now, n)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"version": self.version, "time": time.time(), "status": self.status, "error": self.error,
                    "graph": self.graph, "edge_rates": dict(self.edge_rates), "events": list(self.events)[-60:],
                    "metrics": list(self.metrics),
                    "dead_letters": {"counts": dict(self.dead_counts),
                                     "latest": {s: list(d)[-5:] for s, d in self.dead_latest.items()}}}

    def wait_newer(self, version: int, timeout: float) -> int:
        with self.changed:
            self.changed.wait_for(lambda: self.version > version, timeout)
            return self.version


def _json(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stage_logs(run_dir: Path, stage: str) -> str:
    """The last :data:`LOG_LINES` lines of each replica's log of ``stage`` (``streampipe logs`` has them all)."""
    out = []
    for path in sorted((run_dir / "logs").glob(f"{stage}.*.jsonl")):
        if path.name.count(".") != 2:       # a rotated file: the live one is enough here
            continue
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()[-LOG_LINES:]
        for line in lines:
            entry = _json(line)
            rec = (entry or {}).get("record") or {}
            if rec:
                out.append(f"{path.stem}  {rec.get('time', {}).get('repr', '')[11:23]}  {rec.get('level', {}).get('name', ''):<7} "
                           f"{rec.get('message', '')}")
    return "\n".join(out)


class Dashboard:
    """The HTTP server and the thread that refreshes the picture; :meth:`serve` blocks until stopped."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 url_file: Path | None = None) -> None:
        self.rd = run_dir
        self.url_file = url_file      # `up --dashboard`: where `up --detach` and other commands find the URL
        self.token = token or secrets.token_urlsafe(24)
        self.picture = Picture(run_dir)
        self.stopped = threading.Event()
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.host, self.port = host, int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/?token={self.token}"

    def serve(self) -> int:
        """Serve until Ctrl-C, :meth:`stop` or the pipeline stops; 0 on a stop asked for, 1 when the pipeline went away."""
        refresher = threading.Thread(target=self._refresh, name="dashboard-refresh", daemon=True)
        server = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="dashboard-http", daemon=True)
        self.picture.tick()
        self._publish_url()
        refresher.start()
        server.start()
        try:
            while not self.stopped.wait(0.2):
                pass
        except KeyboardInterrupt:
            self.stopped.set()
        finally:
            self.server.shutdown()
            self.server.server_close()
            refresher.join(STATUS_TIMEOUT_S + 2 * TICK_S)
            self.picture.close()
            if self.url_file is not None:
                self.url_file.unlink(missing_ok=True)
        return 1 if self.gone else 0

    gone = False          # the pipeline stopped under the dashboard
    published = False     # the URL is in url_file

    def stop(self, wait: threading.Thread | None = None) -> None:
        """Stop serving; with ``wait``, the thread of :meth:`in_thread`, until it has closed everything."""
        self.stopped.set()
        if wait is not None:
            wait.join(STATUS_TIMEOUT_S + 4 * TICK_S)

    def in_thread(self) -> threading.Thread:
        """Serve from a daemon thread (``up --dashboard``: the supervisor owns the main thread); :meth:`stop` ends it."""
        thread = threading.Thread(target=self.serve, name="dashboard", daemon=True)
        thread.start()
        return thread

    def _publish_url(self) -> None:
        """Write the URL to ``url_file`` once the run directory is the supervisor's (it makes it 0700)."""
        if self.url_file is None or not self.picture.seen or self.published:
            return
        self.url_file.unlink(missing_ok=True)      # one of a run that was killed: not ours, and maybe not 0600
        self.url_file.touch(mode=0o600)
        self.url_file.write_text(self.url + "\n")
        self.published = True

    def _refresh(self) -> None:
        while not self.stopped.wait(TICK_S):
            try:
                alive = self.picture.tick()
            except Exception as exc:     # a bad file must not freeze the page: say so, go on
                logger.opt(exception=True).warning(f"dashboard: {exc}")
                continue
            self._publish_url()
            if not alive:
                self.gone = True
                self.stopped.set()
        with self.picture.changed:        # wake the event streams: they end now
            self.picture.version += 1
            self.picture.changed.notify_all()

    def allowed(self, handler: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> bool:
        given = (query.get("token") or [""])[0]
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def host_ok(self, handler: BaseHTTPRequestHandler) -> bool:
        host = (handler.headers.get("Host") or "").rsplit(":", 1)
        return host[0] in ("127.0.0.1", "localhost", self.host) and (len(host) == 1 or host[1] == str(self.port))


def _handler(dash: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "streampipe-dashboard"
        protocol_version = "HTTP/1.1"
        timeout = CLIENT_TIMEOUT_S      # an idle or stalled connection is closed: its thread does not wait forever

        def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 (the base class's name)
            logger.debug("dashboard: " + format % args)

        def _send(self, code: int, body: bytes | str, ctype: str = "text/plain; charset=utf-8") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self' data:")
            self.end_headers()
            self.wfile.write(data)

        def _json(self, code: int, value: Any) -> None:
            self._send(code, json.dumps(value, default=str), "application/json")

        def _check(self) -> tuple[str, dict[str, list[str]]] | None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if not dash.host_ok(self):
                self._send(HTTPStatus.FORBIDDEN, "this dashboard answers only on 127.0.0.1\n")
                return None
            if url.path.lstrip("/") in PUBLIC:     # the page's code: no data in it
                return url.path, query
            if url.path == "/favicon.ico":         # asked by every browser, without the token
                self._send(HTTPStatus.NO_CONTENT, b"")
                return None
            if not dash.allowed(self, query):
                self._send(HTTPStatus.UNAUTHORIZED, "401: open the URL `streampipe dashboard` printed (it holds the token)\n")
                return None
            return url.path, query

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            checked = self._check()
            if checked is None:
                return
            path, query = checked
            name = "index.html" if path == "/" else path.lstrip("/")
            if name in STATIC:
                body = resources.files("streampipe.launcher").joinpath("dashboard_static").joinpath(name).read_bytes()
                self._send(HTTPStatus.OK, body, CONTENT_TYPES[Path(name).suffix])
            elif path == "/state":
                self._json(HTTPStatus.OK, dash.picture.snapshot())
            elif path == "/events":
                self._stream()
            elif path == "/api/logs":
                stage = (query.get("stage") or [""])[0]
                if not stage or "/" in stage or stage.startswith("."):
                    self._send(HTTPStatus.BAD_REQUEST, "name a stage: ?stage=NAME\n")
                else:
                    self._send(HTTPStatus.OK, stage_logs(dash.rd, stage) or f"no log lines of {stage}\n")
            else:
                self._send(HTTPStatus.NOT_FOUND, "not found\n")

        def do_POST(self) -> None:  # noqa: N802
            checked = self._check()
            if checked is None:
                return
            path, _ = checked
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY_BYTES:
                self._json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": "a JSON body of at most 4 KiB"})
                return
            body = _json(self.rfile.read(length).decode(errors="replace")) or {}
            stage = body.get("stage")
            if not isinstance(stage, str):
                self._json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": "name a stage"})
                return
            try:
                if path == "/api/restart":
                    reply = restart_stage(dash.rd, stage)
                    message = f"restarted {stage}: {reply['replicas']} replicas"
                elif path == "/api/scale":
                    replicas = body.get("replicas")
                    if type(replicas) is not int:
                        raise StreampipeError("replicas: a whole number")
                    reply = scale_stage(dash.rd, stage, replicas)
                    message = f"scaled {stage}: {reply['before']} -> {reply['after']} replicas"
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"ok": False, "error": "no such action"})
                    return
            except StreampipeError as exc:
                self._json(HTTPStatus.CONFLICT, {"ok": False, "error": str(exc)})
                return
            logger.info(f"dashboard: {message}")
            self._json(HTTPStatus.OK, {"ok": True, "message": message})

        def _stream(self) -> None:
            if not dash.streams.acquire(blocking=False):
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, "too many open dashboards\n")
                return
            try:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                version = -1
                while not dash.stopped.is_set():
                    version = dash.picture.wait_newer(version, TICK_S * 2)
                    if dash.stopped.is_set():
                        break
                    self.wfile.write(b"data: " + json.dumps(dash.picture.snapshot(), default=str).encode() + b"\n\n")
                    self.wfile.flush()
            except OSError:         # the page was closed
                pass
            finally:
                dash.streams.release()

    return Handler
