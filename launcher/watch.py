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
from typing import TYPE_CHECKING

from loguru import logger

from streampipe.launcher.config import code_of, inspect_stages, stage_problem
from streampipe.stages.registry import BUILTINS

if TYPE_CHECKING:
    from streampipe.launcher.supervisor import Supervisor

WATCH_DEBOUNCE_MS = 400     # an editor's save is several writes within a few ms; a person saves far less often
WATCH_TICK_MS = 1000        # awatch answers at least this often (an empty set): its first answer means watching


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
    """Run until the supervisor stops: apply config changes, restart stages whose code changed.

    The stages started with the code the config's check saw (``sup.cfg.code``, taken before any
    of them started); once the file watches are set (awatch's first answer), the modules are
    checked against it, so a save made while the pipeline started is not missed either."""
    from watchfiles import awatch

    running: dict[str, str | None] = {}       # stage -> the digest of the code it runs
    types: dict[str, str] = {}
    while not sup.stopping:
        for name, sc in sup.cfg.stages.items():     # a new stage, or one an apply gave another type, runs the code of its check
            if types.get(name) != sc.type:
                running[name] = sup.cfg.code.get(name)
        types = {name: sc.type for name, sc in sup.cfg.stages.items()}
        config = sup.cfg.path.resolve()
        modules = module_files(sup)
        folders = sorted({config.parent, *(p.parent for p in modules)})
        wanted = {config, *modules}
        armed = False
        async for changes in awatch(*folders, recursive=False, debounce=WATCH_DEBOUNCE_MS, rust_timeout=WATCH_TICK_MS,
                                    yield_on_timeout=True, watch_filter=functools.partial(_wanted, wanted)):
            paths = {Path(p) for _, p in changes}
            if config in paths:
                logger.info(f"{config.name} changed: applying it")
                await sup.reload()
                break      # the stage modules may be others now
            edited = {path: modules[path] for path in sorted(paths & set(modules))}
            if not armed:   # watching now (awatch's first answer): a module changed since its stages' code was checked?
                armed = True
                if unseen := {path: stages for path, stages in modules.items() if path not in edited}:
                    await restart_changed(sup, unseen, running, saved=False)
                logger.info(f"watching {config.name} and {len(modules)} stage modules for changes")
            if edited:
                await restart_changed(sup, edited, running)
        await asyncio.sleep(0)


async def restart_changed(sup: Supervisor, edited: dict[Path, list[str]], running: dict[str, str | None],
                          saved: bool = True) -> None:
    """The ``edited`` modules' stages: import-checked in the introspect child; a stage with a
    problem is not restarted (one ``watch`` event per module and problem says why); one whose
    code digest differs from ``running`` (the code it runs; updated) restarts with the new code.

    ``saved``: a save was seen. A digest not known then (the check could not answer: the child
    hung or died) restarts the stage, which fails at start as it would at ``up``. Otherwise (the
    check once watching, ``saved=False``) only a digest known on both sides and changed does."""
    assert sup.events is not None
    report = await asyncio.to_thread(inspect_stages, sup.cfg)
    digest = code_of(report)
    for path, stages in edited.items():
        what = f"{path.name} changed" if saved else f"{path.name} changed since its stages started"
        refused: dict[str, list[str]] = {}
        for name in stages:
            if (found := stage_problem(sup.cfg, name, report)) is not None:
                _, field, message = found       # an import error is every stage's of the module: one event
                refused.setdefault(message if field.endswith(".type") else f"{field}: {message}", []).append(name)
        for problem, names in refused.items():
            headline, _, detail = problem.partition("\n")
            sup.events.emit("watch", names[0] if len(names) == 1 else "", None, None, error=detail or headline,
                            reason=f"{what}; nothing restarted: {headline} (still running the code they had: {', '.join(names)})")
        fine = [n for n in stages if not any(n in names for names in refused.values())]
        if saved:
            changed = [n for n in fine if digest.get(n) is None or digest[n] != running.get(n)]
        else:
            changed = [n for n in fine if None not in (digest.get(n), running.get(n)) and digest[n] != running[n]]
        unchanged = [n for n in fine if n not in changed]
        if unchanged and saved:
            logger.info(f"{what}; not the code of {', '.join(unchanged)}: not restarted")
        for name in fine:
            running[name] = digest.get(name)
        for name in changed:
            watcher = sup.watchers.get(name)
            if watcher is not None:
                sup.events.emit("apply", name, None, None, reason=f"{what}: rolling restart with the new code")
                await watcher.restart()
