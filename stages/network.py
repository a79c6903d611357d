"""Stages across machines: edges found by name, advertised ack addresses, CURVE, reachability.

With ``transport: tcp`` a stage can be reached by name (``address:``) and port (``port:``). A
producer resolves the name to every address it has (several A records: a Kubernetes headless
Service, a hosts file, a list of names) and connects its PUSH to each, re-resolving every
``resolve_interval`` seconds: new addresses are connected, vanished ones disconnected. A batch
that was in flight to a vanished replica is never acknowledged, so the producer resends it to the
others (at-least-once holds across a replica that went away).

The ack address a sender writes into its headers must be reachable from its receivers: the
``advertise_host`` if set (the pod IP, from an environment variable), else the host it binds, else
the address of its interface towards the receivers. A receiver sends acks only to the address
that sent it the data: the ack host of a header must be the peer address of the connection the
batch arrived on (:class:`SenderCheck`), so a forged header cannot point acks anywhere else. To
make that hold for a sender bound to one address of several (loopback aliases, multi-homed
hosts), its PUSH connects from that address.

``security: curve`` puts ZeroMQ CURVE on every tcp data and ack socket: receivers are CURVE
servers with the pipeline's server key and a ZAP handler that admits only the client public keys
in the key folder; senders are CURVE clients that check the server key (a host that takes over a
name cannot read anything out). ``streampipe keys generate DIR`` writes the pairs.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

WILDCARDS = frozenset({"0.0.0.0", "::", "*", ""})
KEY_NAMES = ("server", "client")


# -- addresses -----------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_host(name: str) -> list[str]:
    """Every IPv4 address of ``name`` (an IP resolves to itself); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    return sorted({str(info[4][0]) for info in infos})


def resolve(names: list[str], port: int) -> list[str]:
    """The endpoints of every address of every name, sorted: ``tcp://ip:port``."""
    return sorted({f"tcp://{ip}:{port}" for name in names for ip in resolve_host(name)})


def host_of(endpoint: str) -> str:
    """``tcp://10.0.0.5:5555`` -> ``10.0.0.5`` (the destination of a ``src;dst`` endpoint)."""
    rest = endpoint.split("://", 1)[-1].split(";")[-1]
    return rest.rsplit(":", 1)[0].strip("[]")


def local_ip_towards(ip: str) -> str:
    """The address of this host's interface that routes to ``ip`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ip, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def advertised_host(advertise: str | None, bind_host: str, towards: list[str]) -> str:
    """The host receivers reach this stage's ack socket at."""
    if advertise:
        return advertise
    if bind_host not in WILDCARDS:
        return bind_host
    return local_ip_towards(host_of(towards[0])) if towards else "127.0.0.1"


def connect_from(endpoint: str, bind_host: str) -> str:
    """``endpoint`` connected from ``bind_host`` when the stage is bound to one address."""
    if bind_host in WILDCARDS or not endpoint.startswith("tcp://"):
        return endpoint
    return f"tcp://{bind_host}:0;{endpoint[len('tcp://'):]}"


class SenderCheck:
    """A container of the ack endpoints a batch from ``peer`` may name: those on ``peer`` itself."""

    def __init__(self, peer: str | None) -> None:
        self.peer = peer

    def __contains__(self, endpoint: object) -> bool:
        if not isinstance(endpoint, str) or not endpoint.startswith("tcp://") or self.peer is None:
            return False
        host = host_of(endpoint)
        return host == self.peer or self.peer in resolve_cached(host)


_RESOLVED: dict[str, tuple[float, list[str]]] = {}


def resolve_cached(host: str, ttl: float = 5.0) -> list[str]:
    """A name's addresses, looked up at most every ``ttl`` s (a header names its sender's host)."""
    now = time.monotonic()
    hit = _RESOLVED.get(host)
    if hit is None or now - hit[0] > ttl:
        if len(_RESOLVED) > 1024:
            _RESOLVED.clear()
        hit = _RESOLVED[host] = (now, resolve_host(host))
    return hit[1]


