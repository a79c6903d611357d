"""Files a stage writes that must survive a SIGKILL at any instant.

- :func:`atomic_write`: temp file in the same folder, fsync, rename, fsync the folder. A reader
  sees the old file or the new one, never half of one.
- :func:`save_state` / :func:`load_state`: a stage's snapshot as msgpack, written atomically; a
  file that does not decode is ignored with a warning (it cannot be half-written, but it can be
  from another version or hand-edited).
- :func:`load_replica_state` / :func:`read_layout` / :func:`write_layout`: a source's saved
  positions and the layout they were taken under (its replica count and ``generation``), so that
  a change of ``replicas`` is repartitioned instead of skipping or repeating ids.
- :class:`DeadLetters`: ``<run dir>/deadletter/<stage>.jsonl``, one JSON object a line with the
  record, the error and the time, written at once. The replicas of a stage share the file; it
  rotates at ``logging.file_max_mb`` and keeps ``logging.retention`` rotated files (see
  :mod:`streampipe._rotating`); the lines in a rotated file deleted by retention are counted as
  ``dead_letters_dropped`` in ``status``. Each line has a ``key`` (its identity, for a replay),
  and a record rejected by the stage's own processing the ``input`` it came from (``stage.replica``).
- :func:`read_dead_letters` / :func:`pending_replays` / :class:`ReplayLedger`: what
  ``streampipe deadletter`` lists and replays; ``<run dir>/deadletter/<stage>.replayed`` holds
  the key of every dead letter replayed (fsynced before it counts), so none is replayed twice.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streampipe._rotating import RotatingFile, files_of

# wire (numpy) and loguru are imported where they are used: the CLI imports this module through
# launcher/rundir.py (atomic_write), and `streampipe status` must not pay ~250 ms for them.


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _warn(message: str) -> None:
    from loguru import logger

    logger.warning(message)


# atomic_write's temp names: mkstemp's 8 random characters between ".<name>." and ".tmp"
_INTERRUPTED = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_interrupted_writes(folder: Path) -> list[Path]:
    """Delete the temp files that writes interrupted by a SIGKILL left under ``folder`` (each
    of them the unfinished copy of a file whose old version is still in place); return them.

    Only when nothing writes there: the supervisor calls it on its run directory when it claims
    it, before any stage starts. Symlinks are not followed.
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in files:
            if _INTERRUPTED.fullmatch(name):
                path = Path(root) / name
                try:
                    path.unlink()
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


def save_state(path: Path, state: dict[str, Any]) -> None:
    from streampipe.stages import wire

    atomic_write(path, wire.packb(state))


