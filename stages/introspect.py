"""What each stage ``type`` of a pipeline is, and whether its ``options`` fit: run in a child.

``streampipe validate`` (and ``up``) must not import user modules or scikit-learn into the
supervisor (import side effects, threads, seconds of start-up), so the supervisor runs this
module as a short-lived child, ``python -m streampipe.stages.introspect``, and exchanges JSON::

    stdin   {"config_dir": "/abs/dir", "stages": {"gen": {"type": "generator", "options": {...}}, ...}}
    stdout  {"gen": {"kind": "source", "outputs": ["default"], "options": [["cout", "unknown option ..."], ...]},
             "sink": {"kind": null, "problem": "class Sink has neither process(batch), generate() nor ..."},
             "enrich": {"kind": null, "skipped": "ImportError: ..."}, ...}

Each ``type`` is imported once. Per stage it answers the ``kind`` (:func:`~stages.api.kind_of`:
``source``, ``transform`` or ``function``), a ``problem`` that keeps it from being a stage at
all, and per-option errors (``[key, message]``; key ``null`` for the options as a whole).

The options rule is Python's own call, checked before the call: a key must name a parameter of
the class's ``__init__`` unless it takes ``**kwargs``; every required parameter must be given;
a value must fit the parameter's annotation, validated by pydantic in strict JSON mode (YAML
gives JSON-like data: ``"lots"`` is no ``int``, ``1`` is a ``float``, a list is a ``tuple``).
An annotation pydantic cannot check is left to the stage. A function stage takes no options.
A class may add its own checks as a static ``option_problems(options) -> [(key, message), ...]``,
run once the call itself is fine (the consumer refuses ``format: parquet`` without pyarrow).

A module that is not found is a problem; a module that is found but fails when imported is
*skipped*: that is not a config error, the stage fails at start and ``status`` shows why.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from streampipe.stages.api import kind_of
from streampipe.stages.registry import NotDefined, load_target, target_of


def describe(type_: str, config_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Import what ``type_`` names; return it (None if unusable) and what is known of it."""
    module_name = target_of(type_).partition(":")[0]
    try:
        target = load_target(type_, config_dir)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            return None, {"kind": None, "problem": f"module {module_name!r} not found beside the config or on sys.path"}
        return None, {"kind": None, "skipped": f"{type(exc).__name__}: {exc}"}
    except NotDefined as exc:
        return None, {"kind": None, "problem": str(exc)}
    except Exception as exc:   # the module raised while imported: the stage shows it at start
        return None, {"kind": None, "skipped": f"{type(exc).__name__}: {exc}"}
    try:
        kind = kind_of(target)
    except TypeError as exc:
        return None, {"kind": None, "problem": str(exc)}
    return target, {"kind": kind, "outputs": outputs_of(target, kind)}


def outputs_of(target: Any, kind: str) -> list[str]:
    """The outputs a stage can send to: ``default`` and, for a class, the names in its ``outputs``."""
    declared = getattr(target, "outputs", ()) if kind != "function" else ()
    names = [str(n) for n in declared] if isinstance(declared, (tuple, list)) else []
    return ["default", *(n for n in names if n != "default")]


def option_errors(target: Any, options: dict[str, Any]) -> list[tuple[str | None, str]]:
    """What is wrong with calling ``target(**options)``, one ``(key, message)`` per mistake."""
    if kind_of(target) == "function":
        return [(None, "a function stage takes no options")] if options else []
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):   # no signature to read (a C extension): the call will tell
        return []
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    any_key = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target.__init__)
    except Exception:   # an annotation that does not resolve: check names only
        hints = {}
    errors: list[tuple[str | None, str]] = []
    for key, value in options.items():
        if key not in named:
            if not any_key:
                close = difflib.get_close_matches(key, named, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                takes = ", ".join(named) or "none"
                errors.append((key, f"unknown option {key!r}{hint}; {target.__name__} takes: {takes}"))
        elif key in hints and (problem := type_error(hints[key], value)):
            errors.append((key, problem))
    missing = [n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and n not in options]
    if missing:
        errors.append((None, f"{target.__name__} needs option(s) {', '.join(missing)}"))
    check = getattr(target, "option_problems", None)
    if not errors and callable(check):
        errors.extend(check(options))
    return errors


def type_error(annotation: Any, value: Any) -> str | None:
    """Why ``value`` (from YAML) does not fit ``annotation``; None if it fits or cannot be checked."""
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    except (PydanticSchemaGenerationError, TypeError, NameError):   # e.g. np.ndarray: the stage checks it
        return None
    try:
        adapter.validate_json(json.dumps(value, default=str), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = f" (at {'.'.join(str(p) for p in err['loc'])})" if err["loc"] else ""
        return f"{err['msg']}{where}, got {value!r}"
    return None


def inspect_pipeline(config_dir: Path, stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The report for every stage of ``{name: {"type", "options"}}``; each type imported once."""
    described: dict[str, tuple[Any, dict[str, Any]]] = {}
    report = {}
    for name, stage in stages.items():
        if stage["type"] not in described:
            described[stage["type"]] = describe(stage["type"], config_dir)
        target, info = described[stage["type"]]
        errors = option_errors(target, stage.get("options") or {}) if target is not None else []
        report[name] = {**info, "options": errors}
    return report


def main() -> None:
    request = json.load(sys.stdin)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)        # whatever a user module prints while imported goes to stderr, not into the answer
    report = inspect_pipeline(Path(request["config_dir"]), request["stages"])
    json.dump(report, out)
    out.close()
    os._exit(0)          # not sys.exit: a thread a user module started at import must not keep us alive


if __name__ == "__main__":
    main()
