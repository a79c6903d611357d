"""streampipe: a local-first stream pipeline supervisor, one OS process per stage.

This module is the public API for stage authors, and the only one they need::

    from streampipe import Stage, Source, Sink, BadRecord, Columns

Its names are listed in ``__all__`` and kept stable; :mod:`streampipe.testing` (``run_stage``,
``check_stage``) is public too. Everything under ``streampipe.stages``, ``streampipe.launcher``
and ``streampipe.monitor`` is internal: the runtime, the built-in stages, the supervisor and the
monitor may change between releases without notice.

The names are loaded on first use (PEP 562 ``__getattr__``): the ``streampipe`` command imports
this package too, and ``streampipe status`` must not pay for numpy (``Columns``) before it runs.

>>> from streampipe import Stage
>>> class Upper(Stage):
...     def process(self, batch):
...         return [{**r, "name": r["name"].upper()} for r in batch]
>>> Upper().process([{"name": "ada"}])
[{'name': 'ADA'}]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from streampipe.stages.api import BadRecord, Batch, Record, Sink, Source, Stage, StageContext
    from streampipe.stages.columns import Columns

__version__ = "0.2.0"

__all__ = ["BadRecord", "Batch", "Columns", "Record", "Sink", "Source", "Stage", "StageContext", "__version__"]

_HOMES = {**dict.fromkeys(["BadRecord", "Batch", "Record", "Sink", "Source", "Stage", "StageContext"], "streampipe.stages.api"),
          "Columns": "streampipe.stages.columns"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'streampipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value     # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
