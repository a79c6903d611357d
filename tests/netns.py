"""Test hosts made of Linux network namespaces: a private network only these tests can see.

Each host is a network namespace with one veth interface and one address on ``10.<a>.<b>.0/24``;
the other ends of the veth pairs sit on a bridge inside a namespace of their own, so the
machine's own namespace gains no interface and no route, and no packet leaves the test network.
``ip netns exec NS`` bind-mounts ``/etc/netns/NS/hosts`` over ``/etc/hosts`` for what it starts:
that file is each host's "DNS", rewritten in place (the same inode, so running processes see
the change) to add or remove a name's addresses. Everything is removed by :meth:`Hosts.close`.

Needs root (CI runs as root); :func:`skip_reason` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")       # where `ip netns add` keeps a namespace's handle
CLONE_NEWNET = 0x40000000            # setns(2): join a network namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def skip_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"spprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Hosts on one private /24. ``add("a")`` -> its address; ``popen("a", argv)`` runs there."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"{os.getpid() % 100000}"
        pid = os.getpid()
        self.subnet = f"10.{200 + pid % 50}.{pid % 250}"
        self.bridge_ns = f"sp{self.tag}-br"
        self.hosts: dict[str, tuple[str, str]] = {}     # name -> (namespace, address)
        self.names: dict[str, list[str]] = {}           # the hosts files: name -> addresses
        self.procs: list[subprocess.Popen[bytes]] = []
        _ip("netns", "add", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")

    def add(self, name: str) -> str:
        index = len(self.hosts) + 1
        ns, addr = f"sp{self.tag}-{name}", f"{self.subnet}.{index}"
        inner, outer = f"spi{self.tag}{index}"[-15:], f"spo{self.tag}{index}"[-15:]
        _ip("netns", "add", ns)
        _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        self.hosts[name] = (ns, addr)
        self.names.setdefault(name, [addr])
        self.write_hosts()
        return addr

    def address(self, name: str) -> str:
        return self.hosts[name][1]

    def set_name(self, name: str, addresses: list[str]) -> None:
        """Point ``name`` at ``addresses`` in every host's hosts file (several A records)."""
        self.set_names({name: addresses})

    def set_names(self, names: dict[str, list[str]]) -> None:
        """Several names at once, in one rewrite of the hosts files; a name with no address is gone."""
        for name, addresses in names.items():
            self.names[name] = list(addresses)
        self.write_hosts()

    def write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost"]
        lines += [f"{addr} {name}" for name, addrs in self.names.items() for addr in addrs]
        text = "\n".join(lines) + "\n"
        for ns, _ in self.hosts.values():
            path = NETNS_ETC / ns / "hosts"
            with open(path, "w") as f:      # in place: a running process's bind mount sees it
                f.write(text)

    def popen(self, host: str, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        ns = self.hosts[host][0]
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc   # ip netns exec execs argv: proc.pid is the command's own pid

    def run(self, host: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` to completion (e.g. an HTTP probe from inside its network)."""
        return subprocess.run(["ip", "netns", "exec", self.hosts[host][0], *argv], capture_output=True, text=True, timeout=timeout)

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """The calling thread joins ``host``'s network while inside: sockets it makes there are the
        host's (a network namespace is per thread: the process's other threads stay where they are).

        A socket keeps its namespace for life, so one made inside may be used after leaving.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as home, open(NETNS_RUN / self.hosts[host][0]) as there:
            if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {host}: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns back from {host}: {os.strerror(ctypes.get_errno())}")

    def pids(self, host: str) -> list[int]:
        return self.pids_of(self.hosts[host][0])

    def remove(self, host: str) -> None:
        """Take a host off the network: its processes SIGKILLed, its namespace deleted."""
        ns, addr = self.hosts.pop(host)
        for pid in self.pids_of(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)

    @staticmethod
    def pids_of(ns: str) -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        for host in list(self.hosts):
            self.remove(host)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        _ip("netns", "del", self.bridge_ns, check=False)
