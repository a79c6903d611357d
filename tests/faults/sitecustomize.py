"""Fault injection into the supervisor's loops and the fork server, from outside the shipped
package (tests only).

A test that wants a supervisor loop to fail puts this folder first on ``PYTHONPATH`` and names
the loops in ``$STREAMPIPE_TEST_FAULTS`` (``tests/test_unwedged.py``: ``fault_env``), e.g.
``stages,control,health,history``: each named loop raises once, on its first turn; ``history*``
raises on every turn. Python imports ``sitecustomize`` at the start of every process, so this
runs in the CLI, the supervisor, the fork server and the stages alike; it only acts where
:mod:`streampipe.launcher.supervisor` is imported (the supervisor, in ``up`` or its detached
child), by wrapping the loop methods of ``Supervisor`` when that module has been executed.

``forkserver-stop:<stage>.<r>`` makes the fork server SIGSTOP itself once, right after it forked
that replica's stage and before it answers: the worst instant for a spawn timeout (a stage runs
that the supervisor never hears of). Once per run directory (a marker file in its ``state/``), so
the next server forks on (``tests/test_fencing.py``). ``middle-slow:<stage>.<r>`` makes the middle
process that forked that replica's stage wait 1 s before it answers and exits, as a middle
descheduled on a starved machine does: a stage that fails at once dies while it is still the
middle's child.

A loop's first turn is what it awaits before its work, as the supervisor's own loops do: a
message on the stages or the control socket (taken, so it is lost with the failure), or the
health or history interval. Then the wrapper raises ``RuntimeError``, which the supervisor
reports (``task-failed``) and restarts like any other failure of that loop.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any

ENV = "STREAMPIPE_TEST_FAULTS"
LOOPS = {"stages": "_serve_stages", "control": "_serve_control", "health": "_health_loop", "history": "_history_loop"}
FAULTS = {p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()}


def _take(point: str) -> bool:
    """Whether ``point`` fails now: once for ``point``, every time for ``point*``."""
    if point + "*" in FAULTS:
        return True
    if point in FAULTS:
        FAULTS.discard(point)
        return True
    return False


def _first_turn(module: ModuleType, point: str, sup: Any) -> Awaitable[Any]:
    """What the loop named ``point`` waits for before each turn's work."""
    if point == "stages":
        return sup.stage_sock.recv_multipart()
    if point == "control":
        return sup.control_sock.recv_multipart()
    if point == "health":
        return asyncio.sleep(sup.cfg.poll_interval)
    return asyncio.sleep(module.HISTORY_INTERVAL_S)


def _faulty(module: ModuleType, point: str, loop: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    async def run(sup: Any) -> None:
        if not _take(point):
            return await loop(sup)
        await _first_turn(module, point, sup)
        raise RuntimeError(f"fault injected at {point!r} by ${ENV}")

    return run


def _patch_supervisor(module: ModuleType) -> None:
    for point, name in LOOPS.items():
        if point in FAULTS or point + "*" in FAULTS:
            setattr(module.Supervisor, name, _faulty(module, point, getattr(module.Supervisor, name)))


def _stop_after_fork(request: dict[str, Any]) -> None:
    spec = json.loads(request.get("spec", "{}"))
    ident = f"{spec.get('name')}.{spec.get('replica')}"
    if f"forkserver-stop:{ident}" not in FAULTS:
        return
    marker = os.path.join(spec.get("run_dir", "."), "state", f".fault-forkserver-stop.{ident}")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGSTOP)


def _patch_forkserver(module: ModuleType) -> None:
    spawn = module.Middle.spawn
    answer = module._answer

    def slow_answer(pid_w: int, pid: int, request: dict[str, Any]) -> None:
        spec = json.loads(request.get("spec", "{}"))
        if f"middle-slow:{spec.get('name')}.{spec.get('replica')}" in FAULTS:
            import time
            time.sleep(1.0)       # a middle descheduled on a starved machine: its stage may die first
        answer(pid_w, pid, request)

    module._answer = slow_answer

    def spawn_then_stop(self: Any, request: dict[str, Any]) -> int:
        pid = spawn(self, request)
        _stop_after_fork(request)
        return pid

    module.Middle.spawn = spawn_then_stop


TARGETS: dict[str, Callable[[ModuleType], None]] = {
    "streampipe.launcher.supervisor": _patch_supervisor, "streampipe.launcher.forkserver": _patch_forkserver}


class _Loader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self.real, self.patch = real, patch

    def __getattr__(self, name: str) -> Any:     # get_code and the rest: runpy (``python -m``) asks for them
        return getattr(self.real, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the modules of ``TARGETS`` as the other finders do, and patches each once it has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, TARGETS[fullname])
                return spec
        return None


if FAULTS:
    sys.meta_path.insert(0, _Finder())
