"""The wire format: every byte that crosses a streampipe socket is built and read here.

Both sides import this module (the stage runtime and the supervisor); nothing else encodes
frames. Everything is msgpack; no pickle ever crosses a socket.

Data plane (PUSH -> PULL, one connection per pipeline edge):

    DATA   [header, payload]   header = {"k": "d", "src", "r", "e", "ep", "seq", "n", "t", "ack", "o", "w"}
                               payload = msgpack list of records (plain maps)
    EOS    [header]            header = {"k": "eos", "src", "r", "e", "ep", "seq", "ack"}

    src/r  sending stage and replica      e    edge name ("<output>><dest stage>")
    ep     sender incarnation (random)    seq  per-edge sequence number
    n      records in the payload         t    send time (time.time())
    ack    the sender's ack endpoint, or None when delivery is at-most-once
    o      origin of the records: "<source stage>.<replica>/<generation>" (copied by transforms)
    w      the origin's watermark: every id of it below w is acknowledged end to end, or None

Ack plane (receiver PUSH -> sender's PULL at ``ack``):

    ACK    {"k": "a", "e", "ep", "s": [seq, ...], "from": "stage.replica"}
    EOSACK {"k": "ea", "e", "ep", "s": [seq], "from": "stage.replica"}

Stage <-> supervisor (DEALER -> ROUTER at ``<run dir>/sock/stages``), msgpack maps with "op":

    stage -> supervisor   hello, ready, hb (counters), completed, error, bye
    supervisor -> stage   connect (an output's endpoint list changed), stop

CLI <-> supervisor (REQ -> ROUTER at ``<run dir>/sock/control``): {"cmd": name, **args}
answered by {"ok": bool, ...}.
"""

from __future__ import annotations

from typing import Any

import msgpack

DATA = b"d"
EOS = "eos"
ACK = "a"
EOS_ACK = "ea"

def _to_wire(obj: Any) -> Any:
    """What msgpack cannot carry as is, as plain data: numpy values, tuples, sets, times, paths."""
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


def data_frames(header: dict[str, Any], records: list[dict[str, Any]]) -> list[bytes]:
    """The two frames of a DATA message."""
    return [_packb(header), _packb(records)]


def eos_frames(header: dict[str, Any]) -> list[bytes]:
    """The single frame of an EOS message."""
    return [_packb({**header, "k": EOS})]


def read_message(frames: list[bytes]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Split a received data-plane message into (header, records); records is None for EOS.

    Raises ``ValueError`` when the frames are not a streampipe message.
    """
    header = unpackb(frames[0])
    if not isinstance(header, dict) or "k" not in header:
        raise ValueError("frame is not a streampipe header")
    if header["k"] == EOS:
        return header, None
    if len(frames) != 2:
        raise ValueError(f"data message has {len(frames)} frames, expected 2")
    records = unpackb(frames[1])
    if not isinstance(records, list):
        raise ValueError("payload is not a list of records")
    return header, records


def ack_message(kind: str, edge: str, epoch: int, seqs: list[int], sender: str) -> bytes:
    """An ACK or EOSACK for ``seqs`` of one edge and sender incarnation."""
    return _packb({"k": kind, "e": edge, "ep": epoch, "s": seqs, "from": sender})


def control(op: str, **fields: Any) -> bytes:
    """A stage <-> supervisor message."""
    return _packb({"op": op, **fields})
