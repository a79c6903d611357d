"""serve: the trainer's newest valid checkpoint answers over HTTP, swapped live.

A stage with no inputs (a source that never emits), so the supervisor starts, watches and
restarts it and ``status`` shows it like any other. It follows the checkpoint folder as the
predictor does (:mod:`streampipe.stages.builtins.serving`: at most every ``poll_seconds``, a new version
loaded, checked and probed before it serves, a bad one skipped with the reason logged) and
answers, on ``host:port`` (default 127.0.0.1), from one thread (:class:`~stages.httpserver.JsonServer`):

    POST /predict   a JSON object (one record) -> {"prediction": 1, "probabilities": [0.1, 0.9],
                    "model_version": 7}; a JSON array of records -> an array of those, every one
                    scored by the same version. A record holds the feature vector under the
                    checkpoint's ``features`` field (``x`` by default), other fields are ignored
    GET  /model     the version that serves: its metadata (records trained on, time, estimator,
                    classes, features), when it was loaded, and its last hold-out row from the
                    evaluator's ``metrics.jsonl`` (``holdout``: metrics, records evaluated), if any
    GET  /healthz   200 while the server runs
    GET  /readyz    200 once a version serves, 503 before

Answers: 400 with the reason for a body that is not JSON, a record that is not an object or
whose vector is missing, not numeric, not finite or of the wrong width (nothing of that body
is scored); 401 without the bearer token (when one is set; the probes need none); 404 / 405
another path or method; 411 no ``Content-Length``; 413 a body over ``max_body_bytes`` or more
than ``max_records`` records; 503 before the first checkpoint (``Retry-After``). A request
never takes the stage down: whatever a handler raises is a 500 with its type.

A swap is one assignment between two requests: a request in flight finishes with the version it
began with, the next one gets the new version, none fails; a checkpoint committed by the trainer
serves within ``poll_seconds`` plus its load time. Connections are kept alive.

The host is 127.0.0.1 unless configured; ``validate`` refuses another without a ``token`` (the
token travels in clear: put TLS in front when the port is reachable from other machines).

Options:
    port              TCP port (0: any free one, written to ``state/<stage>.<r>.http-port``)
    host              address to bind (default 127.0.0.1)
    token, token_file a bearer token clients must send (token_file relative to the config)
    checkpoint_dir    the trainer's checkpoint folder, relative to the run directory
    metrics           the evaluator's metrics file, relative to the run directory
    features          the field holding the vector (default: the checkpoint's, else ``x``)
    poll_seconds      least time between two looks at the checkpoint folder
    max_body_bytes    the largest body taken (default 1 MiB)
    max_records       records in one request, at most (default 10,000)

>>> Serve(port=0).snapshot()
{}
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streampipe.stages.api import Record, Source
from streampipe.stages.builtins.httpserver import (
    Answer,
    JsonServer,
    Request,
    check_listen_options,
    listen,
    load_token,
    open_port_problems,
)
from streampipe.stages.builtins.learning import Vectoriser
from streampipe.stages.builtins.serving import ModelFollower, Served, holdout_scores, score
from streampipe.stages.state import atomic_write, json_default

DEFAULT_POLL_S = 0.25        # a new checkpoint serves within this (plus its load) of its commit
MAX_REASONS = 5              # bad records named in a 400 (the first ones)
# The runtime asks an idle source again after 2 ms: 500 wake-ups a second, ~5 % of a core and as
# many GIL hand-offs with the server thread for a stage that never emits. Sleeping here instead
# costs at most this much delay in noticing a stop or a control message (heartbeats: every 0.25 s).
IDLE_S = 0.02


class Serve(Source):
    def __init__(self, port: int = 8000, host: str = "127.0.0.1", token: str | None = None,
                 token_file: str | None = None, checkpoint_dir: str = "checkpoints", metrics: str = "metrics.jsonl",
                 features: str | None = None, poll_seconds: float = DEFAULT_POLL_S, max_body_bytes: int = 1 << 20,
                 max_records: int = 10_000) -> None:
        super().__init__()
        check_listen_options(port, token, token_file)
        if poll_seconds < 0 or int(max_body_bytes) < 1 or int(max_records) < 1:
            raise ValueError("poll_seconds must be >= 0, max_body_bytes and max_records > 0")
        self.port, self.host, self.token, self.token_file = int(port), host, token, token_file
        self.checkpoint_dir, self.metrics_file, self.features_option = checkpoint_dir, metrics, features
        self.poll_seconds, self.max_body, self.max_records = float(poll_seconds), int(max_body_bytes), int(max_records)
        self.follower: ModelFollower | None = None
        self.server: JsonServer | None = None
        self.predicted = self.refused = 0
        self._vectorise = Vectoriser(features or "x", label=None)    # the server thread's alone
        self._serving = 0

    @staticmethod
    def option_problems(options: dict[str, Any]) -> list[tuple[str | None, str]]:
        """What ``streampipe validate`` refuses beyond the signature: a port open beyond this
        machine without a token, and two sources of the token."""
        return open_port_problems(options, "serving")

    # -- the runtime's side -----------------------------------------------------------------
    def setup(self) -> None:
        ctx = self.context
        self.metrics_path = ctx.resolve_output(self.metrics_file)
        self.follower = ModelFollower(ctx.resolve_output(self.checkpoint_dir), self.poll_seconds)
        self.follower.poll(force=True)
        token = load_token(ctx, self.token, self.token_file)
        listener = listen(self.host, self.port, "serve stage", reuse_port=ctx.replicas > 1)
        self.server = JsonServer(listener, self.handle, token=token, max_body=self.max_body, name="serve").start()
        state_dir = Path(ctx.run_dir) / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(state_dir / f"{ctx.name}.{ctx.replica}.http-port", f"{self.server.address[1]}\n".encode())

    def generate(self) -> Iterator[Record | None]:
        """Never emits: looks for a new checkpoint (at most every ``poll_seconds``) and idles."""
        while True:
            if self.follower is not None:
                self.follower.poll()
            time.sleep(IDLE_S)
            yield None

    def teardown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def stats(self) -> dict[str, Any]:
        follower, server = self.follower, self.server
        return {"model_version": follower.version if follower else 0, "predicted": self.predicted,
                "refused": self.refused, "requests": server.requests if server else 0,
                "port": server.address[1] if server else self.port}

    # -- the server thread ------------------------------------------------------------------
    def handle(self, request: Request) -> Answer:
        head = request.head
        served = self.follower.current if self.follower is not None else None
        if head.path == "/healthz":
            return Answer(200, {"ok": True}) if head.method == "GET" else Answer(405, {"error": "only GET"})
        if head.path == "/readyz":
            if served is None:
                return Answer(503, {"ready": False, "reason": "no valid checkpoint yet"})
            return Answer(200, {"ready": True, "model_version": served.version})
        if head.path == "/model":
            if head.method != "GET":
                return Answer(405, {"error": "only GET"})
            if served is None:
                return Answer(503, {"error": "no valid checkpoint yet"})
            return Answer(200, self.describe(served))
        if head.path != "/predict":
            return Answer(404, {"error": "POST /predict, GET /model, /healthz, /readyz"})
        if head.method != "POST":
            return Answer(405, {"error": "only POST"})
        if served is None:
            return Answer(503, {"error": "no valid checkpoint yet: the trainer has not written one"})
        return self.predict(served, request.body)

    def predict(self, served: Served, body: bytes) -> Answer:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self._refuse(f"not JSON: {exc}")
        single = isinstance(value, dict)
        records = [value] if single else value
        if not isinstance(records, list):
            return self._refuse(f"a JSON {type(value).__name__}, not an object or an array of objects")
        if len(records) > self.max_records:
            return Answer(413, {"error": f"{len(records)} records in one body: at most {self.max_records}"})
        if not records:
            return Answer(200, [], raw=b"[]")
        for n, r in enumerate(records, 1):
            if not isinstance(r, dict):
                return self._refuse(f"record {n} is a JSON {type(r).__name__}, not an object")
        if served.version != self._serving:
            self._serving = served.version
            self._vectorise.features = self.features_option or served.meta.get("features") or "x"
            self._vectorise.n_features = served.n_features
        reasons: list[str] = []
        index = {id(r): n for n, r in enumerate(records, 1)}
        arrays = self._vectorise(records, lambda r, why: reasons.append(f"record {index[id(r)]}: {why}"))
        if reasons:
            more = f" (and {len(reasons) - MAX_REASONS} more)" if len(reasons) > MAX_REASONS else ""
            return self._refuse("; ".join(reasons[:MAX_REASONS]) + more)
        out = score(served, arrays.X)
        if self.follower is not None:
            self.follower.remember(arrays.X)
        self.predicted += len(records)
        preds = out.prediction.tolist()
        if out.probabilities is not None:
            results = [{"prediction": p, "probabilities": q, "model_version": out.version}
                       for p, q in zip(preds, out.probabilities.tolist(), strict=True)]
        else:
            results = [{"prediction": p, "model_version": out.version} for p in preds]
        answer = results[0] if single else results
        return Answer(200, answer, raw=orjson.dumps(answer, default=json_default, option=orjson.OPT_APPEND_NEWLINE))

    def _refuse(self, why: str) -> Answer:
        self.refused += 1
        return Answer(400, {"error": why})

    def describe(self, served: Served) -> dict[str, Any]:
        meta = served.meta
        keys = ("records_seen", "time", "estimator", "task", "features", "n_features", "metric_name", "metric")
        info: dict[str, Any] = {"model_version": served.version, "classes": served.classes,
                                "loaded_at": served.loaded_at, **{k: meta.get(k) for k in keys}}
        info["skipped_versions"] = sorted(self.follower.bad) if self.follower is not None else []
        info["holdout"] = holdout_scores(self.metrics_path, served.version)
        return _plain(info)


def _plain(value: Any) -> Any:
    """numpy scalars in metadata as Python values (for json.dumps)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
