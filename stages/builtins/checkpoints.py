"""Versioned model checkpoints, written by the trainer and read by the trainer, evaluator and report.

One version is two files in the checkpoint folder (``<run dir>/checkpoints`` by default)::

    model-000042.joblib   the estimator, joblib-pickled
    model-000042.json     its metadata: version, records_seen, metric at save, estimator, params,
                          features, classes, time, and the model file's size and SHA-256

Each file is written atomically (temp file, fsync, rename: :func:`stages.state.atomic_write`),
the model first and the metadata second, so the metadata is the commit mark: a SIGKILL between
the two leaves a model without metadata, an *incomplete* version that no reader loads. A version
is *valid* when its metadata parses, the model file has the size and SHA-256 the metadata
records, and ``joblib.load`` works; an invalid one is skipped with a warning, never loaded.
Version numbers only grow: the next version is the highest number present + 1, valid or not.

``joblib.load`` unpickles, which runs code: load checkpoints only from a folder you trust.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = save(d, 1, {"weights": [1, 2]}, {"records_seen": 10})
>>> _ = save(d, 2, {"weights": [3, 4]}, {"records_seen": 20})
>>> _ = model_path(d, 2).write_bytes(b"torn")           # damage the newest
>>> cp = load_newest(d, warn=False)
>>> cp.version, cp.meta["records_seen"], cp.model, latest_version(d)
(1, 10, {'weights': [1, 2]}, 2)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from streampipe.stages.state import atomic_write, json_default

NAME = re.compile(r"^model-(\d+)\.(joblib|json)$")
WIDTH = 6            # model-000042: sorts by name up to a million versions, and reads easily
TEMP_PREFIX = ".model-"   # atomic_write's temp files: ".model-000042.joblib.<random>.tmp"


class CheckpointError(Exception):
    """A checkpoint version that cannot be loaded (incomplete, damaged, or unreadable)."""


@dataclass
class Checkpoint:
    version: int
    meta: dict[str, Any]
    model: Any


def model_path(folder: Path, version: int) -> Path:
    return folder / f"model-{version:0{WIDTH}d}.joblib"


def meta_path(folder: Path, version: int) -> Path:
    return folder / f"model-{version:0{WIDTH}d}.json"


def scan(folder: Path) -> dict[int, set[str]]:
    """Every version number present in ``folder`` -> the suffixes found (``{"joblib", "json"}``)."""
    found: dict[int, set[str]] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        m = NAME.match(entry.name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def latest_version(folder: Path) -> int:
    """The highest version number present (complete or not), 0 when there is none."""
    return max(scan(folder), default=0)


def committed_versions(folder: Path) -> list[int]:
    """Versions whose metadata file exists (the commit mark), newest first. Nothing is read."""
    return sorted((v for v, kinds in scan(folder).items() if "json" in kinds), reverse=True)


def save(folder: Path, version: int, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Write version ``version``: the model file, then its metadata. Returns the metadata written."""
    import joblib  # here, not at module level, so that importing the trainer stays fast (see there)

    buf = io.BytesIO()
    joblib.dump(model, buf)
    data = buf.getvalue()
    path = model_path(folder, version)
    atomic_write(path, data)
    meta = {**meta, "version": version, "model_file": path.name, "model_bytes": len(data),
            "model_sha256": hashlib.sha256(data).hexdigest()}
    meta.setdefault("time", time.time())
    atomic_write(meta_path(folder, version), json.dumps(meta, indent=1, sort_keys=True, default=json_default).encode())
    return meta


def read_meta(folder: Path, version: int) -> dict[str, Any]:
    """The metadata of one version; :class:`CheckpointError` if absent or not a JSON object."""
    try:
        meta = json.loads(meta_path(folder, version).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"version {version}: no metadata file (incomplete checkpoint)") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"version {version}: unreadable metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"version {version}: metadata is not a JSON object")
    return meta


def load(folder: Path, version: int) -> Checkpoint:
    """Load one version, checking it first; :class:`CheckpointError` says why it is not valid."""
    meta = read_meta(folder, version)
    try:
        data = model_path(folder, version).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"version {version}: model file missing") from None
    except OSError as exc:
        raise CheckpointError(f"version {version}: unreadable model file: {exc}") from None
    if "model_bytes" in meta and len(data) != meta["model_bytes"]:
        raise CheckpointError(f"version {version}: model file has {len(data)} bytes, metadata says {meta['model_bytes']}")
    if "model_sha256" in meta and hashlib.sha256(data).hexdigest() != meta["model_sha256"]:
        raise CheckpointError(f"version {version}: model file does not match its SHA-256")
    import joblib

    try:
        model = joblib.load(io.BytesIO(data))
    except Exception as exc:  # unpickling can fail in any way: all of them mean "not valid"
        raise CheckpointError(f"version {version}: joblib.load failed: {type(exc).__name__}: {exc}") from None
    return Checkpoint(version, meta, model)


def load_newest(folder: Path, above: int = 0, skip: set[int] | None = None, warn: bool = True) -> Checkpoint | None:
    """The newest valid checkpoint with a version > ``above``, or None.

    Invalid versions are skipped (with a loguru warning when ``warn``) and added to ``skip``
    when a set is given, so a caller that polls does not retry them.
    """
    for version in committed_versions(folder):
        if version <= above:
            break
        if skip is not None and version in skip:
            continue
        try:
            return load(folder, version)
        except CheckpointError as exc:
            if warn:
                logger.warning(f"skipping checkpoint in {folder}: {exc}")
            if skip is not None:
                skip.add(version)
    return None


def prune(folder: Path, keep: int) -> list[int]:
    """Keep the ``keep`` newest complete versions; delete every other one, incomplete leftovers too.

    Only the single writer may call this, after a save (an incomplete version is then never one
    being written). Metadata goes first, so a version half-pruned by a SIGKILL is incomplete.
    """
    found = scan(folder)
    kept = set(sorted((v for v, kinds in found.items() if "json" in kinds), reverse=True)[:keep])
    removed = sorted(v for v in found if v not in kept)
    for version in removed:
        for path in (meta_path(folder, version), model_path(folder, version)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    return removed


def clean_temp(folder: Path) -> None:
    """Remove temp files left by a writer killed mid-write (only the single writer may call this)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(".tmp"):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


def history(folder: Path) -> list[dict[str, Any]]:
    """The metadata of every version still present whose metadata parses, oldest first (no unpickling)."""
    out = []
    for version in sorted(committed_versions(folder)):
        try:
            out.append(read_meta(folder, version))
        except CheckpointError:
            continue
    return out
