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
        """The supervisor's messages queued now, checked; a malformed one is counted and dropped."""
        assert self.sock is not None
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield wire.read_supervisor_message(wire.single(frames))
            except wire.Malformed as exc:
                self.rejects.drop("control", str(exc))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=500)
