"""Keys: which replica of a stage partitioned by key (``partition: key``) a record goes to, and the
ids a keyed stage makes for what it emits.

A key is hashed (CRC-32 of its canonical bytes, the same in every process and Python version)
into one of :data:`KEY_GROUPS` key groups, and a stage of ``n`` replicas owns contiguous ranges of
groups: replica ``i`` has groups ``[i * G / n, (i + 1) * G / n)``, as Flink deals key groups to
its parallel instances. Every sender agrees, so all records of one key reach one replica, and
the same one after any restart; a change of the replica count moves whole groups.

Keys are compared by value across types the way JSON carries them: ``5`` and ``"5"`` are
different keys, ``1`` and ``True`` too, ``1.0`` and ``1`` the same.

>>> replica_of_key("user-17", 2), replica_of_key("user-17", 2) == replica_of_key("user-17", 2)
(1, True)
>>> sorted({replica_of_key(k, 3) for k in range(100)})
[0, 1, 2]
>>> key_group(1.0) == key_group(1), key_group(1) == key_group("1"), key_group(True) == key_group(1)
(True, False, False)
>>> window_id("user-17", 60.0) == window_id("user-17", 60), 0 <= window_id("a", 0) < 2 ** 63
(True, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

KEY_GROUPS = 4096   # more groups than replicas will ever be: a rescale moves whole groups


class BadKey(ValueError):
    """A key that cannot be hashed the same way everywhere (a float that is not finite, an object)."""


def key_bytes(key: Any) -> bytes:
    """The canonical bytes of ``key``: a tag for its kind, then its value."""
    if isinstance(key, bool):
        return b"b1" if key else b"b0"
    if isinstance(key, int):
        return b"i" + str(key).encode()
    if isinstance(key, float):
        if not math.isfinite(key):
            raise BadKey(f"key {key!r} is not a finite number")
        return b"i" + str(int(key)).encode() if key.is_integer() else b"f" + repr(key).encode()
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"y" + key
    if isinstance(key, (list, tuple, dict)) or key is None:
        try:
            return b"j" + json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise BadKey(f"key {key!r:.80} cannot be a key: {exc}") from None
    raise BadKey(f"a key of type {type(key).__name__} cannot be hashed the same way in every process")


def key_group(key: Any) -> int:
    """The key group of ``key``, in ``[0, KEY_GROUPS)``."""
    return zlib.crc32(key_bytes(key)) % KEY_GROUPS


def replica_of_group(group: int, n: int) -> int:
    """The replica (of ``n``) that owns key group ``group``: contiguous ranges of groups."""
    return group * n // KEY_GROUPS


def replica_of_key(key: Any, n: int) -> int:
    return replica_of_group(key_group(key), n)


def deal(items: list[T], replicas: int, key_of: Callable[[T], Any]) -> list[list[T]]:
    """``items`` dealt to the replica (of ``replicas``) each one's key belongs to: what a keyed
    stage's ``rescale`` does with its per-key state when its replica count changes.

    >>> deal(["user-1", "a", 2, "b"], 2, key_of=lambda k: k)
    [['user-1', 2], ['a', 'b']]
    """
    out: list[list[T]] = [[] for _ in range(replicas)]
    for item in items:
        out[replica_of_key(key_of(item), replicas)].append(item)
    return out


def hashable(key: Any) -> Any:
    """A key as it was before msgpack turned its tuples into lists (a dict key again).

    >>> hashable(["u", [1, 2]]), key_bytes(hashable(["u", 1])) == key_bytes(["u", 1])
    (('u', (1, 2)), True)
    """
    return tuple(hashable(k) for k in key) if isinstance(key, list) else key


def window_id(key: Any, start: float) -> int:
    """A 63-bit id for the result of ``key``'s window starting at ``start``: the same in every
    process and every run, so the result made again after a crash is the same record to a sink."""
    digest = hashlib.blake2b(key_bytes(key) + b"@" + key_bytes(start), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
