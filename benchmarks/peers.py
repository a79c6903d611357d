"""The peer systems of ``throughput.py --peers``: bytewax and a ``multiprocessing.Queue`` pipeline.

Each run does the job of the other variants (``count`` records of the generator's stream, seed 7
-> the normalizer's work -> one ``orjson`` JSON line per record in a file), with the stage work
of :mod:`peer_work` (written once in the benchmark: never streampipe's stage code, so the
baseline does not move when streampipe's stages do), in subprocesses of the benchmark, and returns ``{"rps", "records", "elapsed_s", "cpu_s", "exactly_once", ...}``:

- ``rps``: records / (last write of any output file - ``t`` of the earliest first record), the
  clock of every variant;
- ``cpu_s``: user + system CPU of every process of the run, start-up included
  (``getrusage(RUSAGE_CHILDREN)`` around the run: all of them are reaped children of the
  benchmark or of its children);
- ``exactly_once``: :func:`_common.exactly_once` over the output files.

bytewax (``pip install -e '.[bench]'``, ``bytewax==0.21.*``) runs ``bytewax_flow.py`` as its
documentation shows, ``python -m bytewax.run``: one process of one worker, or ``processes``
processes of one worker each joined with ``-i``/``-a`` (0.21 has no ``-p`` outside
``bytewax.testing``), each worker generating its own share of the ids (no exchange).

``mpqueue``: ``python peers.py mpqueue --count N --out DIR``: three ``multiprocessing.Process``
(fork) linked by two ``multiprocessing.Queue(maxsize=100)`` carrying lists of 1000 records:
generator (:func:`peer_work.batches`) -> :class:`peer_work.BatchNormalizer` per list (the raw
chain's middle) -> :class:`peer_work.JsonLines` (the raw chain's sink).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

THIS = Path(__file__).resolve()
QUEUE_SIZE = 100          # lists per queue: the raw chain's HWM of 100 messages
RUN_TIMEOUT_S = 300.0     # one run's whole stream, start-up included
INSTALL_HINT = "pip install -e '.[bench]'"


def bytewax_missing() -> str | None:
    """Why the bytewax variants cannot run (None: they can)."""
    if importlib.util.find_spec("bytewax") is None:
        return f"bytewax is not installed: the bytewax variants are skipped (install the peers with `{INSTALL_HINT}`)"
    return None


def _finish(folder: Path, count: int, cpu_s: float, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    from _common import LineCounter, exactly_once, output_span

    paths = sorted(folder.glob("records*.jsonl"))
    bad = [p for p in procs if p.returncode != 0]
    if bad or not paths:
        logs = "\n".join((folder / f"{i}.log").read_text(errors="replace")[-2000:] for i in range(len(procs)))
        raise RuntimeError(f"exit codes {[p.returncode for p in procs]}, output {paths}:\n{logs}")
    lines = sum(LineCounter(p).poll() for p in paths)
    elapsed = output_span(paths)
    return {"rps": lines / elapsed, "records": lines, "elapsed_s": elapsed, "cpu_s": cpu_s,
            "exactly_once": exactly_once(paths, count), "files": len(paths)}


def _run(commands: list[list[str]], count: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start ``commands`` (each writing into the run's folder, given as ``{out}``), wait for all."""
    from _common import THREAD_ENV, children_cpu_s, stop_pids

    folder = Path(tempfile.mkdtemp(prefix="streampipe-peer-"))
    path = [str(THIS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]    # bytewax_flow importable
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": os.pathsep.join(path), **(env or {})}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        before = children_cpu_s()
        for i, cmd in enumerate(commands):
            logs.append(open(folder / f"{i}.log", "wb"))
            procs.append(subprocess.Popen([c.format(out=folder) for c in cmd], cwd=folder, stdout=logs[-1],
                                          stderr=subprocess.STDOUT, env=env))
        for p in procs:
            p.wait(timeout=RUN_TIMEOUT_S)
        return _finish(folder, count, children_cpu_s() - before, procs)
    finally:
        stop_pids([p.pid for p in procs if p.poll() is None], grace=2.0)
        for p in procs:
            p.wait()
        for log in logs:
            log.close()
        shutil.rmtree(folder, ignore_errors=True)


def run_bytewax(count: int, processes: int = 1, batch: bool = False, seen: bool = False) -> dict[str, Any]:
    """One run of ``bytewax_flow.py`` in ``processes`` processes of one worker each."""
    flow = f"bytewax_flow:get_flow({count}, '{{out}}', batch={batch}, seen={seen})"
    cmd = [sys.executable, "-m", "bytewax.run", flow]
    if processes == 1:
        return _run([cmd], count)
    from streampipe.launcher.wiring import free_port

    addresses = ";".join(f"127.0.0.1:{free_port('127.0.0.1')}" for _ in range(processes))
    return _run([[*cmd, "-i", str(i), "-a", addresses] for i in range(processes)], count)


def run_mpqueue(count: int) -> dict[str, Any]:
    """One run of the ``multiprocessing.Queue`` pipeline (module docstring)."""
    return _run([[sys.executable, str(THIS), "mpqueue", "--count", str(count), "--out", "{out}"]], count)


# =============================================================================================
# The multiprocessing.Queue pipeline (run as `python peers.py mpqueue ...`)
# =============================================================================================

def _mp_gen(out: Any, count: int) -> None:
    import peer_work

    for batch in peer_work.batches(count):
        out.put(batch)
    out.put(None)


def _mp_mid(inp: Any, out: Any) -> None:
    import peer_work

    norm = peer_work.BatchNormalizer()
    while (batch := inp.get()) is not None:
        out.put(norm(batch))
    out.put(None)


def _mp_sink(inp: Any, path: str) -> None:
    import peer_work

    sink = peer_work.JsonLines(path)
    while (batch := inp.get()) is not None:
        sink.write(batch)
    sink.close()


def mpqueue_main(count: int, folder: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q1, q2 = ctx.Queue(maxsize=QUEUE_SIZE), ctx.Queue(maxsize=QUEUE_SIZE)
    procs = [ctx.Process(target=_mp_sink, args=(q2, str(folder / "records.jsonl"))),
             ctx.Process(target=_mp_mid, args=(q1, q2)),
             ctx.Process(target=_mp_gen, args=(q1, count))]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(abs(p.exitcode or 0) for p in procs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the multiprocessing.Queue pipeline of throughput.py --peers")
    parser.add_argument("system", choices=["mpqueue"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    mpqueue_main(a.count, a.out)
