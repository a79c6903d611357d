"""What the broker connectors share: payload decoding, capped backoff, an asyncio loop in a thread.

The connectors themselves: :mod:`streampipe.stages.builtins.nats_streams` (NATS JetStream) and
:mod:`streampipe.stages.builtins.redis_streams` (Redis / Valkey Streams).

>>> decode(b'{"x": 1}')
{'x': 1}
>>> decode(b'[1]')
Traceback (most recent call last):
...
ValueError: a JSON list, not an object
>>> b = Backoff(0.05, 0.2); [b.next() for _ in range(4)]
[0.05, 0.1, 0.2, 0.2]
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson

from streampipe.stages.api import Record

T = TypeVar("T")
BACKOFF_INITIAL_S = 0.05      # a reconnect is tried after 50 ms, doubling ...
BACKOFF_MAX_S = 1.0           # ... to 1 s: a server back is used within a second
LOOP_START_TIMEOUT_S = 10.0   # the loop thread is up in ~1 ms; a loaded machine gets far more


class Backoff:
    """Capped exponential delays: ``next()`` gives the delay to wait now, ``reset()`` after a success."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_MAX_S) -> None:
        self.initial, self.cap = initial, cap
        self.delay = initial

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.initial


def check_url(url: str, schemes: str, example: str) -> str:
    """``url`` if it is a URL of one of ``schemes`` (``"redis|rediss"``); ValueError naming ``example`` if not."""
    if not isinstance(url, str) or not re.fullmatch(rf"({schemes})://[^\s]*", url):
        raise ValueError(f"url {url!r} is not a URL of {schemes.replace('|', ', ')}, e.g. {example}")
    return url


def safe_url(url: str) -> str:
    """A URL to show: its password masked.

    >>> safe_url("redis://app:secret@127.0.0.1:6379/0")
    'redis://app:***@127.0.0.1:6379/0'
    """
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def decode(data: bytes) -> Record:
    """A message's payload as a record: a JSON object; ValueError says why not."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def encode(record: Record) -> bytes:
    """A record as a message's payload (JSON; numpy values as Python ones)."""
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def printable(data: bytes, limit: int = 2000) -> str:
    """A payload for the dead-letter file."""
    return data[:limit].decode(errors="replace")


class LoopThread:
    """An asyncio event loop in a daemon thread: an async client (nats-py) lives there, and the
    stage's own thread hands it coroutines with :meth:`run` (wait for the result, bounded) or
    :meth:`spawn` (do not wait)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name=name, daemon=True)
        self.thread.start()
        if not started.wait(LOOP_START_TIMEOUT_S):
            raise RuntimeError(f"{name}: the event loop thread did not start")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            try:
                self.run(cancel_all(), timeout)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()
