"""``streampipe up --watch``: local development's reload, with watchfiles (inotify, debounced).

Watched: the config file, and the source file of every user stage's module (``module:Class``
found beside the config: ``module.py`` or ``module/__init__.py``, dots as folders). The folders
holding them are watched, not recursively, so an editor that saves by renaming is seen too.

- the config changed: it is applied like ``streampipe apply`` (a bad file changes nothing; an
  ``apply`` event says why); the watched files follow the new config;
- a module changed: the stages of that type restart replica by replica with the new code (the
  fork server notices the new file and starts them cold, then reloads itself). Nothing else
  restarts. An import error shows as that stage's failure in ``status``, as at ``up``.

Built-in stages and modules installed elsewhere are not watched: their code is not being edited.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

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
        logger.info(f"watching {config.name} and {len(modules)} stage modules for changes")
        async for changes in awatch(*folders, recursive=False, debounce=WATCH_DEBOUNCE_MS,
                                    watch_filter=functools.partial(_wanted, wanted)):
            paths = {Path(p) for _, p in changes}
            if config in paths:
                logger.info(f"{config.name} changed: applying it")
                await sup.reload()
                break      # the stage modules may be others now
            for path in sorted(paths & set(modules)):
                for stage in modules[path]:
                    watcher = sup.watchers.get(stage)
                    if watcher is not None:
                        assert sup.events is not None
                        sup.events.emit("apply", stage, None, None, reason=f"{path.name} changed: rolling restart with the new code")
                        await watcher.restart()
        await asyncio.sleep(0)
