"""Records that kill their stage: found by the deaths they cause, then isolated.

An exception in ``process`` costs only its record (the Processor retries the batch record by
record). A record that makes the process *die* (a segfault, ``os._exit``, the OOM killer) or
*hang* (``process`` never returns, so the heartbeats stop and the supervisor replaces the replica
as hung) leaves no exception to catch, and upstream sends its batch again after the restart: it
would die again, for ever.

So before each input batch the runtime notes, in a small file of its own
(``state/<stage>.<replica>.inflight``, overwritten in place, no fsync: it must survive a SIGKILL,
not a power cut), which batch it is processing, and after it that it is done. A process that
starts and finds a batch noted but not done knows that batch was in hand when its predecessor
died. That is knowledge, no clock:

1. the batch is a *suspect*: when it arrives again it is processed one record at a time, each
   record noted before it is processed;
2. a process that starts and finds a suspect's record noted but not done knows that record was
   in hand at the second death: the record is dead-lettered with the reason (the supervisor's
   word for the death, e.g. ``hung: no heartbeat for 10s``), and the rest of its batch goes on.

Several batches can be suspects at once (two poison records in two batches upstream holds at the
same time: the replica dies on one, restarts, dies on the other); each stays one until it goes
through. A poison record thus costs two restarts. A SIGKILL from outside that lands during a batch only
makes that batch a suspect (processed record by record once, with the same result); a record is
dead-lettered only if a second death lands while it alone is in hand.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "s.inflight"
>>> j = Journal(path, last_exit="")
>>> j.begin(("a", "e", 1, 7))                    # ... and the process dies here
>>> j = Journal(path, last_exit="hung"); j.is_suspect(("a", "e", 1, 7))
True
>>> j.begin(("a", "e", 1, 7), record=2)          # record by record now; it dies again on record 2
>>> j = Journal(path, last_exit="hung: no heartbeat for 10s"); j.culprit(("a", "e", 1, 7), 2), j.culprit(("a", "e", 1, 7), 1)
('hung: no heartbeat for 10s; the stage died twice with this record in hand, its batch, then it alone', None)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loguru import logger

from streampipe.stages import wire

SIZE = 16384      # the file's largest entry: a few hundred bytes a suspect
MAX_SUSPECTS = 8  # batches in hand at a death, not seen through again yet: the oldest goes first


class Journal:
    """What this replica has in hand (a batch, or one record of a suspect batch) and its suspects.

    A replica can die with one batch in hand, restart, and die again on *another* batch (two
    poison records in two batches upstream holds at once); each is a suspect until it goes
    through, so they are kept together, by batch key.
    """

    def __init__(self, path: Path, last_exit: str) -> None:
        self.path = path
        self.last_exit = last_exit or "the process died"
        self.suspects: dict[tuple[Any, ...], dict[int, str]] = {}   # batch key -> record index -> why dead-lettered
        before = self._read()
        for entry in before.get("suspects") or []:
            try:
                key, culprits = entry
                self.suspects[tuple(key)] = {int(i): str(w) for i, w in culprits}
            except (TypeError, ValueError):              # an entry this version cannot read: not a suspect
                continue
        in_hand, record = before.get("batch"), before.get("record")
        if isinstance(in_hand, list):                    # the predecessor died with it
            try:
                key = tuple(in_hand)
                culprits = self.suspects.setdefault(key, {})
            except TypeError:
                culprits = None
            if culprits is not None and isinstance(record, int):
                culprits[record] = (f"{self.last_exit}; the stage died twice with this record in hand, "
                                    "its batch, then it alone")
            elif culprits is not None:
                logger.warning(f"the last process died while processing a batch ({self.last_exit}): "
                               "if it comes again it is processed record by record")
        while len(self.suspects) > MAX_SUSPECTS:
            del self.suspects[next(iter(self.suspects))]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._write(None, None)

    def _read(self) -> dict[str, Any]:
        try:
            data = self.path.read_bytes()
            n = int.from_bytes(data[:4], "little")
            got = wire.unpackb(data[4:4 + n]) if 0 < n <= SIZE - 4 else {}
            return got if isinstance(got, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, batch: Any, record: int | None) -> None:
        body = wire.packb({"batch": batch, "record": record,
                           "suspects": [[list(k), [[i, w[:300]] for i, w in c.items()]] for k, c in self.suspects.items()]})
        if len(body) > SIZE - 4:        # huge keys: note nothing rather than a torn entry
            body = wire.packb({})
        os.pwrite(self.fd, len(body).to_bytes(4, "little") + body, 0)

    def is_suspect(self, key: tuple[Any, ...]) -> bool:
        return tuple(key) in self.suspects

    def culprit(self, key: tuple[Any, ...], record: int) -> str | None:
        """Why record ``record`` of batch ``key`` is dead-lettered without being processed, or None."""
        return self.suspects.get(tuple(key), {}).get(record)

    def begin(self, key: tuple[Any, ...], record: int | None = None) -> None:
        """``key``'s batch (or its record ``record``) is now in hand."""
        self._write(list(key), record)

    def end(self, key: tuple[Any, ...]) -> None:
        """``key``'s batch is done; a suspect that went through is forgotten."""
        self.suspects.pop(tuple(key), None)
        self._write(None, None)

    def close(self) -> None:
        os.close(self.fd)
