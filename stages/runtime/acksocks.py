"""The ack sockets: where this replica may send acknowledgements (its senders) and the PUSH
socket towards each, opened on first use and closed when its sender goes."""

from __future__ import annotations

import zmq

from streampipe.stages import network
from streampipe.stages.runtime.tunables import MAX_SENDERS, RECONNECT_IVL_MS


class AckSockets:
    """The only addresses acks are sent to: the senders the supervisor names (``set_peers``), or
    (run-stage, no supervisor: ``learned``) those a batch arrived from, each checked against its
    connection's peer address, the newest ``MAX_SENDERS`` kept."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], peers: list[str], learned: bool, bind_host: str,
                 curve: network.Curve | None) -> None:
        self.ctx, self.bind_host, self.curve = ctx, bind_host, curve
        self.peers: frozenset[str] | dict[str, None] = {} if learned else frozenset(peers)
        self.socks: dict[str, zmq.Socket[bytes]] = {}

    def sock(self, endpoint: str) -> zmq.Socket[bytes] | None:
        """The PUSH that acks go to ``endpoint`` on (opened on first use); None for a sender
        this replica does not feed from (any more)."""
        sock = self.socks.get(endpoint)
        if sock is None:
            if endpoint not in self.peers:
                return None   # its sender is gone (scaled down) since the input arrived
            sock = self.socks[endpoint] = self.ctx.socket(zmq.PUSH)
            if self.curve is not None and endpoint.startswith("tcp://"):
                self.curve.client(sock)
            sock.setsockopt(zmq.LINGER, 200)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.connect(network.connect_from(endpoint, self.bind_host))
        return sock

    def learn(self, endpoint: str) -> None:
        """A sender checked against its connection (run-stage): acks may go to it. The newest
        ``MAX_SENDERS`` are kept; the ack socket of one forgotten is closed."""
        assert isinstance(self.peers, dict)
        self.peers.pop(endpoint, None)
        self.peers[endpoint] = None
        while len(self.peers) > MAX_SENDERS:
            old = next(iter(self.peers))
            del self.peers[old]
            self._close(old)

    def set_peers(self, endpoints: list[str]) -> None:
        """The replicas feeding this one changed (a scale upstream): acks go only to these, and
        the ack sockets of senders that are gone are closed."""
        self.peers = frozenset(endpoints)
        for endpoint in [e for e in self.socks if e not in self.peers]:
            self._close(endpoint)

    def _close(self, endpoint: str) -> None:
        sock = self.socks.pop(endpoint, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=200)
        self.socks.clear()
