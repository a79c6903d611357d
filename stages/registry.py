"""Built-in stage names -> their classes, and the loader for a user's ``module:Class`` or
``module:function``.

The table is plain data so that the supervisor can validate ``services.yaml`` without
importing any stage code (scikit-learn alone costs ~1.7 s to import).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streampipe.stages.api import Stage, as_stage, is_exact_sink, kind_of


@dataclass(frozen=True)
class Builtin:
    target: str                       # "module:Class"
    outputs: tuple[str, ...] = ("default",)
    source: bool = False              # produces records; takes no inputs


BUILTINS: dict[str, Builtin] = {
    "generator": Builtin("streampipe.stages.builtins.generator:Generator", ("default", "holdout"), source=True),
    "normalizer": Builtin("streampipe.stages.builtins.normalizer:Normalizer", ("default", "holdout")),
    "consumer": Builtin("streampipe.stages.builtins.consumer:Consumer"),
    "trainer": Builtin("streampipe.stages.builtins.trainer:Trainer"),
    "evaluator": Builtin("streampipe.stages.builtins.evaluator:Evaluator"),
    "predictor": Builtin("streampipe.stages.builtins.predictor:Predictor"),
    "serve": Builtin("streampipe.stages.builtins.serve:Serve", source=True),
    "compare": Builtin("streampipe.stages.builtins.compare:Compare"),
    "label_join": Builtin("streampipe.stages.builtins.label_join:LabelJoin"),
    "window": Builtin("streampipe.stages.builtins.window:Window", ("default", "late")),
    "join": Builtin("streampipe.stages.builtins.join:Join", ("default", "late")),
    "enrich": Builtin("streampipe.stages.builtins.join:Enrich", ("default", "late")),
    "log_extractor": Builtin("streampipe.stages.builtins.log_extractor:LogExtractor", source=True),
    "sqlite": Builtin("streampipe.stages.builtins.sqlite_sink:SqliteSink"),
    "postgres": Builtin("streampipe.stages.builtins.postgres_sink:PostgresSink"),
    "nats": Builtin("streampipe.stages.builtins.nats_streams:NatsSource", source=True),
    "nats_sink": Builtin("streampipe.stages.builtins.nats_streams:NatsSink"),
    "redis": Builtin("streampipe.stages.builtins.redis_streams:RedisStreamSource", source=True),
    "redis_sink": Builtin("streampipe.stages.builtins.redis_streams:RedisStreamSink"),
    "http": Builtin("streampipe.stages.builtins.http_source:HttpSource", source=True),
    "follow": Builtin("streampipe.stages.builtins.follow:Follow", source=True),
}


def target_of(type_: str) -> str:
    """``"generator"`` -> ``"streampipe.stages.builtins.generator:Generator"``; ``"pkg.mod:Cls"`` unchanged."""
    builtin = BUILTINS.get(type_)
    return builtin.target if builtin else type_


class NotDefined(ImportError):
    """The module of a ``type`` was imported but defines no such name."""


def load_target(type_: str, config_dir: Path | None = None) -> Any:
    """Import and return what a stage ``type`` names (config folder first on sys.path)."""
    module_name, _, attr = target_of(type_).partition(":")
    if config_dir is not None and str(config_dir) not in sys.path:
        sys.path.insert(0, str(config_dir))
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        import difflib

        close = difflib.get_close_matches(attr, [n for n in vars(module) if not n.startswith("_")], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise NotDefined(f"module {module_name!r} defines no {attr!r}{hint}") from None


def load_stage(type_: str, options: dict[str, Any], config_dir: Path | None = None) -> Stage:
    """The stage a ``type`` names, built with its ``options``, behind the :class:`Stage` interface.

    The one loading path of the runtime, the fork server and the test harness: a class is
    called with the options, and :func:`~streampipe.stages.api.as_stage` adapts what is not a
    Stage (a plain class, a function). Raises :class:`TypeError` for what cannot be a stage.
    """
    target = load_target(type_, config_dir)
    try:
        kind = kind_of(target)
    except TypeError as exc:
        raise TypeError(f"{type_}: {exc}") from None
    if kind == "function":
        if options:
            raise TypeError(f"{type_} is a function: it takes no options (got {', '.join(options)})")
        return as_stage(target)
    stage = target(**options)
    if is_exact_sink(stage):             # the sink API: its store holds each record once
        from streampipe.stages.delivery import ExactSink  # numpy: not for the CLI, which reads BUILTINS

        return ExactSink(stage)
    return as_stage(stage)
