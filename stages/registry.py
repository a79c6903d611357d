"""Built-in stage names -> their classes, and the loader for a user's ``module:Class``.

The table is plain data so that the supervisor can validate ``services.yaml`` without
importing any stage code (scikit-learn alone costs ~1.7 s to import).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Builtin:
    target: str                       # "module:Class"
    outputs: tuple[str, ...] = ("default",)
    source: bool = False              # produces records; takes no inputs


BUILTINS: dict[str, Builtin] = {
    "generator": Builtin("streampipe.stages.generator:Generator", ("default", "holdout"), source=True),
    "normalizer": Builtin("streampipe.stages.normalizer:Normalizer", ("default", "holdout")),
    "consumer": Builtin("streampipe.stages.consumer:Consumer"),
    "trainer": Builtin("streampipe.stages.trainer:Trainer"),
    "evaluator": Builtin("streampipe.stages.evaluator:Evaluator"),
    "log_extractor": Builtin("streampipe.stages.log_extractor:LogExtractor", source=True),
}


def target_of(type_: str) -> str:
    """``"generator"`` -> ``"streampipe.stages.generator:Generator"``; ``"pkg.mod:Cls"`` unchanged."""
    builtin = BUILTINS.get(type_)
    return builtin.target if builtin else type_


def load_class(type_: str, config_dir: Path | None = None) -> Any:
    """Import and return the class a stage ``type`` names (config folder first on sys.path)."""
    module_name, _, class_name = target_of(type_).partition(":")
    if config_dir is not None and str(config_dir) not in sys.path:
        sys.path.insert(0, str(config_dir))
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no class {class_name!r}") from None