def load_state(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    from streampipe.stages import wire

    try:
        state = wire.unpackb(data)
    except ValueError:
        _warn(f"ignoring unreadable state file {path}")
        return None
    return state if isinstance(state, dict) else None


# -- a stage's saved state, per replica, and its layout ------------------------------------------
#
# <run dir>/state/<stage>.<r>.msgpack     {"state": {...}, "completed": bool, "generation": g, "replicas": n}
# <run dir>/state/<stage>.layout.msgpack  {"generation": g, "replicas": n, "states": [{"state", "completed"}, ...]}
#
# A replica file is what one replica committed; the layout file is written (atomically, all
# replicas at once) only by a repartition, which bumps ``generation``. A replica file older than
# the layout file is stale: the replica starts from its entry in the layout file instead. So a
# crash during a repartition leaves either the old layout or the new one, never a mix.


@dataclass
class Layout:
    """The positions of every replica of a stage as of now, and the layout they belong to."""

    generation: int
    replicas: int | None              # None: files from before the count was saved; taken to match the config
    entries: list[dict[str, Any]]     # per replica: {"state": dict, "completed": bool} (a transform: and TRANSFORM_PARTS)

    def differs(self, replicas: int) -> bool:
        """Whether these positions were taken with another replica count than ``replicas``."""
        return self.replicas is not None and self.replicas != replicas

    @property
    def completed(self) -> bool:
        return bool(self.entries) and all(e["completed"] for e in self.entries)


def replica_file(state_dir: Path, name: str, replica: int) -> Path:
    return state_dir / f"{name}.{replica}.msgpack"


def layout_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.layout.msgpack"


def _generation(saved: dict[str, Any]) -> int:
    gen = saved.get("generation", 0)
    return gen if isinstance(gen, int) else 0


# what a stateful transform's file holds beside its stage's own state (the runtime's share, see
# stages/ackpoints.py): the record ids it applied, the batches its state holds, its keyed state,
# the senders whose end of stream it has (stages/runtime/ending.py)
TRANSFORM_PARTS = ("ids", "acked", "keyed", "eos")


def _entry(saved: Any) -> dict[str, Any]:
    saved = saved if isinstance(saved, dict) else {}
    state = saved.get("state")
    entry = {"state": state if isinstance(state, dict) else {}, "completed": bool(saved.get("completed"))}
    entry.update({part: saved[part] for part in TRANSFORM_PARTS if part in saved})
    return entry


def load_replica_state(state_dir: Path, name: str, replica: int) -> dict[str, Any] | None:
    """What replica ``replica`` of ``name`` restores: its own file, or its entry in a newer layout.

    None when nothing was saved for it (a fresh start).
    """
    own = load_state(replica_file(state_dir, name, replica))
    doc = load_state(layout_file(state_dir, name))
    if doc is not None and (own is None or _generation(own) < _generation(doc)):
        states = doc.get("states") or []
        if replica >= len(states):
            return None
        return {**_entry(states[replica]), "generation": _generation(doc), "replicas": len(states)}
    return own


def read_layout(state_dir: Path, name: str) -> Layout | None:
    """Every replica's current position and the replica count they were taken with (None: nothing saved).

    Without a layout file (no repartition yet) the replica count is the ``replicas`` each file
    recorded. Files from before that field existed cannot say (a replica that never saved leaves
    no file): their count is None, taken to be the configured one, as it was then.
    """
    files: dict[int, dict[str, Any]] = {}
    for path in state_dir.glob(f"{glob.escape(name)}.*.msgpack"):
        index = path.name[len(name) + 1:-len(".msgpack")]
        if index.isdigit() and (saved := load_state(path)) is not None:
            files[int(index)] = saved
    doc = load_state(layout_file(state_dir, name))
    replicas: int | None
    if doc is not None:
        generation, base = _generation(doc), [_entry(e) for e in doc.get("states") or []]
        replicas = len(base)
    elif files:
        generation = max(_generation(f) for f in files.values())
        current = {i: f for i, f in files.items() if _generation(f) == generation}
        recorded = [f["replicas"] for f in current.values() if isinstance(f.get("replicas"), int)]
        replicas = max(recorded) if recorded else None
        base = []
    else:
        return None
    entries = []
    for r in range(max(files, default=-1) + 1 if replicas is None else replicas):
        own = files.get(r)
        if own is not None and _generation(own) >= generation:
            entries.append(_entry(own))
        else:
            entries.append(base[r] if r < len(base) else _entry(None))
    return Layout(generation, replicas, entries)


def write_layout(state_dir: Path, name: str, generation: int, entries: list[dict[str, Any]]) -> None:
    """Replace every replica's position at once (one atomic file) under a new ``generation``."""
    save_state(layout_file(state_dir, name), {"generation": generation, "replicas": len(entries),
                                              "states": [_entry(e) for e in entries]})


def json_default(obj: Any) -> Any:
    """JSON for what msgpack carries but json does not (bytes, numpy scalars)."""
    if isinstance(obj, bytes):
        return obj.hex()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


class DeadLetters:
    """The dead-letter file of one stage (shared by its replicas); opened on first use."""

    def __init__(self, path: Path, ident: str, max_bytes: int = 10 * 2**20, keep: int = 5) -> None:
        self.path, self.ident = path, ident
        self.dropped = 0      # dead letters deleted with a rotated file beyond retention
        self._file = RotatingFile(path, max_bytes, keep, on_drop=self._dropped)

    def write(self, record: Any, error: str, tb: str = "", source: str | None = None, replay_of: str | None = None) -> None:
        entry = {"key": secrets.token_hex(8), "time": time.time(), "stage": self.ident, "error": error}
        if source is not None:
            entry["input"] = source         # the replica it came from: a record the stage itself took in
        if replay_of is not None:
            entry["replay_of"] = replay_of  # the dead letter whose replay failed again
        entry["record"] = record
        if tb:
            entry["traceback"] = tb
        self._file.write(json.dumps(entry, default=json_default) + "\n")

    def _dropped(self, lines: int) -> None:
        self.dropped += lines
        _warn(f"{lines} dead letters deleted with the oldest rotated file of {self.path.name} "
              f"(logging.retention); {self.dropped} so far")

    def close(self) -> None:
        self._file.close()


# -- reading dead letters, and the replays done ----------------------------------------------------

def dead_letter_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "deadletter" / f"{stage}.jsonl"


@dataclass(frozen=True)
class DeadLetter:
    """One line of a stage's dead-letter file."""

    key: str                # its identity: written with it (older lines: a digest of the line)
    time: float
    replica: str            # the replica that rejected it, ``stage.replica``
    error: str
    input: str | None       # the replica it came from; None: not a record the stage took in (a source's, an output)
    replay_of: str | None   # the dead letter whose replay failed again, if it is one
    record: Any
    traceback: str

    @property
    def replayable(self) -> bool:
        return self.input is not None


def read_dead_letters(run_dir: Path, stage: str) -> list[DeadLetter]:
    """Every dead letter of ``stage`` still on disk, oldest first (rotated files too); torn lines skipped."""
    out = []
    for path in files_of(dead_letter_path(run_dir, stage)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:      # deleted by retention meanwhile
            continue
        for line in data.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            key = row["key"] if isinstance(row.get("key"), str) else hashlib.sha256(line).hexdigest()[:16]
            out.append(DeadLetter(key, float(row.get("time") or 0.0), str(row.get("stage", "")), str(row.get("error", "")),
                                  row["input"] if isinstance(row.get("input"), str) else None,
                                  row["replay_of"] if isinstance(row.get("replay_of"), str) else None,
                                  row.get("record"), str(row.get("traceback", ""))))
    return out


class ReplayLedger:
    """``<run dir>/deadletter/<stage>.replayed``: the keys of the dead letters replayed, one a line.

    A key is appended (and fsynced) once its record is settled: its outputs acknowledged end to
    end, or the record dead-lettered again (that new line names it in ``replay_of``)."""

    def __init__(self, run_dir: Path, stage: str) -> None:
        self.path = Path(run_dir) / "deadletter" / f"{stage}.replayed"

    def keys(self) -> set[str]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return set()
        lines = text.split("\n")
        return {k for k in lines[:-1] if k}      # the last piece has no newline yet: a torn write, not a mark

    def mark(self, keys: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, "".join(f"{k}\n" for k in keys).encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def pending_replays(run_dir: Path, stage: str, letters: list[DeadLetter] | None = None) -> list[DeadLetter]:
    """The dead letters of ``stage`` a replay sends: taken in by the stage, not replayed yet (a
    dead letter whose replay failed again counts as replayed: the new line is pending instead)."""
    letters = read_dead_letters(run_dir, stage) if letters is None else letters
    done = ReplayLedger(run_dir, stage).keys() | {d.replay_of for d in letters if d.replay_of}
    return [d for d in letters if d.replayable and d.key not in done]
