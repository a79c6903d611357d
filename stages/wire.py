"""The wire format: every byte that crosses a streampipe socket is built and read here.

Both sides import this module (the stage runtime and the supervisor); nothing else encodes
frames. Everything is msgpack; no pickle ever crosses a socket.

Data plane (PUSH -> PULL, one connection per pipeline edge):

    DATA   [header, payload]   header = {"k": "d", "src", "r", "e", "ep", "seq", "n", "t", "ack", "o", "w"}
                               payload = msgpack list of records (plain maps)
    DATA   [header, col, ...]  a columnar batch: the header adds "c" = [[name, kind, [width...]], ...]
                               and each column is one frame: a numpy column's raw little-endian
                               bytes (kind one of WIRE_DTYPES, ``n * width`` values), or for kind
                               "msgpack" a msgpack list of ``n`` values (ext type 1 = MISSING)
    EOS    [header]            header = {"k": "eos", "src", "r", "e", "ep", "seq", "ack"}
    FENCE  [header]            header = {"k": "f", "src", "r", "e", "ep", "seq", "ack"}: the sender sends
                               nothing more to this replica (a graceful stop drains up to it)

    src/r  sending stage and replica      e    edge name ("<output>><dest stage>")
    ep     sender incarnation (random)    seq  per-edge sequence number
    n      records in the payload         t    send time (time.time())
    ack    the sender's ack endpoint, or None when delivery is at-most-once
    o      origin of the records: "<source stage>.<replica>/<generation>" (copied by transforms)
    w      the origin's watermark: every id of it below w is acknowledged end to end, or None
    c      the columns of a columnar batch (absent for a list of records)

Ack plane (receiver PUSH -> sender's PULL at ``ack``):

    ACK    {"k": "a", "e", "ep", "s": [seq, ...], "from": "stage.replica"}
    EOSACK {"k": "ea", "e", "ep", "s": [seq], "from": "stage.replica"}

Stage <-> supervisor (DEALER -> ROUTER at ``<run dir>/sock/stages``), msgpack maps with "op":

    stage -> supervisor   hello, ready, hb (counters), completed, error, bye
    supervisor -> stage   connect (an output's endpoint list changed), peers, fence (send nothing more to
                          one replica of an output: it is draining), stop (with ``senders``: the ack
                          addresses whose FENCE to wait for before the input is complete)

CLI <-> supervisor (REQ -> ROUTER at ``<run dir>/sock/control``): {"cmd": name, **args}
answered by {"ok": bool, ...}.

Bad input: every message read from a socket is checked here before anything uses it (frame
count, the type of every field, ``n`` against the payload, records that are maps, a column's
kind, shape and byte length, an ack address that belongs to a stage feeding the receiver). What fails raises :class:`Malformed`; the reader
counts it in a :class:`Rejects` (shown by ``status`` and the metrics), and drops it. Receiving
sockets also carry ``zmq.MAXMSGSIZE``, so libzmq refuses a huge frame (and disconnects its
sender) before allocating it.
"""

from __future__ import annotations

import time
from collections.abc import Container
from typing import Any

import msgpack
import numpy as np
from loguru import logger

from streampipe.stages.columns import MISSING, WIRE_DTYPES, Column, Columns

DATA = b"d"
EOS = "eos"
FENCE = "f"
ACK = "a"
EOS_ACK = "ea"
LEAVE = "l"     # on the ack channel, run-stage: "I stop: send me nothing more, and a FENCE behind your last batch"

CONTROL_MAX_BYTES = 1 << 20     # MAXMSGSIZE of ack and control sockets: a heartbeat is ~1 KB, an ack
                                # a list of at most a few thousand seqs; a stage caps its stats and texts
STATS_MAX_BYTES = 256 << 10     # a stage's stats() larger than this packed is not sent (under the above)
TEXT_MAX_CHARS = 64 << 10       # last_error / traceback sent to the supervisor: their last 64 K characters
LOG_FIRST = 5                   # malformed frames logged one by one ...
LOG_EVERY_S = 10.0              # ... then one line per interval with the count (logging only: nothing rests on it)