class Resolver:
    """Re-resolves the names of a stage's output edges every ``interval`` s, in a daemon thread
    (a slow DNS server must not stall the processing loop). The loop picks up ``endpoints`` when
    ``version`` changes."""

    def __init__(self, targets: dict[str, tuple[list[str], int]], interval: float) -> None:
        self.targets, self.interval = targets, interval
        self.endpoints: dict[str, list[str]] = {edge: resolve(names, port) for edge, (names, port) in targets.items()}
        self.version = 1
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="resolver", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stopped.wait(self.interval):
            fresh = {edge: resolve(names, port) for edge, (names, port) in self.targets.items()}
            if fresh != self.endpoints:
                for edge, eps in fresh.items():
                    if eps != self.endpoints.get(edge):
                        logger.info(f"{edge}: {self.targets[edge][0]} now resolves to {eps or 'nothing'}")
                self.endpoints = fresh     # one reference swap: the loop reads it whole
                self.version += 1

    def stop(self) -> None:
        self.stopped.set()


# -- reachability ----------------------------------------------------------------------------

class Reach:
    """Which endpoints of a PUSH socket have a live, handshaken connection (a socket monitor)."""

    _made = itertools.count()

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        # a name of our own: pyzmq's default names the socket's fd, which a socket opened after
        # another one closed gets again while the old monitor's inproc name may still be bound
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                                               | zmq.EVENT_MONITOR_STOPPED,
                                               addr=f"inproc://streampipe.reach.{next(Reach._made)}")
        self.up: set[str] = set()
        self.none_since: float | None = time.monotonic()
        # the order of events read, for :meth:`reconnected_since`
        self.events = 0
        self.last_drop = self.last_handshake = -1

    def update(self, now: float) -> None:
        while True:
            try:
                frames = self.monitor.recv_multipart(flags=zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                break
            try:
                event = parse_monitor_message(frames)
            except Exception:
                continue
            endpoint = event["endpoint"].decode(errors="replace") if isinstance(event["endpoint"], bytes) else str(event["endpoint"])
            self.note(event["event"], endpoint)
        if self.up:
            self.none_since = None
        elif self.none_since is None:
            self.none_since = now

    def note(self, kind: int, endpoint: str) -> None:
        """One monitor event (``zmq.EVENT_*``), in the order the I/O thread posted it."""
        self.events += 1
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up.add(endpoint)
            self.last_handshake = self.events
        elif kind == zmq.EVENT_DISCONNECTED:
            self.up.discard(endpoint)
            self.last_drop = self.events

    def mark(self, now: float) -> int:
        """A point in this socket's history, every event the I/O thread has posted so far included."""
        self.update(now)
        return self.events

    def reconnected_since(self, mark: int) -> bool:
        """Whether, since ``mark``, the connection went down and a handshake was made after that:
        another process at the address (the one there at ``mark`` never handshakes again unless
        its connection dropped first)."""
        return mark < self.last_drop < self.last_handshake

    def forget(self, endpoint: str) -> None:
        self.up.discard(endpoint)

    def unreachable(self, now: float, after: float) -> bool:
        return self.none_since is not None and now - self.none_since > after

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)


# -- CURVE -----------------------------------------------------------------------------------

def generate_keys(folder: Path) -> list[Path]:
    """Write the pipeline's server and client key pairs into ``folder`` (0700; secrets 0600)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    written = []
    for name in KEY_NAMES:
        public, secret = zmq.auth.create_certificates(str(folder), name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


class Curve:
    """The key folder of a pipeline: its server pair, its client pair, the admitted client keys."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self.server_public, self.server_secret = zmq.auth.load_certificate(str(folder / "server.key_secret"))
            self.client_public, self.client_secret = zmq.auth.load_certificate(str(folder / "client.key_secret"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the CURVE keys in {folder}: {exc} "
                             f"(make them with `streampipe keys generate {folder}`)") from None
        if self.server_secret is None or self.client_secret is None:
            raise ValueError(f"{folder}: server.key_secret and client.key_secret must hold secret keys")
        self.auth: Any = None
        self.log = _ZapLog()

    def serve(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def client(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret

    def start_authenticator(self, ctx: zmq.Context[Any]) -> None:
        """A ZAP handler (a thread of this process) admitting the public keys in the folder."""
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(ctx, log=self.log)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(self.folder))

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


class _ZapLog:
    """zmq.auth's logger: denied handshakes are counted (``denied``) and logged rate-limited."""

    def __init__(self) -> None:
        self.last = 0.0
        self.dropped = 0
        self.denied = 0

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        text = msg % args if args else msg
        if text.startswith("DENIED"):
            self.denied += 1
            self.warning(text)

    info = debug

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            self.dropped += 1
            return
        self.last = now
        logger.warning(f"CURVE: {msg % args if args else msg}" + (f" ({self.dropped} more)" if self.dropped else ""))
        self.dropped = 0

    error = warning
    exception = warning
