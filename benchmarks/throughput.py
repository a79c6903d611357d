"""Throughput and latency of generator -> normalizer -> consumer: streampipe vs raw pyzmq, same run.

    python benchmarks/throughput.py [--count 200000] [--repeat 3] [--latency-seconds 7]
    python benchmarks/throughput.py --transport tcp [--curve] --no-latency    # ipc vs tcp vs tcp+CURVE
    python benchmarks/throughput.py --peers [--count N] [--repeat 3]          # vs bytewax, multiprocessing (pip install -e '.[bench]')

What runs (each variant ``--repeat`` times, interleaved, so every repeat compares like with like):

streampipe (the real CLI: ``streampipe up --detach`` on a temp services.yaml, then ``down``)
    ``sp-alo`` / ``sp-amo``   generator (rate 0, ``count`` records) -> normalizer -> consumer,
                              one replica each, ``delivery: at-least-once`` / ``at-most-once``;
                              the built-ins are columnar (their default): batches cross as numpy
                              columns.
    ``sp-alo-records``        ``sp-alo`` with ``columnar: false`` on every stage: lists of records
                              in msgpack, as before columnar batches.
    ``sp-alo-b100``           ``sp-alo`` with ``max_batch: 100`` (``--small-batch``), the default
                              before 0.3: each batch's fixed costs spread over 10 x fewer records.
raw (three ``python`` processes wired by hand: PUSH/PULL over ipc, 2 frames per message = a
small msgpack header + a msgpack list of 1000 records, HWM 100 messages, no streampipe runtime)
    ``raw``              the fixed stage work of ``peer_work.py`` (never streampipe's stage code,
                         so this baseline does not move when streampipe's stages do): generator =
                         ``peer_work.batches`` (the generator's records, same values), middle =
                         ``peer_work.BatchNormalizer`` per batch (the normalizer's numpy work),
                         sink = ``peer_work.JsonLines`` (one ``orjson.dumps`` line per record, one
                         ``write`` + ``flush`` per batch)
    ``raw-transport``    middle = decode, touch (``r["hop"] = 1``), re-encode: transport only
    ``raw-stagework``    middle = streampipe's ``Normalizer(columnar=False).process``, sink = the
                         built-in ``Consumer.process`` (dedup, label counts, 1 s checkpoints): all
                         of streampipe's own stage work on records, none of the runtime's.

``--peers`` adds (and skips the latency runs):

    ``sp-alo-userstage``  ``sp-alo`` with a per-record user stage after the normalizer
                          (``type: bench_stages:Seen``, a plain class: ``[{**r, "seen": 1} for r
                          in batch]``; the columnar batch becomes records for it)
    ``sp-alo-r2``         ``sp-alo`` with ``replicas: 2`` on every stage (the consumer's replicas
                          write ``records.jsonl`` and ``records.1.jsonl``: both are counted)
    ``bytewax-1w``        bytewax 0.21 (the ``bench`` extra), ``python -m bytewax.run`` of
                          ``bytewax_flow.py`` with ``peer_work.py``'s fixed stage work: ``input``
                          (the same generator records) -> ``filter_map`` (the normalizer's work,
                          per record) -> ``output`` (the raw sink's JSON lines), one process of
                          one worker
    ``bytewax-2p``        the same flow in 2 processes (``-i``/``-a``), one worker each, each
                          generating half the ids and writing its own file: no exchange
    ``bytewax-1w-batch``  ``bytewax-1w`` with ``flat_map_batch`` running ``peer_work.BatchNormalizer``
    ``bytewax-2p-batch``  on each batch (numpy, exactly the raw chain's stage work): bytewax's
                          fastest form of the job; 1 and 2 processes
    ``bytewax-1w-seen``   ``bytewax-1w`` and ``bytewax-1w-batch`` with ``map`` (``{**r, "seen": 1}``,
    ``bytewax-1w-batch-seen``  ``peer_work.seen``) after the normalizer: ``sp-alo-userstage``'s job
    ``mpqueue``           three ``multiprocessing.Process`` linked by two ``multiprocessing.Queue``
                          carrying lists of 1000 records: the raw chain's generator, middle and sink

(``peers.py`` and ``bytewax_flow.py`` say exactly what they run.) Without bytewax installed,
``--peers`` says so and runs the rest. It prints the targets beside their figures:
``sp-alo / bytewax best`` (>= 1.5; best = the highest median of ``bytewax-1w``, ``-2p``,
``-1w-batch``, ``-2p-batch``), ``sp-alo-userstage / bytewax 1 worker with the same map`` (>= 1.0;
the faster median of ``bytewax-1w-seen`` and ``bytewax-1w-batch-seen``), ``sp-alo-records /
bytewax 1 worker`` (>= 1.0; the faster of ``bytewax-1w`` and ``bytewax-1w-batch``), and
``sp-alo-r2 / sp-alo`` CPU per record (<= 1.25) and records/s (>= 1.0).

``--transport tcp`` adds ``sp-tcp`` (``transport: tcp`` on 127.0.0.1) and ``raw-tcp`` (the raw
chain over tcp), and ``--curve`` adds ``sp-tcp-curve`` (``security: curve``: every data and ack
socket encrypted and authenticated), all in the same run as the ipc variants.

Throughput is ``count / (mtime of the sink's output file after the last write - t of record 0)``:
from the moment the generator made the first record to the moment the last one was written, the
same clock for every variant (start-up is outside it: the generator starts after its downstream is
READY). Completion is seen by counting the output file's lines (a lost record shows as a shortfall).
With several output files (``sp-alo-r2``, ``bytewax-2p``): the earliest first ``t`` to the last write
of any of them.

Every throughput run also gives:

- CPU-seconds per million records: user + system CPU of every process of that system, start-up
  included (imports, fork server, READY: a fixed cost that weighs less as ``--count`` grows),
  divided by ``--count``. streampipe: the supervisor and every process under it (fork server,
  stage replicas), read with psutil just before ``down``; raw, bytewax, mpqueue: their processes
  are the benchmark's children, so ``getrusage(RUSAGE_CHILDREN)`` before and after the run. The
  benchmark's own process (polling, the CLI calls ``up``/``down``) is not counted.
- an exactly-once check of the output file(s): every id ``0 .. count-1`` exactly once; the table
  flags a variant whose worst run lost, duplicated or wrote an unexpected id, with the counts.

Latency: the generator at ``--latency-rate`` records/s for ``--latency-seconds``; the sink
(``bench_stages:LatencySink`` for streampipe, the same computation in the raw sink) records
``time.time() - record["t"]`` for every record; the first ``--warmup`` records are dropped.
Batches flush at 100 records or after ``linger_ms`` (streampipe's default, read from its config
model; the raw generator is given the same), so the latency includes that linger.

Each figure is the median over repeats; each ratio is the median of the per-repeat ratios (both
sides measured back to back). The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

THIS = Path(__file__).resolve()
IDLE_WAIT_S = 0.002      # a paced source that is ahead waits this long: streampipe's IDLE_WAIT_MS
PARK_S = 300.0           # raw gen / middle stay alive after end-of-stream until stopped (see below)
SEED = 7


# =============================================================================================
# The raw chain's three roles (run as `python throughput.py --role ...`; only light imports)
# =============================================================================================

def _ready(endpoint: str, role: str) -> None:
    import zmq

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.connect(endpoint)
    s.send_string(role)
    s.close(linger=2000)


def _park() -> None:
    """Stay alive after end-of-stream: closing a PUSH on ipc may drop its tail (DESIGN.md), so the
    raw gen and middle keep their sockets open until the benchmark has seen the sink finish."""
    time.sleep(PARK_S)
    os._exit(0)


def role_gen(a: argparse.Namespace) -> None:
    import msgpack
    import peer_work
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, a.hwm)
    s.connect(a.out)
    pack = msgpack.Packer(use_bin_type=True).pack
    seq, batch, since, linger = 0, [], 0.0, a.linger_ms / 1000.0

    def flush() -> None:
        nonlocal seq, batch
        seq += 1
        s.send_multipart([pack({"k": "d", "src": "gen", "seq": seq, "n": len(batch), "t": time.time()}), pack(batch)])
        batch = []

    start, sent = time.monotonic(), 0
    for record in (r for part in peer_work.batches(a.count) for r in part):
        if a.rate > 0:                           # paced: wait for the record's slot, stamp it then
            while sent >= (time.monotonic() - start) * a.rate:
                now = time.monotonic()
                if batch and now - since >= linger:
                    flush()
                else:
                    time.sleep(min(IDLE_WAIT_S, since + linger - now) if batch else IDLE_WAIT_S)
            record["t"] = time.time()
        sent += 1
        if not batch:
            since = time.monotonic()
        batch.append(record)
        if len(batch) >= a.max_batch:
            flush()
    if batch:
        flush()
    s.send_multipart([pack({"k": "eos", "src": "gen", "seq": seq})])
    _park()


def role_mid(a: argparse.Namespace) -> None:
    import msgpack
    import peer_work
    import zmq

    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, a.hwm)
    inp.bind(a.inp)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, a.hwm)
    out.connect(a.out)
    pack = msgpack.Packer(use_bin_type=True).pack
    norm: Any = None
    if a.kind == "normalize":
        norm = peer_work.BatchNormalizer()
    elif a.kind == "sp-normalize":               # raw-stagework: streampipe's own normalizer
        from streampipe.stages.builtins.normalizer import Normalizer

        sp_norm = Normalizer(columnar=False)

        def norm(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out = sp_norm.process_records(records)
            sp_norm.take_rejected()
            return out
    _ready(a.ready, "mid")
    seq = 0
    while inp.poll(int(PARK_S * 1000)):
        frames = inp.recv_multipart()
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        if header.get("k") == "eos":
            out.send_multipart([frames[0]])
            _park()
        records = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
        if norm is not None:
            records = norm(records)
        else:
            for r in records:
                r["hop"] = 1
        seq += 1
        out.send_multipart([pack({"k": "d", "src": "mid", "seq": seq, "n": len(records), "t": time.time()}), pack(records)])


def role_sink(a: argparse.Namespace) -> None:
    import msgpack
    import peer_work
    import zmq

    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, a.hwm)
    inp.bind(a.inp)
    out_path = Path(a.out)
    samples: list[list[float]] = []
    consumer = None
    f: Any = None
    if a.kind == "consumer":
        from streampipe import StageContext
        from streampipe.stages.builtins.consumer import Consumer

        consumer = Consumer(output=str(out_path))
        consumer.context = StageContext(name="consumer", run_dir=out_path.parent)
        consumer.setup()
    elif a.kind == "jsonl":
        f = peer_work.JsonLines(out_path)
    _ready(a.ready, "sink")
    while inp.poll(int(PARK_S * 1000)):
        frames = inp.recv_multipart()
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        if header.get("k") == "eos":
            break
        records = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
        if f is not None:
            f.write(records)
        elif consumer is not None:
            consumer.process(records)
        else:
            now = time.time()
            for r in records:
                samples.append([r.get("id", -1), (now - r["t"]) * 1000.0])
    if f is not None:
        f.close()
    if consumer is not None:
        consumer.teardown()
    if a.kind == "latency":
        out_path.write_text(json.dumps({"samples": samples}))
    os._exit(0)


def streampipe_linger_ms() -> float:
    """streampipe's default ``linger_ms``: the raw generator batches by the same rule."""
    from streampipe.launcher.config import StageSettings

    return float(StageSettings.model_fields["linger_ms"].default)


