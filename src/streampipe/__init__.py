"""streampipe: a local-first stream pipeline supervisor, one OS process per stage.

This module is the public API for stage authors, and the only one they need::

    from streampipe import Stage, Source, Sink, BadRecord, Columns

Its names are listed in ``__all__`` and kept stable; :mod:`streampipe.testing` (``run_stage``,
``check_stage``) is public too. Everything under ``streampipe.stages``, ``streampipe.launcher``
and ``streampipe.monitor`` is internal: the runtime, the built-in stages, the supervisor and the
monitor may change between releases without notice.

>>> class Upper(Stage):
...     def process(self, batch):
...         return [{**r, "name": r["name"].upper()} for r in batch]
>>> Upper().process([{"name": "ada"}])
[{'name': 'ADA'}]
"""

from streampipe.stages.api import BadRecord, Batch, Record, Sink, Source, Stage, StageContext
from streampipe.stages.columns import Columns

__version__ = "0.2.0"

__all__ = ["BadRecord", "Batch", "Columns", "Record", "Sink", "Source", "Stage", "StageContext", "__version__"]
