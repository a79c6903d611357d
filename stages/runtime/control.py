"""The control link: the DEALER towards the supervisor. Up: hello, ready, heartbeats, errors,
completion (``tell``); down: stop, fence, connect and peers (``read``). Without a supervisor
(run-stage) what would be told goes to the host's hook only."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from streampipe.stages import wire


class ControlLink:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str | None, ident: str, rejects: wire.Rejects) -> None:
        self.rejects = rejects
        self.on_tell: Callable[[str, dict[str, Any]], None] | None = None   # run-stage: health and metrics
        self.sock: zmq.Socket[bytes] | None = None
        if endpoint:
            self.sock = ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.IDENTITY, ident.encode())
            self.sock.setsockopt(zmq.MAXMSGSIZE, wire.CONTROL_MAX_BYTES)
            self.sock.setsockopt(zmq.LINGER, 500)
            self.sock.setsockopt(zmq.SNDHWM, 100)
            self.sock.connect(endpoint)

    def tell(self, op: str, **fields: Any) -> None:
        for key in ("error", "traceback", "last_error"):    # under the supervisor's CONTROL_MAX_BYTES
            if key in fields:
                fields[key] = fields[key][-wire.TEXT_MAX_CHARS:]
        if self.on_tell is not None:
            self.on_tell(op, fields)
        if self.sock is None:
            return
        try:
            self.sock.send(wire.control(op, pid=os.getpid(), **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def read(self) -> Iterator[dict[str, Any]]:
        """The supervisor's messages queued now, checked."""
        assert self.sock is not None
        return checked_messages(self.sock, self.rejects, "control", lambda frames: wire.read_supervisor_message(wire.single(frames)))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=500)


def checked_messages(sock: zmq.Socket[bytes], rejects: wire.Rejects, kind: str,
                     read: Callable[[list[bytes]], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every message queued on ``sock`` now, as ``read`` makes it; one it finds malformed
    (:class:`wire.Malformed`) is counted against ``kind`` and dropped."""
    while True:
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = read(frames)
        except wire.Malformed as exc:
            rejects.drop(kind, str(exc))
            continue
        yield msg