def streampipe_max_batch() -> int:
    """streampipe's default ``max_batch``: the raw chain and the peers batch by the same number."""
    from streampipe.launcher.config import StageSettings

    return int(StageSettings.model_fields["max_batch"].default)


def role_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["gen", "mid", "sink"], required=True)
    p.add_argument("--inp")
    p.add_argument("--out")
    p.add_argument("--ready")
    p.add_argument("--kind", default="")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--max-batch", type=int, default=100)
    p.add_argument("--linger-ms", type=float, default=5.0)
    p.add_argument("--hwm", type=int, default=100)
    a = p.parse_args(argv)
    {"gen": role_gen, "mid": role_mid, "sink": role_sink}[a.role](a)


# =============================================================================================
# The benchmark
# =============================================================================================

RUN_TIMEOUT_S = 300.0      # one variant's whole stream (200 k records take ~2-10 s here)
STALL_S = 5.0              # source completed and the sink file has not grown this long: records lost
READY_TIMEOUT_S = 60.0


def first_t(path: Path) -> float:
    import orjson

    with open(path, "rb") as f:
        return float(orjson.loads(f.readline())["t"])


def latency_figures(path: Path, warmup: int) -> dict[str, Any]:
    from _common import percentile

    samples = json.loads(path.read_text())["samples"]
    ms = [s[1] for s in samples if s[0] >= warmup]
    return {"n": len(samples), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else float("nan")}


