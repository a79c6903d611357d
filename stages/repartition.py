"""``python -m streampipe.stages.repartition SPEC``: re-deal a source's saved positions to a new replica count.

The supervisor runs this in a short child process (it never imports a user's stage code) before
it starts a source whose saved positions were taken with another ``replicas`` than the config
now says. ``SPEC`` is a JSON object: ``name``, ``type``, ``config_dir``, ``run_dir``, ``replicas``.

The source's class decides how its positions split: a classmethod
``repartition(states: list[dict], replicas: int) -> list[dict]`` gets every old replica's saved
state (``{}`` for a replica that never saved) and returns one state per new replica, which must
together hold exactly the records the old ones had left (the built-in generator's does, see
:mod:`streampipe.stages.segments`). The new states are written at once, as one file under a new
``generation`` (:func:`stages.state.write_layout`). A source whose every replica completed stays
completed, whatever its class. A class without ``repartition`` is refused with a message that
says what to do (on stdout as JSON, see :func:`main`), which the supervisor shows as the
stage's error.

A transform partitioned by key (``partition: key``, ``"keyed": true`` in ``SPEC``) is re-dealt
the same way when its replica count changes (:func:`rescale`): its state by key group, so the
new owner of a key holds that key's state, and the applied ids of all its old replicas. The
supervisor runs it with every replica of the stage stopped (drained or not yet started).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from streampipe.stages.keys import deal
from streampipe.stages.registry import load_target
from streampipe.stages.seen import SeenByOrigin
from streampipe.stages.state import read_layout, write_layout

EXIT_DONE = 0
EXIT_REFUSED = 2


class Refused(Exception):
    """The positions cannot be repartitioned; the message says what the user can do."""


def repartition(name: str, type_: str, config_dir: Path, run_dir: Path, replicas: int, keyed: bool = False) -> str:
    """Re-deal ``name``'s saved positions (``keyed``: a transform's keyed state) to ``replicas``
    replicas; returns what was done."""
    state_dir = run_dir / "state"
    layout = read_layout(state_dir, name)
    if layout is None or not layout.differs(replicas):
        return f"{name}: nothing to repartition"
    generation = layout.generation + 1
    if keyed:
        write_layout(state_dir, name, generation, rescale(name, type_, config_dir, layout.entries, replicas))
        return f"{name}: keyed state of {layout.replicas} replicas re-dealt to {replicas} by key group (generation {generation})"
    if layout.completed:
        write_layout(state_dir, name, generation, [{"state": {}, "completed": True}] * replicas)
        return f"{name}: completed stream, now {replicas} completed replicas (generation {generation})"
    cls = load_target(type_, config_dir)
    split = getattr(cls, "repartition", None)
    if not callable(split):
        raise Refused(
            f"{name}: its saved positions are for {layout.replicas} replicas and services.yaml now says {replicas}, "
            f"but {type_} cannot repartition them (it has no `repartition(states, replicas)` classmethod). "
            f"Set `replicas: {layout.replicas}` back, or delete {state_dir}/{name}.*.msgpack to start its stream over.")
    states = split([e["state"] for e in layout.entries], replicas)
    if not isinstance(states, list) or len(states) != replicas or not all(isinstance(s, dict) for s in states):
        raise Refused(f"{name}: {type_}.repartition must return a list of {replicas} dicts, got {states!r:.200}")
    write_layout(state_dir, name, generation, [{"state": s, "completed": False} for s in states])
    return f"{name}: positions of {layout.replicas} replicas repartitioned to {replicas} (generation {generation})"


def rescale(name: str, type_: str, config_dir: Path, entries: list[dict[str, Any]], replicas: int) -> list[dict[str, Any]]:
    """A stage partitioned by key: every old replica's saved state re-dealt to ``replicas``
    replicas, each new one holding exactly the keys it now owns (:func:`stages.keys.replica_of_key`).

    Its keyed state (``StageContext.state`` of a stage with ``keyed_state = True``) is dealt here,
    pair by pair; its own ``snapshot()`` by its class's ``rescale(states, replicas)``. Every new
    replica gets the union of the record ids and input batches the old ones had applied: a record
    resent later is then known as applied by whichever replica owns its key now; and the senders
    whose end of stream every old replica had (that sender has sent all it will, to every key).
    """
    old = [e.get("state") or {} for e in entries]
    if any(old):
        split = getattr(load_target(type_, config_dir), "rescale", None)
        if not callable(split):
            raise Refused(
                f"{name}: its saved state is for {len(entries)} replicas and services.yaml now says {replicas}, but "
                f"{type_} cannot re-deal it by key (it has no `rescale(states, replicas)` classmethod; or keep "
                f"per-key state in `self.context.state` with `keyed_state = True`, which the runtime re-deals). "
                f"Set `replicas: {len(entries)}` back, or delete {name}.*.msgpack in the state folder to start it afresh.")
        states = split(old, replicas)
        if not isinstance(states, list) or len(states) != replicas or not all(isinstance(st, dict) for st in states):
            raise Refused(f"{name}: {type_}.rescale must return a list of {replicas} dicts, got {states!r:.200}")
    else:
        states = [{} for _ in range(replicas)]
    pairs = [p for e in entries for p in e.get("keyed") or [] if isinstance(p, list) and len(p) == 2]
    keyed = deal(pairs, replicas, key_of=lambda p: p[0])
    ids = SeenByOrigin.union([e.get("ids") or {} for e in entries])
    acked = sorted({tuple(k) for e in entries for k in e.get("acked") or [] if isinstance(k, list)})
    # a sender whose end of stream every old replica had has sent all it will, to every key: each new one has it
    heard = set.intersection(*(set(e.get("eos") or []) for e in entries)) if entries else set()
    return [{"state": st, "completed": False, "ids": ids, "acked": [list(k) for k in acked], "keyed": keyed[i],
             "eos": sorted(heard)} for i, st in enumerate(states)]


def main(argv: list[str]) -> int:
    """Prints one JSON line, ``{"ok": true, "message": ...}`` or ``{"ok": false, "error": ...}``:
    the supervisor reads the answer there, since its SIGCHLD handler may reap the exit status."""
    spec: dict[str, Any] = json.loads(argv[1])
    try:
        done = repartition(spec["name"], spec["type"], Path(spec["config_dir"]), Path(spec["run_dir"]), int(spec["replicas"]),
                           bool(spec.get("keyed")))
    except Refused as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return EXIT_REFUSED
    print(json.dumps({"ok": True, "message": done}), flush=True)
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main(sys.argv))
