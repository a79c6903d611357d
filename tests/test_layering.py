"""The package's layering, checked on the source: what each part may import (issue 19).

Every module's imports are read with :mod:`ast`, at the top of the module and inside functions
alike (an import deferred into a function is still a dependency), and ``if TYPE_CHECKING:``
imports too, except where a rule says otherwise:

- ``streampipe.stages`` (code that runs inside a stage process) never imports
  ``streampipe.launcher`` or ``streampipe.monitor``;
- ``streampipe.monitor`` never imports ``streampipe.stages``;
- ``streampipe.launcher`` imports from ``streampipe.stages`` only :data:`LAUNCHER_MAY_IMPORT`:
  the runtime's entry points and the modules both sides share;
- the package root's private modules (``streampipe._rotating``, ``streampipe._logtail``) are
  shared by both sides and belong to neither: they import no other part of streampipe;
- no import cycle inside ``streampipe.launcher`` at run time (type-only imports under
  ``TYPE_CHECKING`` excepted: they never run), so no import is put in a function to hide one;
- ``streampipe status`` imports no numpy, loguru, YAML, rich or config model before it runs.

Stage code named in ``services.yaml`` is imported by name (``importlib``) in the processes that
run or inspect it; such imports are data, not dependencies, and are not read here.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pyproject.toml's [tool.setuptools.package-dir]: the folder of each package
FOLDERS = {"streampipe": ROOT / "src" / "streampipe", "streampipe.stages": ROOT / "stages",
           "streampipe.launcher": ROOT / "launcher", "streampipe.monitor": ROOT / "monitor"}

# What streampipe.launcher may import from streampipe.stages: module -> the names it may take from
# it (None: any, a module both sides share) and why.
LAUNCHER_MAY_IMPORT: dict[str, tuple[frozenset[str] | None, str]] = {
    "streampipe.stages.spec": (None, "StageSpec / EdgeSpec: what a stage process is started with"),
    "streampipe.stages.wire": (None, "the wire protocol: stage messages, commands, rejects"),
    "streampipe.stages.state": (None, "saved positions and their layout (repartition), atomic writes"),
    "streampipe.stages.registry": (frozenset({"BUILTINS", "target_of", "load_target"}),
                                   "what a stage `type` names, without importing stage code"),
    "streampipe.stages.runtime": (frozenset({"main", "die_with_parent", "Host", "LATENCY_BUCKETS_MS"}),
                                  "the entry points of a stage process (fork server, run-stage) and its histogram buckets"),
    "streampipe.stages.proctitle": (frozenset({"set_title", "starting"}), "`ps` names every process the same way"),
    "streampipe.stages.network": (frozenset({"generate_keys"}), "`keys generate` writes the key folder the stages load"),
    "streampipe.stages.builtins.checkpoints": (None, "`report` reads the trainer's checkpoint metadata"),
    "streampipe.stages.api": (frozenset({"StageContext"}), "`report` reads the file each replica of a sink writes "
                              "(StageContext.replica_output names it)"),
    "streampipe.stages.builtins.consumer": (frozenset({"OUTPUT"}), "`report` reads a window's results where a "
                                            "consumer writes them by default"),
    "streampipe.stages.fence": (None, "one live process per replica: the lock a stage takes, the supervisor clears"),
}
SHARED_ROOT_MODULES = ("streampipe._rotating", "streampipe._logtail")


@dataclass(frozen=True)
class Import:
    module: str         # the importing module
    target: str         # the module imported (for `from m import name`: m.name if that is a module, else m)
    name: str | None    # the name taken from target (`from m import name`), None for `import m`
    line: int
    type_only: bool     # under `if TYPE_CHECKING:`


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name, subpackages included."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str) -> list[Import]:
    """Every import statement of ``module``, wherever it stands."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    is_package = MODULES[module].stem == "__init__"
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(module, a.name, None, node.lineno, type_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the importing module's package
                parts = (module if is_package else module.rpartition(".")[0]).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(module, sub, None, node.lineno, type_only) if sub in MODULES
                             else Import(module, base, alias.name, node.lineno, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return found


def in_package(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def where(imp: Import) -> str:
    name = f" ({imp.name})" if imp.name else ""
    return f"{MODULES[imp.module]}:{imp.line}: {imp.target}{name}"


def of_package(package: str) -> list[str]:
    return [m for m in MODULES if in_package(m, package)]


@pytest.mark.parametrize("module", of_package("streampipe.stages"))
def test_stage_code_never_imports_the_launcher_or_the_monitor(module: str) -> None:
    bad = [where(i) for i in imports_of(module)
           if in_package(i.target, "streampipe.launcher") or in_package(i.target, "streampipe.monitor")]
    assert not bad, "stage code imports the supervisor side:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", of_package("streampipe.monitor"))
def test_the_monitor_never_imports_stage_code(module: str) -> None:
    bad = [where(i) for i in imports_of(module) if in_package(i.target, "streampipe.stages")]
    assert not bad, "the monitor imports stage code:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", SHARED_ROOT_MODULES)
def test_shared_modules_belong_to_neither_side(module: str) -> None:
    bad = [where(i) for i in imports_of(module)
           if in_package(i.target, "streampipe") and i.target not in SHARED_ROOT_MODULES]
    assert not bad, f"{module} is shared by the stages and the launcher, so it imports neither:\n" + "\n".join(bad)


def launcher_imports_of_stages() -> list[Import]:
    return [i for m in of_package("streampipe.launcher") for i in imports_of(m)
            if in_package(i.target, "streampipe.stages")]


def test_the_launcher_imports_only_the_stage_side_it_is_allowed() -> None:
    bad = []
    for imp in launcher_imports_of_stages():
        allowed = LAUNCHER_MAY_IMPORT.get(imp.target)
        if allowed is None:
            bad.append(f"{where(imp)}: not in LAUNCHER_MAY_IMPORT")
        elif allowed[0] is not None and imp.name not in allowed[0]:
            bad.append(f"{where(imp)}: only {sorted(allowed[0])} of {imp.target} may be imported ({allowed[1]})")
    assert not bad, "the launcher reaches into stage code:\n" + "\n".join(bad)


def test_the_allowed_list_is_no_longer_than_what_is_used() -> None:
    """An entry nothing uses any more is taken out of the list, so the list only shrinks."""
    used: dict[str, set[str]] = {}
    for imp in launcher_imports_of_stages():
        used.setdefault(imp.target, set()).add(imp.name or "")
    assert set(LAUNCHER_MAY_IMPORT) == set(used)
    for target, (names, _why) in LAUNCHER_MAY_IMPORT.items():
        if names is not None:
            assert names == used[target], target


def cycles(package: str) -> list[list[str]]:
    """The import cycles among the modules of ``package`` at run time (strongly connected components)."""
    members = of_package(package)
    graph = {m: sorted({i.target for i in imports_of(m) if not i.type_only and i.target in members and i.target != m})
             for m in members}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:     # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in members:
        if v not in index:
            connect(v)
    return found


@pytest.mark.parametrize("package", ["streampipe.launcher", "streampipe.monitor"])
def test_no_import_cycle_hidden_in_a_function(package: str) -> None:
    assert cycles(package) == []


def test_cycles_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cycle finder itself, on a pair like the supervisor and apply were: one import in a
    function, the other at the top; a type-only import makes no cycle."""
    texts = {"a": "def f():\n    from streampipe.launcher.b import g\n",
             "b": "from streampipe.launcher import a\n",
             "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from streampipe.launcher import a\n"}
    for name, text in texts.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.setitem(globals(), "MODULES", {f"streampipe.launcher.{n}": tmp_path / f"{n}.py" for n in texts})
    assert cycles("streampipe.launcher") == [["streampipe.launcher.a", "streampipe.launcher.b"]]


HEAVY = ("numpy", "loguru", "yaml", "rich", "streampipe.launcher.config", "streampipe.stages.wire")


def test_the_status_command_imports_nothing_heavy_before_it_runs() -> None:
    """What ``streampipe status --json`` imports before it asks the supervisor (benchmarks/cli_startup.py
    times it): none of these (typer imports pydantic itself; the config's models are the cost here)."""
    probe = ("import json, sys\n"
             "import streampipe.launcher.cli, streampipe.launcher.control\n"
             f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []


def test_the_cli_default_config_is_the_configs() -> None:
    """cli.py names the default file itself, so that it need not import launcher/config.py to start."""
    from streampipe.launcher import cli, config

    assert cli.DEFAULT_CONFIG == config.DEFAULT_CONFIG
