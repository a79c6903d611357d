"""``streampipe deadletter list|replay STAGE``: a stage's dead letters, and their replay.

The dead letters are read from ``<run dir>/deadletter/<stage>.jsonl`` (and its rotated files)
with :func:`streampipe.stages.state.read_dead_letters`; the replay is carried out by a replica of
the running stage (:mod:`streampipe.stages.runtime.replay`), told by the supervisor. This side
asks for it, then follows ``<stage>.replayed`` until every dead letter it saw pending has
settled: that knowledge, not a quiet period, says the replay is done; the timeout only bounds
the wait (run the command again to go on: nothing is delivered twice).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from streampipe.launcher.control import request
from streampipe.stages.state import DeadLetter, ReplayLedger, json_default, pending_replays, read_dead_letters

REPLAY_POLL_S = 0.2          # how often the CLI reads <stage>.replayed while it waits
RECORD_SHOWN = 120           # characters of a record in the table (--records)


def states(run_dir: Path, stage: str, letters: list[DeadLetter]) -> dict[str, str]:
    """Each dead letter's state: ``pending``, ``replayed``, ``failed again`` or ``not replayable``."""
    replayed = ReplayLedger(run_dir, stage).keys()
    again = {d.replay_of for d in letters if d.replay_of}
    out = {}
    for d in letters:
        if not d.replayable:
            out[d.key] = "not replayable"
        elif d.key in again:
            out[d.key] = "failed again"
        elif d.key in replayed:
            out[d.key] = "replayed"
        else:
            out[d.key] = "pending"
    return out


def show(run_dir: Path, stage: str, console: Console, *, records: bool = False, as_json: bool = False) -> int:
    letters = read_dead_letters(run_dir, stage)
    state = states(run_dir, stage, letters)
    if as_json:
        for d in letters:
            console.print_json(json.dumps({**asdict(d), "state": state[d.key]}, default=json_default), indent=None)
        return 0
    if not letters:
        console.print(f"no dead letters of {escape(stage)} in {run_dir}", highlight=False)
        return 0
    table = Table(title=f"dead letters of {escape(stage)}", title_justify="left", header_style="bold")
    for col in ("key", "when", "replica", "input", "state", "reason"):
        table.add_column(col, overflow="fold")
    if records:
        table.add_column("record", overflow="fold")
    for d in letters:
        when = dt.datetime.fromtimestamp(d.time).strftime("%Y-%m-%d %H:%M:%S") if d.time else "-"
        row = [d.key, when, d.replica, d.input or "-", state[d.key], escape(d.error)]
        if records:
            text = json.dumps(d.record, default=json_default)
            row.append(escape(text if len(text) <= RECORD_SHOWN else text[:RECORD_SHOWN] + "..."))
        table.add_row(*row)
    console.print(table)
    counts: dict[str, int] = {}
    for s in state.values():
        counts[s] = counts.get(s, 0) + 1
    console.print(f"{len(letters)} dead letters: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                  + ("" if records else "  (records: --records or --json)"), highlight=False)
    return 0


def replay(run_dir: Path, stage: str, console: Console, *, timeout: float, wait: bool = True) -> int:
    """Ask the running stage to replay its pending dead letters; with ``wait``, until they settle."""
    pending = pending_replays(run_dir, stage)
    if not pending:
        console.print(f"nothing to replay: {stage} has no pending dead letters", highlight=False)
        return 0
    reply = request(run_dir, "replay", stage=stage)
    console.print(f"replaying {len(pending)} dead letters of {stage} through {reply['replica']}", highlight=False)
    if not wait:
        return 0
    keys = {d.key for d in pending}
    deadline = time.monotonic() + timeout
    while True:
        letters = read_dead_letters(run_dir, stage)
        again = {d.replay_of for d in letters if d.replay_of in keys}
        settled = (ReplayLedger(run_dir, stage).keys() & keys) | again
        if settled >= keys or time.monotonic() >= deadline:
            break
        time.sleep(REPLAY_POLL_S)
    left = len(keys - settled)
    console.print(f"{len(settled) - len(again & settled)} delivered, {len(again)} failed again "
                  f"(streampipe deadletter list {stage})", highlight=False)
    if left:
        console.print(f"{left} not settled within {timeout:g}s (outputs not acknowledged yet): run the replay again "
                      "to go on; none is delivered twice", highlight=False)
        return 1
    return 0


