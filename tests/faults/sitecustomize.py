"""Fault injection into the supervisor's loops, from outside the shipped package (tests only).

A test that wants a supervisor loop to fail puts this folder first on ``PYTHONPATH`` and names
the loops in ``$STREAMPIPE_TEST_FAULTS`` (``tests/test_unwedged.py``: ``fault_env``), e.g.
``stages,control,health,history``: each named loop raises once, on its first turn; ``history*``
raises on every turn. Python imports ``sitecustomize`` at the start of every process, so this
runs in the CLI, the supervisor, the fork server and the stages alike; it only acts where
:mod:`streampipe.launcher.supervisor` is imported (the supervisor, in ``up`` or its detached
child), by wrapping the loop methods of ``Supervisor`` when that module has been executed.

A loop's first turn is what it awaits before its work, as the supervisor's own loops do: a
message on the stages or the control socket (taken, so it is lost with the failure), or the
health or history interval. Then the wrapper raises ``RuntimeError``, which the supervisor
reports (``task-failed``) and restarts like any other failure of that loop.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any

ENV = "STREAMPIPE_TEST_FAULTS"
TARGET = "streampipe.launcher.supervisor"
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


def _patch(module: ModuleType) -> None:
    for point, name in LOOPS.items():
        if point in FAULTS or point + "*" in FAULTS:
            setattr(module.Supervisor, name, _faulty(module, point, getattr(module.Supervisor, name)))


class _Loader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the supervisor module as the other finders do, and patches it once it has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if FAULTS:
    sys.meta_path.insert(0, _Finder())