def run_raw(mid_kind: str, sink_kind: str, count: int, rate: float, warmup: int = 0, tcp: bool = False) -> dict[str, Any]:
    """One run of the raw three-process chain; {"rps", "records", "cpu_s", "exactly_once", ...} or
    latency figures. ``cpu_s``: ``getrusage(RUSAGE_CHILDREN)`` around the run (its three
    processes are children of the benchmark, all reaped before it returns)."""
    from _common import children_cpu_s

    before = children_cpu_s()
    result = _run_raw(mid_kind, sink_kind, count, rate, warmup, tcp)
    if "rps" in result:
        result["cpu_s"] = children_cpu_s() - before
    return result


def _run_raw(mid_kind: str, sink_kind: str, count: int, rate: float, warmup: int, tcp: bool) -> dict[str, Any]:
    import shutil
    import subprocess
    import tempfile

    import zmq
    from _common import PYTHON, THREAD_ENV, LineCounter, exactly_once, pid_alive, stop_pids, wait_until

    tmp = Path(tempfile.mkdtemp(prefix="streampipe-raw-"))
    ep = {k: f"ipc://{tmp}/{k}" for k in ("ready", "mid", "sink")}
    if tcp:
        from streampipe.launcher.wiring import free_port

        ep.update({k: f"tcp://127.0.0.1:{free_port('127.0.0.1')}" for k in ("mid", "sink")})
    out = tmp / ("latency.json" if sink_kind == "latency" else "records.jsonl")
    env = {**os.environ, **THREAD_ENV}
    procs: list[subprocess.Popen[bytes]] = []
    ctx = zmq.Context()
    ready = ctx.socket(zmq.PULL)
    ready.bind(ep["ready"])

    def start(role: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(tmp / f"{role}.log", "wb")
        proc = subprocess.Popen([PYTHON, str(THIS), "--role", role, "--ready", ep["ready"], *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        return proc

    try:
        sink = start("sink", "--inp", ep["sink"], "--out", str(out), "--kind", sink_kind)
        start("mid", "--inp", ep["mid"], "--out", ep["sink"], "--kind", mid_kind)
        for _ in range(2):
            if not ready.poll(int(READY_TIMEOUT_S * 1000)):
                raise TimeoutError(f"raw chain not ready; logs in {tmp}")
            ready.recv()
        start("gen", "--out", ep["mid"], "--count", str(count), "--rate", str(rate), "--linger-ms", str(streampipe_linger_ms()),
              "--max-batch", str(streampipe_max_batch()))
        if sink_kind == "latency":
            wait_until(lambda: sink.poll() is not None, RUN_TIMEOUT_S, "the raw latency sink")
            return latency_figures(out, warmup)
        counter = LineCounter(out)
        wait_until(lambda: counter.poll() >= count or sink.poll() is not None, RUN_TIMEOUT_S, "the raw sink")
        wait_until(lambda: sink.poll() is not None, 30.0, "the raw sink to exit")
        lines = counter.poll()
        elapsed = os.stat(out).st_mtime - first_t(out)
        return {"rps": lines / elapsed, "records": lines, "elapsed_s": elapsed, "exactly_once": exactly_once([out], count)}
    finally:
        left = [p.pid for p in procs if p.poll() is None]
        stop_pids(left, grace=2.0)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        assert not any(pid_alive(p.pid) for p in procs), "a raw process outlived the benchmark"
        ready.close(linger=0)
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)


def pipeline_config(delivery: str, count: int, rate: float, sink: str, network: dict[str, Any] | None = None,
                    columnar: bool = True, max_batch: int | None = None, user_stage: str | None = None,
                    replicas: int = 1) -> dict[str, Any]:
    """generator -> normalizer [-> ``user_stage``, a ``type`` such as ``bench_stages:touch``] -> sink,
    every stage with ``replicas`` (when > 1)."""
    sink_stage: dict[str, Any] = ({"type": "consumer", "options": {"output": "output/records.jsonl", "columnar": columnar}}
                                  if sink == "consumer" else {"type": "bench_stages:LatencySink", "options": {"output": "latency.json"}})
    stages: dict[str, dict[str, Any]] = {
        "generator": {"type": "generator", "options": {"rate": rate, "count": count, "seed": SEED, "columnar": columnar}},
        "normalizer": {"type": "normalizer", "inputs": ["generator"], "options": {"columnar": columnar}},
    }
    if user_stage:
        stages["user"] = {"type": user_stage, "inputs": ["normalizer"]}
    stages["consumer"] = {**sink_stage, "inputs": ["user" if user_stage else "normalizer"]}
    if replicas > 1:
        for stage in stages.values():
            stage["replicas"] = replicas
    return {
        "pipeline": "bench-throughput",
        "delivery": delivery,
        **({"defaults": {"max_batch": max_batch}} if max_batch else {}),
        **(network or {}),
        "stages": stages,
    }


def run_streampipe(delivery: str, sink: str, count: int, rate: float, warmup: int = 0,
                   network: dict[str, Any] | None = None, columnar: bool = True, max_batch: int | None = None,
                   user_stage: str | None = None, replicas: int = 1) -> dict[str, Any]:
    """One run through the real CLI; {"rps", "records", "cpu_s", "exactly_once", ...} or latency figures.

    ``cpu_s``: user + system CPU of the supervisor and every process under it (fork server, stage
    replicas), start-up included, read just before ``down``. (No baseline at READY: ``up --detach``
    returns after the generator has started, and a 20 k-record stream is over by then.)"""
    from _common import LineCounter, Pipeline, exactly_once, output_span, wait_until

    pipe = Pipeline(pipeline_config(delivery, count, rate, sink, network, columnar, max_batch, user_stage, replicas),
                    tag=f"tput-{delivery}")
    # a consumer with replicas writes records.jsonl (replica 0) and records.<r>.jsonl
    outs = [pipe.run_dir / "output" / ("records.jsonl" if r == 0 else f"records.{r}.jsonl") for r in range(replicas)]
    try:
        with pipe:
            if sink == "latency":
                wait_until(lambda: pipe.events.find(event="completed", stage="generator"), RUN_TIMEOUT_S,
                           "the generator to complete")
            else:
                counters = [LineCounter(out) for out in outs]
                state = {"n": 0, "since": time.monotonic()}

                def done() -> bool:
                    n = sum(c.poll() for c in counters)
                    if n != state["n"]:
                        state["n"], state["since"] = n, time.monotonic()
                    completed = len(pipe.events.find(event="completed", stage="generator")) >= replicas
                    return n >= count or (time.monotonic() - state["since"] > STALL_S and completed)

                wait_until(done, RUN_TIMEOUT_S, f"{count} records in {outs}")
                cpu = pipe.cpu_s()
                lines = sum(c.poll() for c in counters)
                elapsed = output_span(outs)
                result = {"rps": lines / elapsed, "records": lines, "elapsed_s": elapsed, "cpu_s": cpu}
        if sink == "latency":
            return latency_figures(pipe.run_dir / "latency.json", warmup)
        result["exactly_once"] = exactly_once(outs, count)   # after `down`: nothing more can be written
        return result
    finally:
        pipe.cleanup()


def main() -> None:
    from _common import err, median, out, rnd
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200_000, help="records per throughput run")
    p.add_argument("--repeat", type=int, default=3, help="runs of every variant; medians are reported")
    p.add_argument("--latency-rate", type=float, default=1000.0, help="records/s for the latency runs")
    p.add_argument("--latency-seconds", type=float, default=7.0, help="length of one latency run")
    p.add_argument("--warmup", type=int, default=500, help="records dropped at the start of a latency run")
    p.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    p.add_argument("--transport", choices=["ipc", "tcp"], default="ipc", help="tcp: also run streampipe and raw over tcp")
    p.add_argument("--curve", action="store_true", help="with --transport tcp: also streampipe with security: curve")
    p.add_argument("--small-batch", action="store_true", help="also sp-alo with max_batch: 100 (sp-alo-b100)")
    p.add_argument("--peers", action="store_true", help="also a user stage, replicas: 2, bytewax and multiprocessing.Queue "
                   "(implies --no-latency; bytewax: pip install -e '.[bench]')")
    a = p.parse_args()
    if a.peers:
        a.no_latency = True

    lat_count = int(a.latency_rate * a.latency_seconds)
    tput_variants = {
        "sp-alo": lambda: run_streampipe("at-least-once", "consumer", a.count, 0),
        "sp-amo": lambda: run_streampipe("at-most-once", "consumer", a.count, 0),
        "sp-alo-records": lambda: run_streampipe("at-least-once", "consumer", a.count, 0, columnar=False),
        "raw": lambda: run_raw("normalize", "jsonl", a.count, 0),
        "raw-transport": lambda: run_raw("transport", "jsonl", a.count, 0),
        "raw-stagework": lambda: run_raw("sp-normalize", "consumer", a.count, 0),
    }
    if a.small_batch:
        tput_variants["sp-alo-b100"] = lambda: run_streampipe("at-least-once", "consumer", a.count, 0, max_batch=100)
    if a.transport == "tcp":
        tcp = {"transport": "tcp", "bind_host": "127.0.0.1"}
        tput_variants["sp-tcp"] = lambda: run_streampipe("at-least-once", "consumer", a.count, 0, network=tcp)
        tput_variants["raw-tcp"] = lambda: run_raw("normalize", "jsonl", a.count, 0, tcp=True)
        if a.curve:
            import tempfile

            from streampipe.stages.network import generate_keys

            keys = Path(tempfile.mkdtemp(prefix="streampipe-keys-")) / "keys"
            generate_keys(keys)
            curve = {**tcp, "security": "curve", "keys": str(keys)}
            tput_variants["sp-tcp-curve"] = lambda: run_streampipe("at-least-once", "consumer", a.count, 0, network=curve)
    if a.peers:
        from peers import bytewax_missing, run_bytewax, run_mpqueue

        tput_variants["sp-alo-userstage"] = lambda: run_streampipe("at-least-once", "consumer", a.count, 0, user_stage="bench_stages:Seen")
        tput_variants["sp-alo-r2"] = lambda: run_streampipe("at-least-once", "consumer", a.count, 0, replicas=2)
        missing = bytewax_missing()
        if missing:
            err.print(f"[yellow]note:[/] {missing}", highlight=False)
        else:
            tput_variants["bytewax-1w"] = lambda: run_bytewax(a.count, processes=1)
            tput_variants["bytewax-2p"] = lambda: run_bytewax(a.count, processes=2)
            tput_variants["bytewax-1w-batch"] = lambda: run_bytewax(a.count, processes=1, batch=True)
            tput_variants["bytewax-2p-batch"] = lambda: run_bytewax(a.count, processes=2, batch=True)
            tput_variants["bytewax-1w-seen"] = lambda: run_bytewax(a.count, processes=1, seen=True)
            tput_variants["bytewax-1w-batch-seen"] = lambda: run_bytewax(a.count, processes=1, batch=True, seen=True)
        tput_variants["mpqueue"] = lambda: run_mpqueue(a.count)
    lat_variants = {} if a.no_latency else {
        "sp-alo": lambda: run_streampipe("at-least-once", "latency", lat_count, a.latency_rate, a.warmup),
        "sp-amo": lambda: run_streampipe("at-most-once", "latency", lat_count, a.latency_rate, a.warmup),
        "raw": lambda: run_raw("normalize", "latency", lat_count, a.latency_rate, a.warmup),
    }
    tput: dict[str, list[dict[str, Any]]] = {k: [] for k in tput_variants}
    lat: dict[str, list[dict[str, Any]]] = {k: [] for k in lat_variants}
    steps = a.repeat * (len(tput_variants) + len(lat_variants))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task("throughput", total=steps)
        for rep in range(a.repeat):
            for name, fn in tput_variants.items():
                progress.update(task, description=f"repeat {rep + 1}/{a.repeat}: {name} throughput ({a.count} records)")
                r = fn()
                tput[name].append(r)
                once = r["exactly_once"]
                progress.console.print(f"  repeat {rep + 1} {name:<17} {r['rps']:>10,.0f} records/s  "
                                       f"({r['records']} records in {r['elapsed_s']:.2f} s, {r['cpu_s']:.2f} CPU-s; "
                                       f"exactly once: {'ok' if once['ok'] else 'NO'}, lost {once['lost']}, "
                                       f"duplicated {once['duplicated']}, unexpected {once['unexpected']})", highlight=False)
                progress.advance(task)
            for name, fn in lat_variants.items():
                progress.update(task, description=f"repeat {rep + 1}/{a.repeat}: {name} latency ({lat_count} records at {a.latency_rate:g}/s)")
                r = fn()
                lat[name].append(r)
                progress.console.print(f"  repeat {rep + 1} {name:<14} latency p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                                       f"max {r['max_ms']:.1f} ms ({r['n']} records)", highlight=False)
                progress.advance(task)

    def rps(name: str) -> list[float]:
        return [r["rps"] for r in tput[name]]

    def ratio(num: str, den: str) -> float:
        if num not in tput or den not in tput:
            return float("nan")
        return median([n / d for n, d in zip(rps(num), rps(den), strict=True)])

    def cpu_per_m(name: str, key: str = "cpu_s") -> list[float]:
        """CPU-seconds per million records of each run of ``name``."""
        return [r[key] / a.count * 1e6 for r in tput.get(name, [])]

    def cpu_ratio(num: str, den: str) -> float:
        if num not in tput or den not in tput:
            return float("nan")
        return median([n / d for n, d in zip(cpu_per_m(num), cpu_per_m(den), strict=True)])

    def once(name: str) -> dict[str, int]:
        """The worst run's exactly-once check: most lost, most duplicated."""
        checks = [r["exactly_once"] for r in tput[name]]
        return {k: max(c[k] for c in checks) for k in ("lost", "duplicated", "unexpected")}

    bytewax = [k for k in ("bytewax-1w", "bytewax-2p", "bytewax-1w-batch", "bytewax-2p-batch") if k in tput]
    bytewax_best = max((median(rps(k)) for k in bytewax), default=float("nan"))
    table = Table(title=f"throughput: {a.count} records, generator -> normalizer -> sink, medians of {a.repeat}",
                  title_justify="left", header_style="bold")
    cols = ["variant", "records/s (each run)", "median records/s", "vs raw (median of per-run ratios)"]
    if a.peers:
        cols.append("vs bytewax best (median / best bytewax median)")
    cols += ["CPU-s per M records", "exactly once", "records"]
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name in tput:
        bad = once(name)
        ok = "ok" if not any(bad.values()) else f"[red]NO: lost {bad['lost']}, dup {bad['duplicated']}, other {bad['unexpected']}[/]"
        vs_bytewax = [f"{median(rps(name)) / bytewax_best:.2f}"] if a.peers else []
        table.add_row(name, "  ".join(f"{v:,.0f}" for v in rps(name)), f"{median(rps(name)):,.0f}",
                      f"{ratio(name, 'raw'):.2f}", *vs_bytewax, f"{median(cpu_per_m(name)):.2f}", ok,
                      "/".join(str(r["records"]) for r in tput[name]))
    out.print(table)
    targets: list[tuple[str, str, float, str, float]] = []
    if a.peers:
        def faster(*names: str) -> str:
            return max((k for k in names if k in tput), key=lambda k: median(rps(k)), default=names[0])

        one_worker = faster("bytewax-1w", "bytewax-1w-batch")
        one_worker_map = faster("bytewax-1w-seen", "bytewax-1w-batch-seen")
        # (name, what, value, comparison, target): the done-when figures
        targets = [
            ("sp_alo_vs_bytewax_best", "sp-alo / bytewax best (records/s, medians)",
             median(rps("sp-alo")) / bytewax_best, ">=", 1.5),
            ("userstage_vs_bytewax_1w", f"sp-alo-userstage / {one_worker_map}, the same map (records/s, median of per-run ratios)",
             ratio("sp-alo-userstage", one_worker_map), ">=", 1.0),
            ("records_vs_bytewax_1w", f"sp-alo-records / {one_worker} (records/s, median of per-run ratios)",
             ratio("sp-alo-records", one_worker), ">=", 1.0),
            ("r2_cpu_ratio", "sp-alo-r2 CPU per record / sp-alo CPU per record (median of per-run ratios)",
             cpu_ratio("sp-alo-r2", "sp-alo"), "<=", 1.25),
            ("r2_rps_ratio", "sp-alo-r2 records/s / sp-alo records/s (median of per-run ratios)",
             ratio("sp-alo-r2", "sp-alo"), ">=", 1.0),
        ]
        for _, what, value, cmp, target in targets:
            if value != value:
                verdict = "[yellow]n/a[/]" + (" (bytewax not installed)" if "bytewax" in what and not bytewax else "")
            else:
                met = value >= target if cmp == ">=" else value <= target
                verdict = "[green]met[/]" if met else "[red]not met[/]"
            out.print(f"{what}: {value:.2f}  (target {cmp} {target:g}): {verdict}")
        out.print("[dim]CPU includes every process's start-up (imports, fork server, READY): a fixed cost that "
                  "weighs less the larger --count (6 stage processes for sp-alo-r2, 3 for sp-alo)[/]")
    if lat:
        lt = Table(title=f"end-to-end latency at {a.latency_rate:g} records/s ({lat_count} records, first {a.warmup} dropped), "
                         f"medians of {a.repeat}", title_justify="left", header_style="bold")
        for col in ("variant", "p50 ms", "p90 ms", "p99 ms", "max ms", "p99 each run"):
            lt.add_column(col, justify="left" if col == "variant" else "right")
        for name, rs in lat.items():
            lt.add_row(name, *(f"{median([r[k] for r in rs]):.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
                       "  ".join(f"{r['p99_ms']:.2f}" for r in rs))
        out.print(lt)

    def lat_med(name: str, key: str) -> float:
        return median([r[key] for r in lat.get(name, [])])

    alo, amo = median(rps("sp-alo")), median(rps("sp-amo"))
    figures = {
        "streampipe_rps": rnd(alo, 0), "raw_rps": rnd(median(rps("raw")), 0), "ratio": rnd(ratio("sp-alo", "raw")),
        "p50_ms": rnd(lat_med("sp-alo", "p50_ms")), "p99_ms": rnd(lat_med("sp-alo", "p99_ms")),
        "raw_p50_ms": rnd(lat_med("raw", "p50_ms")), "raw_p99_ms": rnd(lat_med("raw", "p99_ms")),
        "at_most_once_p99_ms": rnd(lat_med("sp-amo", "p99_ms")),
        "at_least_once_rps": rnd(alo, 0), "at_most_once_rps": rnd(amo, 0),
        "at_most_once_ratio": rnd(ratio("sp-amo", "raw")),
        "ack_cost": rnd(median([1 - x / y for x, y in zip(rps("sp-alo"), rps("sp-amo"), strict=True)])),
        "raw_transport_rps": rnd(median(rps("raw-transport")), 0),
        "raw_stagework_rps": rnd(median(rps("raw-stagework")), 0),
        "runtime_ratio": rnd(ratio("sp-alo", "raw-stagework")),
        "records_path_rps": rnd(median(rps("sp-alo-records")), 0),
        "columnar_vs_records": rnd(ratio("sp-alo", "sp-alo-records")),
        **{f"{k.replace('-', '_')}_rps": rnd(median(rps(k)), 0) for k in ("sp-tcp", "sp-tcp-curve", "raw-tcp", "sp-alo-b100") if k in tput},
        **({"b100_vs_raw": rnd(ratio("sp-alo-b100", "raw"))} if "sp-alo-b100" in tput else {}),
        **({"tcp_vs_ipc": rnd(ratio("sp-tcp", "sp-alo"))} if "sp-tcp" in tput else {}),
        **({"curve_vs_tcp": rnd(ratio("sp-tcp-curve", "sp-tcp"))} if "sp-tcp-curve" in tput else {}),
        "records_short": {k: a.count - min(r["records"] for r in v) for k, v in tput.items()},
        "rps": {k: rnd(median(rps(k)), 0) for k in tput},
        "cpu_s_per_m": {k: rnd(median(cpu_per_m(k))) for k in tput},
        "exactly_once": {k: {**once(k), "ok": not any(once(k).values())} for k in tput},
        **({"bytewax_best_rps": rnd(bytewax_best, 0),
            **{name: rnd(value) for name, _, value, _, _ in targets}} if a.peers else {}),
        "count": a.count, "repeat": a.repeat, "latency_rate": a.latency_rate,
    }
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    if "--role" in sys.argv[1:]:
        role_main(sys.argv[1:])
    else:
        main()
