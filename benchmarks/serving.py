"""Serving: ``POST /predict`` of the ``serve`` stage, and the ``predictor`` stage, against baselines.

    python benchmarks/serving.py [--seconds 10] [--rate 1000] [--repeat 3] [--records 200000]

A model is trained first (the default stream through ``Normalizer``, ``Trainer`` with its
default SGDClassifier, one checkpoint), then:

1. **/predict.** The ``serve`` stage runs in a real pipeline (``streampipe up --detach``, a
   pipeline of that one stage, no token) and, beside it, a minimal baseline server: a
   ``http.server.ThreadingHTTPServer`` (HTTP/1.1, kept alive, ``TCP_NODELAY``) in a process of its own that
   ``joblib.load``\\ s the same checkpoint and answers each record with ``predict`` and
   ``predict_proba`` of it (``json`` in and out). Each gets, in turn and ``--repeat`` times, the
   same load from one client on one kept-alive connection (a raw socket: the request bytes built
   once, the answer read by its ``Content-Length``, so the client costs both sides the same):
   *paced*, single records at ``--rate`` requests/s for ``--seconds`` (an open loop: each latency
   is counted from the moment the request was due, so a server that falls behind pays for the
   queue it made), p50 / p99 latency and the rate achieved; then *flat out*, one request after
   the other for ``--seconds / 3``, requests/s. 300 requests warm each up first.
2. **predictor.** ``Predictor.process`` in process over ``--records`` records in batches of 1000
   as ``Columns`` (what it gets in a columnar pipeline), with probabilities and without, and as
   lists of records; against ``model.predict`` (and ``predict_proba``) on the same batches'
   feature arrays, the same version's model, in the same process, made back to back (each run
   three passes over the batches after a warm-up).

Figures are medians of the repeats; ratios are per-repeat ratios' medians. Prints a rich table
per part and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import PYTHON, THREAD_ENV, Pipeline, err, out, percentile, wait_until  # noqa: E402
from rich.table import Table  # noqa: E402

WARMUP = 300                 # requests before a timed run (connection, caches, the model's first calls)
BATCH = 1000                 # records per predictor batch: the runtime's default max_batch
WARMUP_BATCHES = 20
PASSES = 3                   # over the batches per timed predictor run: long enough to outlast a hiccup

BASELINE_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import joblib, numpy as np
model = joblib.load(sys.argv[1])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # kept alive, as the serve stage
    disable_nagle_algorithm = True         # TCP_NODELAY, as the serve stage: else each answer waits ~40 ms
    def do_POST(self):
        record = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        X = np.asarray([record["x"]], dtype=float)
        body = json.dumps({"prediction": model.predict(X).tolist()[0],
                           "probabilities": model.predict_proba(X)[0].tolist()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def build(records: int, folder: Path) -> tuple[list[dict[str, Any]], Path]:
    """The default stream, normalised; a trainer checkpoint (version 1) in ``folder/checkpoints``."""
    from streampipe.stages.builtins.generator import Generator
    from streampipe.stages.builtins.normalizer import Normalizer
    from streampipe.stages.builtins.trainer import Trainer
    from streampipe.testing import run_stage

    norm = Normalizer()
    rows = [r for r in itertools.islice(Generator(seed=7).generate(), records + 20_000) if r is not None]
    data = norm.process(rows)
    train, rest = data[:20_000], data[20_000:]
    run_stage(Trainer(checkpoint_seconds=0, checkpoint_every=10**9), [train[i:i + BATCH] for i in range(0, len(train), BATCH)],
              run_dir=folder)
    return rest, folder / "checkpoints"


# -- part 1: /predict -----------------------------------------------------------------------------
class RawClient:
    """One kept-alive connection; ``call()`` sends the prepared request and reads one answer."""

    def __init__(self, port: int, body: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.buf = b""

    def call(self) -> bytes:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            self.buf = head + b"\r\n\r\n" + rest
            self._more()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"answer {head[:40]!r}")
        self.buf = rest[length:]
        return rest[:length]

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def paced(port: int, body: bytes, rate: float, seconds: float) -> dict[str, float]:
    client = RawClient(port, body)
    try:
        for _ in range(WARMUP):
            client.call()
        n = int(rate * seconds)
        lat = []
        start = time.perf_counter() + 0.01
        for i in range(n):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            client.call()
            lat.append(time.perf_counter() - due)
        took = time.perf_counter() - start
    finally:
        client.close()
    return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3, "rate": n / took}


def flat_out(port: int, body: bytes, seconds: float) -> float:
    client = RawClient(port, body)
    try:
        for _ in range(WARMUP):
            client.call()
        n, start = 0, time.perf_counter()
        while (now := time.perf_counter()) - start < seconds:
            client.call()
            n += 1
        return n / (now - start)
    finally:
        client.close()


def bench_http(records: list[dict[str, Any]], folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from streampipe.stages.builtins import checkpoints

    body = json.dumps(records[0]).encode()
    version = checkpoints.latest_version(folder)
    config = {"pipeline": "serving-bench", "stages": {"api": {"type": "serve", "options": {
        "port": 0, "checkpoint_dir": str(folder)}}}}
    baseline = subprocess.Popen([PYTHON, "-c", BASELINE_SERVER, str(checkpoints.model_path(folder, version))],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, **THREAD_ENV})
    runs: dict[str, list[dict[str, float]]] = {"serve": [], "baseline": []}
    try:
        assert baseline.stdout is not None
        base_port = int(baseline.stdout.readline())
        with Pipeline(config, tag="serving") as p:
            port_file = p.run_dir / "state" / "api.0.http-port"
            port = int(wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 60, "the serve port"))
            for k in range(args.repeat):
                for name, where in (("serve", port), ("baseline", base_port))[:: 1 if k % 2 == 0 else -1]:
                    err.print(f"/predict {name}: run {k + 1}/{args.repeat}, {args.rate:g} req/s for {args.seconds:g} s")
                    figures = paced(where, body, args.rate, args.seconds)
                    figures["max_rate"] = flat_out(where, body, args.seconds / 3)
                    runs[name].append(figures)
    finally:
        baseline.terminate()
        baseline.wait(10)
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    ratio = statistics.median(s["p99_ms"] / b["p99_ms"] for s, b in zip(runs["serve"], runs["baseline"], strict=True))
    return {"runs": runs, "median": med, "p99_ratio": ratio,
            "max_rate_ratio": statistics.median(s["max_rate"] / b["max_rate"]
                                                for s, b in zip(runs["serve"], runs["baseline"], strict=True))}


# -- part 2: the predictor stage ----------------------------------------------------------------
def bench_predictor(records: list[dict[str, Any]], folder: Path, repeat: int) -> dict[str, Any]:
    import numpy as np

    from streampipe.stages.api import StageContext
    from streampipe.stages.builtins import checkpoints
    from streampipe.stages.builtins.predictor import Predictor
    from streampipe.stages.columns import Columns

    lists = [records[i:i + BATCH] for i in range(0, len(records) - BATCH + 1, BATCH)]
    columns = [Columns.from_records(b) for b in lists]
    arrays = [np.asarray(c["x"]) for c in columns]
    n = sum(len(b) for b in lists)
    model = checkpoints.load(folder, checkpoints.latest_version(folder)).model

    def timed(step: Callable[[Any], object], items: list[Any]) -> float:
        """records/s of ``step`` over ``items``, PASSES times, after a warm-up."""
        for item in items[:WARMUP_BATCHES]:
            step(item)
        t = time.perf_counter()
        for _ in range(PASSES):
            for item in items:
                step(item)
        return PASSES * n / (time.perf_counter() - t)

    def stage(batches: list[Any], probabilities: str | None) -> float:
        pred = Predictor(probabilities=probabilities)
        pred.context = StageContext(run_dir=folder.parent)
        pred.setup()
        return timed(pred.process, batches)

    def bare(proba: bool) -> float:
        def step(X: Any) -> None:
            model.predict(X)
            if proba:
                model.predict_proba(X)
        return timed(step, arrays)

    cases = {  # name: (stage run, baseline run)
        "columns, with probabilities": (lambda: stage(columns, "probabilities"), lambda: bare(True)),
        "columns, prediction only": (lambda: stage(columns, None), lambda: bare(False)),
        "records, with probabilities": (lambda: stage(lists, "probabilities"), lambda: bare(True)),
    }
    results: dict[str, Any] = {}
    for name, (run, base) in cases.items():
        pairs = []
        for k in range(repeat):
            err.print(f"predictor {name}: run {k + 1}/{repeat}")
            if k % 2:                     # alternate which goes first
                b = base()
                pairs.append((run(), b))
            else:
                pairs.append((run(), base()))
        results[name] = {"stage": statistics.median(p[0] for p in pairs), "baseline": statistics.median(p[1] for p in pairs),
                         "ratio": statistics.median(p[0] / p[1] for p in pairs)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="paced load per run (flat out: a third of it)")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s of the paced load")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--records", type=int, default=200_000, help="records through the predictor per run")
    ap.add_argument("--only", choices=("http", "predictor"), help="run one part only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streampipe-serving-"))
    err.print(f"training a model in {work}")
    try:
        records, folder = build(args.records, work)
        http = bench_http(records, folder, args) if args.only != "predictor" else None
        stage = bench_predictor(records, folder, args.repeat) if args.only != "http" else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if http is not None:
        t1 = Table(title=f"POST /predict, one record a request, one kept-alive client; medians of {args.repeat}")
        for col in ("server", f"p50 ms at {args.rate:g}/s", f"p99 ms at {args.rate:g}/s", "achieved req/s",
                    "flat out req/s"):
            t1.add_column(col, justify="left" if col == "server" else "right")
        for name, label in (("serve", "serve stage"), ("baseline", "http.server + same model")):
            m = http["median"][name]
            t1.add_row(label, f"{m['p50_ms']:.3f}", f"{m['p99_ms']:.3f}", f"{m['rate']:,.0f}", f"{m['max_rate']:,.0f}")
        t1.add_row("ratio (serve / baseline)", "", f"{http['p99_ratio']:.2f}", "", f"{http['max_rate_ratio']:.2f}")
        out.print(t1)
    if stage is not None:
        t2 = Table(title=f"predictor stage vs model.predict in process, batches of {BATCH}; medians of {args.repeat}")
        for col in ("case", "predictor rec/s", "model.predict rec/s", "ratio"):
            t2.add_column(col, justify="left" if col == "case" else "right")
        for name, r in stage.items():
            t2.add_row(name, f"{r['stage']:,.0f}", f"{r['baseline']:,.0f}", f"{r['ratio']:.2f}")
        out.print(t2)

    def rounded(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return round(value, 4) if isinstance(value, float) else value

    print(json.dumps({"seconds": args.seconds, "rate": args.rate, "repeat": args.repeat, "records": args.records,
                      "predict_http": rounded(http), "predictor": rounded(stage)}))


if __name__ == "__main__":
    main()
