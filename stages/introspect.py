"""What each stage ``type`` of a pipeline is, and whether its ``options`` fit: run in a child.

``streampipe validate`` (and ``up``) must not import user modules or scikit-learn into the
supervisor (import side effects, threads, seconds of start-up), so the supervisor runs this
module as a short-lived child, ``python -m streampipe.stages.introspect``, and exchanges JSON::

    stdin   {"config_dir": "/abs/dir", "stages": {"gen": {"type": "generator", "options": {...}}, ...}}
    stdout  {"gen": {"kind": "source", "outputs": ["default"], "options": [["cout", "unknown option ..."], ...]},
             "sink": {"kind": null, "problem": "class Sink has neither process(batch), generate() nor ..."},
             "enrich": {"kind": null, "problem": "module 'mystages' fails to import: mystages.py:3: NameError: ..."},
             "tag": {"kind": "transform", "outputs": ["default"], "options": [], "code": "5f0c..."}, ...}

Each ``type`` is imported once. Per stage it answers the ``kind`` (:func:`~stages.api.kind_of`:
``source``, ``transform`` or ``function``), a ``problem`` that keeps it from being a stage at
all, per-option errors (``[key, message]``; key ``null`` for the options as a whole), and for
a stage of the user's own module (not a built-in) the ``code`` digest of what it runs
(:func:`code_digest`): ``up --watch`` restarts only the stages whose digest a save changed.

The options rule is Python's own call, checked before the call: a key must name a parameter of
the class's ``__init__`` unless it takes ``**kwargs``; every required parameter must be given;
a value must fit the parameter's annotation, validated by pydantic in strict JSON mode (YAML
gives JSON-like data: ``"lots"`` is no ``int``, ``1`` is a ``float``, a list is a ``tuple``).
An annotation pydantic cannot check is left to the stage. A function stage takes no options.
A class may add its own checks as a static ``option_problems(options) -> [(key, message), ...]``,
run once the call itself is fine (the consumer refuses ``format: parquet`` without pyarrow).

A module that is not found is a problem, and so is one that fails when imported (a syntax error,
a missing dependency, an exception at its top level): the problem names the file and line
where it failed and the error, with the traceback of the user's own frames (:func:`import_problem`).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import inspect
import json
import os
import sys
import traceback
import typing
from pathlib import Path
from typing import Any

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from streampipe.stages.api import kind_of
from streampipe.stages.registry import BUILTINS, NotDefined, load_target, target_of


def describe(type_: str, config_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Import what ``type_`` names; return it (None if unusable) and what is known of it."""
    module_name = target_of(type_).partition(":")[0]
    try:
        target = load_target(type_, config_dir)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            return None, {"kind": None, "problem": f"module {module_name!r} not found beside the config or on sys.path"}
        return None, {"kind": None, "problem": import_problem(module_name, exc, config_dir)}
    except NotDefined as exc:
        return None, {"kind": None, "problem": str(exc)}
    except Exception as exc:   # the module raised while imported (SyntaxError included)
        return None, {"kind": None, "problem": import_problem(module_name, exc, config_dir)}
    try:
        kind = kind_of(target)
    except TypeError as exc:
        return None, {"kind": None, "problem": str(exc)}
    info: dict[str, Any] = {"kind": kind, "outputs": outputs_of(target, kind)}
    if type_ not in BUILTINS:
        info["code"] = code_digest(sys.modules[module_name], type_.partition(":")[2])
    return target, info


def import_problem(module_name: str, exc: BaseException, config_dir: Path) -> str:
    """What importing a user's module raised: where (``file:line``, relative to the config's
    folder when inside it), the error, then the traceback of the user's own frames only (no
    importlib, no streampipe), as Python prints it."""
    internal = {os.path.realpath(path) for name, m in list(sys.modules.items())
                if name.partition(".")[0] in ("streampipe", "importlib", "runpy") and (path := getattr(m, "__file__", None))}
    internal.add(os.path.realpath(__file__))     # this module, run as __main__
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and os.path.realpath(f.filename) not in internal]
    if isinstance(exc, SyntaxError) and exc.filename:
        filename, line, message = exc.filename, exc.lineno, str(exc.msg)
        shown = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        filename, line = (frames[-1].filename, frames[-1].lineno) if frames else (module_name, None)
        message = str(exc)
        shown = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) \
            + "".join(traceback.format_exception_only(type(exc), exc))
    try:
        filename = str(Path(filename).resolve().relative_to(config_dir.resolve()))
    except ValueError:
        pass
    where = f"{filename}:{line}" if line else filename
    return f"module {module_name!r} fails to import: {where}: {type(exc).__name__}: {message}\n{shown.rstrip()}"


def code_digest(module: Any, name: str) -> str:
    """A digest of the code the stage named ``name`` in ``module`` runs: the top-level statements
    of the module's source that define it and, transitively, every top-level name they use
    (helpers, constants, imports, base classes), plus every statement that binds no plain name
    (``if``, ``try``, a call at the top: what they do is not known, so every stage depends on them).
    Compared as syntax trees: a comment or a blank line changes nothing, nor does a statement
    the stage does not depend on. A module whose source cannot be read gets a digest of its
    file's bytes (any change counts).
    """
    path = getattr(module, "__file__", None)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        try:
            return hashlib.sha1(Path(path).read_bytes()).hexdigest() if path else ""
        except OSError:
            return ""
    return code_digest_of(source, name)


def code_digest_of(source: str, name: str) -> str:
    r""":func:`code_digest` of module ``source`` for its top-level ``name``.

    >>> src = ("import math\nK = 2\ndef helper(x):\n    return x * K\n"
    ...        "class A:\n    def f(self):\n        return helper(1)\n"
    ...        "def b(record):\n    return {**record, 'pi': math.pi}\n")
    >>> def changed(text):       # which of the two stages, A and b, a save of ``text`` restarts
    ...     return [n for n in ("A", "b") if code_digest_of(text, n) != code_digest_of(src, n)]
    >>> changed(src.replace("'pi'", "'tau'")), changed(src.replace("K = 2", "K = 3"))   # A uses helper, helper K
    (['b'], ['A'])
    >>> changed("# a comment\n" + src.replace("helper(1)", "helper(1)  # same") + "\n\nX = 1\n")
    []
    >>> changed(src + "print('imported')\n")      # a statement at the top: what it does is anybody's business
    ['A', 'b']
    """
    body = ast.parse(source).body
    binds: dict[str, list[int]] = {}
    always: list[int] = []
    for i, stmt in enumerate(body):
        names = _bound_names(stmt)
        if names is None:
            always.append(i)
        for bound in names or ():
            binds.setdefault(bound, []).append(i)
    wanted: set[int] = set()
    todo, seen = [name], set()

    def use(i: int) -> None:
        if i not in wanted:
            wanted.add(i)
            todo.extend(n.id for n in ast.walk(body[i]) if isinstance(n, ast.Name))

    for i in always:
        use(i)
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            for i in binds.get(current, []):
                use(i)
    text = "\n".join(ast.dump(body[i]) for i in sorted(wanted))
    return hashlib.sha1(text.encode()).hexdigest()


def _bound_names(stmt: ast.stmt) -> list[str] | None:
    """The top-level names ``stmt`` binds, or None for a statement whose effect is not a plain binding."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).partition(".")[0] for a in stmt.names if a.name != "*"] or None
    targets: list[ast.expr] = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    else:
        return None
    names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return names if names and all(isinstance(t, (ast.Name, ast.Tuple, ast.List)) for t in targets) else None


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
