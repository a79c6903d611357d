"""``streampipe up --watch``: local development's reload, with watchfiles (inotify, debounced).

Watched: the config file, and the source file of every user stage's module (``module:Class``
found beside the config: ``module.py`` or ``module/__init__.py``, dots as folders). The folders
holding them are watched, not recursively, so an editor that saves by renaming is seen too.

- the config changed: it is applied like ``streampipe apply`` (a bad file changes nothing; an
  ``apply`` event says why); the watched files follow the new config;
- a module changed: it is imported first in the short-lived child ``validate`` runs
  (:mod:`streampipe.stages.introspect`), never in the supervisor. A save that does not import (a
  syntax error, a missing dependency, an exception at its top level) or whose stage no longer
  fits its options restarts nothing: a ``watch`` event (and its log line) names the file, the
  line and the error, and the stages keep running their previous code. Otherwise the stages
  whose own code changed restart replica by replica with it: the child answers a digest of the
  top-level statements each stage depends on (its class or function, the helpers and constants
  it uses: :func:`~streampipe.stages.introspect.code_digest`), compared with the digest of the
  code it runs. The other stages of that module, and everything else, go on untouched.

Built-in stages and modules installed elsewhere are not watched: their code is not being edited.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from streampipe.launcher.config import inspect_stages, stage_problem
from streampipe.stages.registry import BUILTINS

if TYPE_CHECKING:
    from streampipe.launcher.supervisor import Supervisor

WATCH_DEBOUNCE_MS = 400     # an editor's save is several writes within a few ms; a person saves far less often


def module_files(sup: Supervisor) -> dict[Path, list[str]]:
    """The source file of each user stage module beside the config -> the stages of that module."""
    out: dict[Path, list[str]] = {}
    for name, sc in sup.cfg.stages.items():
        if sc.type in BUILTINS or ":" not in sc.type:
            continue
        parts = sc.type.partition(":")[0].split(".")
        base = sup.cfg.config_dir.joinpath(*parts)
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                out.setdefault(path.resolve(), []).append(name)
                break
    return out


def _wanted(paths: set[Path], _change: object, path: str) -> bool:
    return Path(path) in paths


async def watch(sup: Supervisor) -> None:
    """Run until the supervisor stops: apply config changes, restart stages whose code changed."""
    from watchfiles import awatch

    while not sup.stopping:
        config = sup.cfg.path.resolve()
        modules = module_files(sup)
        folders = sorted({config.parent, *(p.parent for p in modules)})
        wanted = {config, *modules}
        running = code_of(await asyncio.to_thread(inspect_stages, sup.cfg)) if modules else {}
        logger.info(f"watching {config.name} and {len(modules)} stage modules for changes")
        async for changes in awatch(*folders, recursive=False, debounce=WATCH_DEBOUNCE_MS,
                                    watch_filter=functools.partial(_wanted, wanted)):
            paths = {Path(p) for _, p in changes}
            if config in paths:
                logger.info(f"{config.name} changed: applying it")
                await sup.reload()
                break      # the stage modules may be others now
            edited = {path: modules[path] for path in sorted(paths & set(modules))}
            if edited:
                await restart_changed(sup, edited, running)
        await asyncio.sleep(0)


def code_of(report: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """Each stage's code digest in an introspection report (None: not known, e.g. a built-in)."""
    return {name: found.get("code") for name, found in report.items()}


async def restart_changed(sup: Supervisor, edited: dict[Path, list[str]], running: dict[str, str | None]) -> None:
    """The ``edited`` modules' stages: import-checked in the introspect child; a stage with a
    problem is not restarted (one ``watch`` event per module and problem says why); one whose
    code digest differs from ``running`` (the code it runs; updated) restarts with the new code.
    A check that could not answer (the child hung or died) knows no digest: every stage of an
    edited module restarts, and fails at start as it would at ``up``."""
    assert sup.events is not None
    report = await asyncio.to_thread(inspect_stages, sup.cfg)
    for path, stages in edited.items():
        refused: dict[str, list[str]] = {}
        for name in stages:
            if (found := stage_problem(sup.cfg, name, report)) is not None:
                _, field, message = found       # an import error is every stage's of the module: one event
                refused.setdefault(message if field.endswith(".type") else f"{field}: {message}", []).append(name)
        for problem, names in refused.items():
            headline, _, detail = problem.partition("\n")
            sup.events.emit("watch", names[0] if len(names) == 1 else "", None, None, error=detail or headline,
                            reason=f"{path.name} changed; nothing restarted: {headline} "
                                   f"(still running the code before this save: {', '.join(names)})")
        digest = code_of(report)
        fine = [n for n in stages if not any(n in names for names in refused.values())]
        changed = [n for n in fine if digest.get(n) is None or digest[n] != running.get(n)]
        unchanged = [n for n in fine if n not in changed]
        if unchanged:
            logger.info(f"{path.name} changed; not the code of {', '.join(unchanged)}: not restarted")
        for name in changed:
            running[name] = digest.get(name)
            watcher = sup.watchers.get(name)
            if watcher is not None:
                sup.events.emit("apply", name, None, None, reason=f"{path.name} changed: rolling restart with the new code")
                await watcher.restart()
