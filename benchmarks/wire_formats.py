"""Micro-benchmark behind the columnar wire format: a 1,000-row batch (id int64, t float64,
x float64[8], y int64) as numpy raw buffers in extra frames, as Arrow IPC, and as a msgpack list
of records; encode + decode in process, and through a PUSH/PULL ipc pair between two processes.

    pip install pyarrow   # not a dependency of streampipe: only this comparison needs it
    python benchmarks/wire_formats.py
"""

import multiprocessing as mp
import tempfile
import time

import msgpack
import numpy as np
import pyarrow as pa
import zmq

N, F, BATCHES = 1000, 8, 2000
rng = np.random.default_rng(1)
cols = {
    "id": np.arange(N, dtype=np.int64),
    "t": np.full(N, time.time()),
    "x": rng.normal(size=(N, F)),
    "y": rng.integers(0, 2, N),
}
records = [
    {"id": int(i), "t": float(t), "x": x.tolist(), "y": int(y)} for i, t, x, y in zip(cols["id"], cols["t"], cols["x"], cols["y"])
]
pack = msgpack.Packer(use_bin_type=True).pack


def np_enc(c):
    desc = [[k, v.dtype.str, list(v.shape[1:])] for k, v in c.items()]
    return [pack({"n": N, "c": desc})] + [np.ascontiguousarray(v) for v in c.values()]


def np_dec(frames):
    h = msgpack.unpackb(frames[0])
    out = {}
    for (k, dt, tail), f in zip(h["c"], frames[1:]):
        a = np.frombuffer(f, dtype=np.dtype(dt))
        out[k] = a.reshape(h["n"], *tail)
    return out


schema = pa.schema([("id", pa.int64()), ("t", pa.float64()), ("x", pa.list_(pa.float64(), F)), ("y", pa.int64())])


def ar_enc(c):
    x = pa.FixedSizeListArray.from_arrays(pa.array(c["x"].ravel()), F)
    rb = pa.record_batch([pa.array(c["id"]), pa.array(c["t"]), x, pa.array(c["y"])], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(rb)
    return [pack({"n": N}), sink.getvalue()]


def ar_dec(frames):
    rb = pa.ipc.open_stream(frames[1]).read_next_batch()
    x = rb.column(2).flatten().to_numpy(zero_copy_only=True).reshape(-1, F)
    return {"id": rb.column(0).to_numpy(), "t": rb.column(1).to_numpy(), "x": x, "y": rb.column(3).to_numpy()}


def mp_enc(c):
    return [pack({"n": N}), pack(records)]


def mp_dec(frames):
    return msgpack.unpackb(frames[1])


CODECS = {"numpy-raw": (np_enc, np_dec), "arrow-ipc": (ar_enc, ar_dec), "msgpack-dicts": (mp_enc, mp_dec)}


def inproc(name):
    enc, dec = CODECS[name]
    k = 200 if name == "msgpack-dicts" else BATCHES
    t0 = time.perf_counter()
    for _ in range(k):
        fr = enc(cols)
        fr = [bytes(f) if not isinstance(f, bytes) else f for f in fr]
        dec(fr)
    dt = time.perf_counter() - t0
    return k * N / dt, sum(len(bytes(f)) for f in fr)


def sender(name, ep, k):
    enc, _ = CODECS[name]
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100)
    s.connect(ep)
    for _ in range(k):
        s.send_multipart(enc(cols), copy=False)
    s.send_multipart([b"end"])
    time.sleep(1)
    s.close(linger=-1)


def twoproc(name):
    _, dec = CODECS[name]
    k = 300 if name == "msgpack-dicts" else BATCHES
    ep = f"ipc://{tempfile.mkdtemp()}/{name}"
    ctx = zmq.Context()
    r = ctx.socket(zmq.PULL)
    r.setsockopt(zmq.RCVHWM, 100)
    r.bind(ep)
    p = mp.get_context("fork").Process(target=sender, args=(name, ep, k))
    p.start()
    got = 0
    t0 = None
    while True:
        fr = r.recv_multipart(copy=False)
        if t0 is None:
            t0 = time.perf_counter()
        if len(fr) == 1:
            break
        dec([f.buffer for f in fr])
        got += 1
    dt = time.perf_counter() - t0
    p.join()
    r.close()
    ctx.term()
    return (got - 1) * N / dt


for name in CODECS:
    ips, size = inproc(name)
    print(
        f"{name:<14} enc+dec in-process {ips / 1e6:6.2f} M rows/s   batch {size / 1024:5.1f} KiB   2-proc ipc {twoproc(name) / 1e6:6.2f} M rows/s",
        flush=True,
    )