OBJECT = "msgpack"              # the wire kind of a list column
MISSING_EXT = 1                 # msgpack ext type of MISSING in a list column
MAX_COLUMN_DIMS = 2             # a column is 1-D (a scalar field) or 2-D (a fixed-length vector)


def _to_wire(obj: Any) -> Any:
    """What msgpack cannot carry as is, as plain data: numpy values, tuples, sets, times, paths."""
    if obj is MISSING:
        return msgpack.ExtType(MISSING_EXT, b"")
    if hasattr(obj, "tolist"):          # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if hasattr(obj, "isoformat"):       # datetime, date, time
        return obj.isoformat()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} (records carry maps, lists, strings, numbers)")


_packb = msgpack.Packer(use_bin_type=True, default=_to_wire).pack


def packb(obj: Any) -> bytes:
    """Encode one msgpack object (a fresh Packer per call is slower; this one is shared)."""
    return _packb(obj)


def unpackb(data: bytes) -> Any:
    """Decode one msgpack object; raises ``ValueError`` on malformed bytes."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError) as exc:
        raise ValueError(f"malformed msgpack frame: {exc}") from exc
    except ValueError:
        raise
    except Exception as exc:  # msgpack raises a few odd types on truncated input
        raise ValueError(f"malformed msgpack frame: {exc}") from exc


def data_frames(header: dict[str, Any], payload: list[dict[str, Any]] | Columns) -> list[bytes]:
    """The frames of a DATA message: two for a list of records, 1 + one per column for columns.

    Raises ``TypeError`` for what cannot cross the wire (an object-dtype array, a value msgpack
    cannot carry in a list column).
    """
    if not isinstance(payload, Columns):
        return [_packb(header), _packb(payload)]
    if not payload.data and payload.n:    # records without fields: a byte each as records (see read_columns)
        return [_packb(header), _packb(payload.to_records())]
    frames: list[bytes] = [b""]
    desc = []
    for name, col in payload.items():
        kind, frame, width = _column_frame(col)
        desc.append([name, kind, width])
        frames.append(frame)
    frames[0] = _packb({**header, "c": desc})
    return frames


def _column_frame(col: Column) -> tuple[str, bytes, list[int]]:
    """(wire kind, frame, widths) of one column."""
    if not isinstance(col, np.ndarray):
        return OBJECT, _packb(col), []
    if col.ndim < 1 or col.ndim > MAX_COLUMN_DIMS:
        raise TypeError(f"a column of {col.ndim} dimensions (1 or 2 cross the wire)")
    if 0 in col.shape[1:]:                # empty vectors: no bytes as numpy, a byte each as values
        return OBJECT, _packb(col.tolist()), []
    dt = col.dtype
    if dt.str not in WIRE_DTYPES:
        if dt.kind in "iu" and dt.itemsize <= 8 and not (dt.kind == "u" and dt.itemsize == 8):
            dt = np.dtype("<i8")
        elif dt.kind == "f" and dt.itemsize <= 8:
            dt = np.dtype("<f8")
        elif dt.kind == "b":
            dt = np.dtype("|b1")
        elif dt.kind in "USiuf":      # strings, uint64, long double: as plain values
            return OBJECT, _packb(col.tolist()), []
        else:
            raise TypeError(f"a column of dtype {col.dtype} cannot be sent (numbers, bools and plain values can)")
    return dt.str, np.ascontiguousarray(col, dtype=dt).tobytes(), list(col.shape[1:])


def eos_frames(header: dict[str, Any]) -> list[bytes]:
    """The single frame of an EOS message."""
    return [_packb({**header, "k": EOS})]


def fence_frames(header: dict[str, Any]) -> list[bytes]:
    """The single frame of a FENCE message: nothing follows it from this sender."""
    return [_packb({**header, "k": FENCE})]


class Malformed(ValueError):
    """A message that is not a streampipe message: the reader counts it, logs it rate-limited, drops it."""


_NONE = type(None)
_NUM = (int, float)
# exact types (``type(v) in ...``): msgpack yields no subclasses, and a bool is not a count
DATA_HEADER: dict[str, tuple[type, ...]] = {"src": (str,), "r": (int,), "e": (str,), "ep": (int,), "seq": (int,),
                                            "n": (int,), "t": _NUM, "ack": (str, _NONE)}
STAMP: dict[str, tuple[type, ...]] = {"o": (str, _NONE), "w": (int, _NONE),   # origin, watermark: optional
                                      "c": (list,),                           # the columns of a columnar batch
                                      "lo": (int,)}                           # sender's lowest unacked seq
EOS_HEADER: dict[str, tuple[type, ...]] = {"src": (str,), "r": (int,), "e": (str,), "ep": (int,), "seq": (int,),
                                           "ack": (str,)}
ACK_FIELDS: dict[str, tuple[type, ...]] = {"e": (str,), "ep": (int,), "s": (list,), "from": (str,)}
# stage -> supervisor: op -> fields that, when present, must have these types (unknown ops are refused)
STAGE_OPS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {}, "ready": {}, "bye": {"code": (int,)}, "completed": {"records_out": (int,)},
    "error": {"error": (str,), "traceback": (str,)},
    "hb": {"records_in": (int,), "records_out": (int,), "errors": (int,), "dead_letters": (int,), "resent": (int,),
           "malformed": (int,), "blocked": (bool,), "waiting": (str,), "queue": (int,), "latency_ms": _NUM, "latency_buckets": (list,),
           "batches": (int,), "stats": (dict,), "edges_out": (dict,), "last_error": (str,), "finished": (bool,)},
}
# supervisor -> stage
SUPERVISOR_OPS: dict[str, dict[str, tuple[type, ...]]] = {
    "stop": {"senders": (list,)}, "connect": {"edge": (str,), "endpoints": (list,)}, "peers": {"acks": (list,)},
    "fence": {"edge": (str,), "endpoint": (str,), "on": (bool,)}, "replay": {},
}
_LISTS_OF = {"s": int, "latency_buckets": int, "endpoints": str, "acks": str, "senders": str}   # what a list field holds


def _check(msg: dict[Any, Any], fields: dict[str, tuple[type, ...]], what: str, required: bool) -> None:
    """Raise :class:`Malformed` unless every field of ``fields`` in ``msg`` has one of its types."""
    for key, types in fields.items():
        if key not in msg:
            if required:
                raise Malformed(f"{what} has no {key!r}")
            continue
        value = msg[key]
        if type(value) not in types:
            raise Malformed(f"{what} field {key!r} is a {type(value).__name__}")
        if type(value) is list and (item := _LISTS_OF.get(key)) is not None and not all(type(v) is item for v in value):
            raise Malformed(f"{what} field {key!r} is not a list of {item.__name__}")


def single(frames: list[bytes]) -> bytes:
    """The one frame of an ack or control message; raises :class:`Malformed` on any other count."""
    if len(frames) != 1:
        raise Malformed(f"a message of {len(frames)} frames, expected 1")
    return frames[0]


def _decode(data: bytes, what: str) -> Any:
    try:
        return unpackb(data)
    except ValueError as exc:
        raise Malformed(f"{what}: {exc}") from None


def read_message(frames: list[bytes], peers: Container[str], acked: bool
                 ) -> tuple[dict[str, Any], list[dict[str, Any]] | Columns | None]:
    """Check and split a received data-plane message into (header, payload): a list of records,
    :class:`Columns` for a columnar batch, None for EOS and FENCE (``header["k"]`` tells which).

    ``peers`` are the ack endpoints of the stage replicas that feed this one: a header naming
    another address is refused (a receiver opens sockets only towards its known senders). With
    ``acked`` false (at-most-once) a DATA header carries no ack address. Raises :class:`Malformed`.
    """
    if not frames:
        raise Malformed("a message of 0 frames")
    header = _decode(frames[0], "header")
    if type(header) is not dict:
        raise Malformed(f"header is a {type(header).__name__}, not a map")
    kind = header.get("k")
    if kind in (EOS, FENCE):
        what = "end-of-stream" if kind == EOS else "fence"
        _check(header, EOS_HEADER, f"{what} header", True)
        if len(frames) != 1:
            raise Malformed(f"{what} message has {len(frames)} frames, expected 1")
    elif kind == "d":
        _check(header, DATA_HEADER, "header", True)
        _check(header, STAMP, "header", False)
        want = 1 + len(header["c"]) if "c" in header else 2
        if len(frames) != want:
            raise Malformed(f"data message has {len(frames)} frames, expected {want}")
        if "lo" in header and header["lo"] > header["seq"]:
            raise Malformed(f"lowest unacknowledged seq {header['lo']} is above the batch's own seq {header['seq']}")
    else:
        raise Malformed(f"header kind {kind!r} is not 'd', 'eos' or 'f'")
    ack = header["ack"]
    if (acked or kind != "d") and ack not in peers:
        raise Malformed(f"ack address {str(ack)[:120]!r} is not one of a stage feeding this one")
    if not acked and kind == "d" and ack is not None:
        raise Malformed("an ack address in an at-most-once pipeline")
    if kind != "d":
        return header, None
    if "c" in header:
        return header, read_columns(header["c"], header["n"], frames[1:])
    records = _decode(frames[1], "payload")
    if type(records) is not list:
        raise Malformed(f"payload is a {type(records).__name__}, not a list of records")
    if len(records) != header["n"]:
        raise Malformed(f"header says {header['n']} records, payload has {len(records)}")
    if not all(type(r) is dict for r in records):
        raise Malformed("payload holds something other than maps")
    return header, records


def _missing_hook(code: int, data: bytes) -> Any:
    if code == MISSING_EXT and not data:
        return MISSING
    raise ValueError(f"msgpack ext type {code}")


def read_columns(desc: list[Any], n: int, frames: list[bytes]) -> Columns:
    """The columns of a columnar DATA message, checked: kinds, widths, byte lengths, list lengths,
    unique names. Numpy columns are read-only views of the frames. Raises :class:`Malformed`.

    Every record costs at least one byte of the frames (a sender sends a batch without columns,
    or a column of empty vectors, as values): ``n`` above the bytes received is refused before
    anything is built, so a small header cannot make a receiver allocate ``n`` of anything.
    """
    size = sum(len(f) for f in frames)
    if n < 0 or n > size:
        raise Malformed(f"header says {n} records in {len(desc)} columns of {size} bytes")
    data: dict[str, Column] = {}
    for d, frame in zip(desc, frames):
        if type(d) is not list or len(d) != 3 or type(d[0]) is not str or type(d[1]) is not str or type(d[2]) is not list:
            raise Malformed("a column descriptor is not [name, kind, [width...]]")
        name, kind, widths = d
        if name in data:
            raise Malformed(f"column {name[:80]!r} twice")
        if kind == OBJECT:
            if widths:
                raise Malformed(f"list column {name[:80]!r} has widths")
            try:
                values = msgpack.unpackb(frame, raw=False, strict_map_key=False, ext_hook=_missing_hook)
            except Exception as exc:   # msgpack raises a few odd types on truncated input
                raise Malformed(f"column {name[:80]!r}: malformed msgpack: {exc}") from None
            if type(values) is not list or len(values) != n:
                raise Malformed(f"column {name[:80]!r} is not a list of {n} values")
            data[name] = values
            continue
        if kind not in WIRE_DTYPES:
            raise Malformed(f"column {name[:80]!r} has kind {kind[:20]!r}")
        if len(widths) > MAX_COLUMN_DIMS - 1 or not all(type(w) is int and 0 < w < 1 << 31 for w in widths):
            raise Malformed(f"column {name[:80]!r} has widths {str(widths)[:40]}")
        dtype = np.dtype(kind)
        width = widths[0] if widths else 1
        if len(frame) != n * width * dtype.itemsize:
            raise Malformed(f"column {name[:80]!r} has {len(frame)} bytes, expected {n * width * dtype.itemsize}")
        if kind == "|b1" and frame.translate(None, b"\x00\x01"):
            raise Malformed(f"bool column {name[:80]!r} holds bytes other than 0 and 1")
        data[name] = np.frombuffer(frame, dtype=dtype).reshape((n, *widths))
    return Columns(data, n)


def read_ack(data: bytes) -> dict[str, Any]:
    """Check a received ACK / EOSACK; raises :class:`Malformed`."""
    msg = _decode(data, "ack")
    if type(msg) is not dict or msg.get("k") not in (ACK, EOS_ACK, LEAVE):
        raise Malformed("not an ack message")
    _check(msg, ACK_FIELDS, "ack", True)
    if msg["k"] == LEAVE and type(msg.get("at")) is not str:
        raise Malformed("a leave without the endpoint that leaves")
    return msg


def _read_op(data: bytes, ops: dict[str, dict[str, tuple[type, ...]]], what: str) -> dict[str, Any]:
    msg = _decode(data, what)
    if type(msg) is not dict:
        raise Malformed(f"{what} is a {type(msg).__name__}, not a map")
    fields = ops.get(msg["op"]) if type(msg.get("op")) is str else None
    if fields is None:
        raise Malformed(f"{what} has an unknown op {str(msg.get('op'))[:40]!r}")
    _check(msg, fields, f"{what} {msg['op']!r}", False)
    return msg


def read_stage_message(data: bytes) -> dict[str, Any]:
    """Check a stage -> supervisor message: a known op, an int pid, typed fields. Raises :class:`Malformed`."""
    msg = _read_op(data, STAGE_OPS, "stage message")
    if type(msg.get("pid")) is not int:
        raise Malformed("stage message has no int pid")
    return msg


def read_supervisor_message(data: bytes) -> dict[str, Any]:
    """Check a supervisor -> stage message. Raises :class:`Malformed`."""
    return _read_op(data, SUPERVISOR_OPS, "supervisor message")


def read_command(data: bytes) -> dict[str, Any]:
    """Check a CLI -> supervisor request: a map with a string ``cmd``. Raises :class:`Malformed`."""
    msg = _decode(data, "request")
    if type(msg) is not dict or type(msg.get("cmd")) is not str:
        raise Malformed("request is not a map with a string 'cmd'")
    return msg


class Rejects:
    """Messages dropped as malformed: counted per socket, logged at a bounded rate.

    The first ``LOG_FIRST`` are logged one by one; after that one line per ``LOG_EVERY_S`` says how
    many more were dropped (a flood of junk must not become a flood of log lines). The counts are
    exact; only the logging looks at the clock.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.total = 0
        self.unlogged = 0
        self.last = ""
        self.next_log = 0.0

    def drop(self, socket: str, reason: str) -> None:
        self.counts[socket] = self.counts.get(socket, 0) + 1
        self.total += 1
        self.last = f"on the {socket} socket: {reason[:200]}"
        if self.total <= LOG_FIRST:
            logger.warning(f"dropped a malformed message {self.last}")
            self.next_log = time.monotonic() + LOG_EVERY_S
            return
        self.unlogged += 1
        self.flush()

    def flush(self) -> None:
        """Log the count dropped since the last line, if the interval has passed."""
        if self.unlogged and time.monotonic() >= self.next_log:
            logger.warning(f"dropped {self.unlogged} more malformed messages ({self.total} in all, "
                           f"{', '.join(f'{k} {v}' for k, v in sorted(self.counts.items()))}); the last {self.last}")
            self.unlogged, self.next_log = 0, time.monotonic() + LOG_EVERY_S


def ack_message(kind: str, edge: str, epoch: int, seqs: list[int], sender: str) -> bytes:
    """An ACK or EOSACK for ``seqs`` of one edge and sender incarnation."""
    return _packb({"k": kind, "e": edge, "ep": epoch, "s": seqs, "from": sender})


def leave_message(edge: str, epoch: int, sender: str, at: str) -> bytes:
    """A LEAVE: the replica whose input is ``at`` stops (run-stage SIGTERM) and drains from this sender."""
    return _packb({"k": LEAVE, "e": edge, "ep": epoch, "s": [], "from": sender, "at": at})


def control(op: str, **fields: Any) -> bytes:
    """A stage <-> supervisor message."""
    return _packb({"op": op, **fields})
