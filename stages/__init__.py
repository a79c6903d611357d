"""Code that runs inside a stage process: the runtime and the built-in stages.

Stage code never imports :mod:`launcher` or :mod:`monitor`.
"""

from stages.api import BadRecord, Batch, Record, Source, Stage, StageContext

__all__ = ["BadRecord", "Batch", "Record", "Source", "Stage", "StageContext"]
