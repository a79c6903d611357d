"""The ``window`` stages' part of ``streampipe report``: their figures and their newest results per key.

For each ``window`` stage of the run (known from ``status-history.jsonl``, whose samples carry each
replica's type and ``stats()``; or from the config), the section says what its replicas reported
in the last sample (at most a few seconds old: the supervisor samples every 2 s): windows emitted,
late records, windows open and each replica's watermark.
Where the config has a ``consumer`` reading the stage's results, a small table shows the newest
window of the keys most recently closed, read from the end of that sink's file (the last
:data:`TAIL_BYTES` of it: cheap on a file of any size). Where a ``trainer`` is fed from the window
(through any stages between), the section names it and the path.

>>> import json, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> sample = {"time": 5.0, "stages": {f"w.{i}": {"type": "window", "stats": {"emitted": 10 + i, "late": i,
...           "open": 4, "watermark": 118.5 + i}} for i in (0, 1)}}
>>> (d / "output").mkdir()
>>> _ = (d / "output" / "w.jsonl").write_text("".join(json.dumps({"id": i, "user": f"u{i % 3}", "window_start": 10 * i,
...     "window_end": 10 * i + 20, "n": i, "mean": 20.0 + i / 3}) + "\\n" for i in range(7)))
>>> graph = {"w": Node("window", [], {"key": "user"}), "sink": Node("consumer", ["w"], {"output": "output/w.jsonl"}),
...          "f": Node("mod:fn", ["w"], {}), "trainer": Node("trainer", ["f"], {})}
>>> print(section(d, [sample], graph))
window w (2 replicas, status sample of ...): 21 windows emitted, 1 late record, 8 open; watermark 118.5 / 119.5 (replica 0 / 1)
trainer learns from its windows (via f)
newest windows of 3 keys (output/w.jsonl, 3 keys in its last 7 lines):
┏━━━━━━┳━━━━━━━━━━┳━━━┳━━━━━━━┓
┃ user ┃ window   ┃ n ┃  mean ┃
┡━━━━━━╇━━━━━━━━━━╇━━━╇━━━━━━━┩
│ u0   │ [60, 80) │ 6 │    22 │
│ u2   │ [50, 70) │ 5 │ 21.67 │
│ u1   │ [40, 60) │ 4 │ 21.33 │
└──────┴──────────┴───┴───────┘
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

from streampipe._rotating import tail_rows

NEWEST_KEYS = 8                 # rows of the newest-results table: a glance at the features, not a dump of them
TAIL_BYTES = 256 * 1024         # read from the end of a sink's file: the newest windows of a few thousand keys
CELL_CHARS = 24                 # a key or a value wider than this is cut short
FIELDS_SHOWN = 8                # result fields shown beside the key and the window
WINDOW_TYPE = "window"


class Node(NamedTuple):
    """A stage of the config, as far as the section needs it."""

    type: str
    inputs: list[str]
    options: dict[str, Any]
    replicas: int = 1


Graph = dict[str, Node]


def graph_of(cfg: Any) -> Graph:
    """The stages of a loaded config (:class:`streampipe.launcher.config.PipelineConfig`) as a :data:`Graph`."""
    return {name: Node(sc.type, list(sc.inputs), dict(sc.options), int(sc.replicas)) for name, sc in cfg.stages.items()}


def section(run_dir: Path, history: list[dict[str, Any]], graph: Graph | None) -> str | None:
    """The report's lines about every ``window`` stage, or None when the run has none."""
    at, sample = _last_sample(history)
    names = sorted({ident.rsplit(".", 1)[0] for ident, s in sample.items() if s.get("type") == WINDOW_TYPE} |
                   {n for n, node in (graph or {}).items() if node.type == WINDOW_TYPE})
    if not names:
        return None
    return "\n".join(_stage_section(run_dir, name, at, sample, graph) for name in names)


def _last_sample(history: list[dict[str, Any]]) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """The time and the replicas of the newest status-history sample that carries stats."""
    for row in reversed(history):
        stages = row.get("stages")
        if isinstance(stages, dict) and any(isinstance(s, dict) and "stats" in s for s in stages.values()):
            t = row.get("time")
            return (float(t) if isinstance(t, (int, float)) else None), {i: s for i, s in stages.items() if isinstance(s, dict)}
    return None, {}


def _stage_section(run_dir: Path, name: str, at: float | None, sample: dict[str, dict[str, Any]], graph: Graph | None) -> str:
    replicas = sorted(((int(ident.rsplit(".", 1)[1]), s.get("stats") or {}) for ident, s in sample.items()
                       if ident.rsplit(".", 1)[0] == name and ident.rsplit(".", 1)[1].isdigit()), key=lambda p: p[0])
    lines = [_figures_line(name, at, replicas)]
    if graph is None:
        lines.append("newest windows: not shown without the pipeline's config (--config)")
        return "\n".join(lines)
    lines += [f"{trainer} learns from its windows" + (f" (via {', '.join(path)})" if path else "")
              for trainer, path in _trainers_fed_by(name, graph)]
    sinks = [(sink, node) for sink, node in sorted(graph.items())
             if node.type == "consumer" and any(ref in (name, f"{name}.default") for ref in node.inputs)]
    if not sinks:
        lines.append(f"newest windows: no consumer reads {name} (a consumer with inputs: [{name}] shows them here)")
        return "\n".join(lines)
    key_field = str(graph[name].options.get("key") or "key") if name in graph else "key"
    for sink, node in sinks:
        lines.append(_newest_table(run_dir, sink, node, key_field))
    return "\n".join(lines)


def _figures_line(name: str, at: float | None, replicas: list[tuple[int, dict[str, Any]]]) -> str:
    if not replicas:
        return f"window {name}: no status sample of it in status-history.jsonl"

    def total(field: str) -> int:
        return sum(v for _, s in replicas if isinstance(v := s.get(field), int))

    late = total("late")
    marks = [s.get("watermark") for _, s in replicas]
    watermark = " / ".join(_cell(m) if isinstance(m, (int, float)) else "none" for m in marks)
    which = f" (replica {' / '.join(str(i) for i, _ in replicas)})" if len(replicas) > 1 else ""
    count = f"{len(replicas)} replica{'s' if len(replicas) > 1 else ''}"
    when = time.strftime("%H:%M:%S", time.localtime(at)) if at is not None else "?"
    return (f"window {name} ({count}, status sample of {when}): {total('emitted')} windows emitted, "
            f"{late} late record{'' if late == 1 else 's'}, {total('open')} open; watermark {watermark}{which}")


def _trainers_fed_by(window: str, graph: Graph) -> list[tuple[str, list[str]]]:
    """Each ``trainer`` stage downstream of ``window``, with the stages between (in the order records flow)."""
    found = []
    for trainer, node in sorted(graph.items()):
        if node.type != "trainer":
            continue
        paths: list[list[str]] = [[trainer]]
        seen = {trainer}
        while paths:
            path = paths.pop(0)
            ups = [ref.partition(".")[0] for ref in graph[path[-1]].inputs]
            if window in ups:
                found.append((trainer, path[1:][::-1]))
                break
            for up in ups:
                if up not in seen and up in graph:
                    seen.add(up)
                    paths.append([*path, up])
    return found


def _newest_table(run_dir: Path, sink: str, node: Node, key_field: str) -> str:
    from streampipe.stages.api import StageContext
    from streampipe.stages.builtins.consumer import OUTPUT

    output = str(node.options.get("output") or OUTPUT["jsonl"])
    if node.options.get("format", "jsonl") != "jsonl":
        return f"newest windows: {sink} writes {node.options.get('format')}, not JSON lines; not read here"
    replicas = node.replicas
    paths = [StageContext(replica=i, replicas=replicas, run_dir=run_dir).replica_output(output) for i in range(replicas)]
    rows = [row for path in paths if path.exists() for row in tail_rows(path, TAIL_BYTES)]
    newest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if key_field not in row or "window_end" not in row:
            continue
        k = json.dumps(row[key_field], sort_keys=True, default=str)
        if k not in newest or _order(row) >= _order(newest[k]):
            newest[k] = row
    where = output if replicas == 1 else f"{output} and its {replicas - 1} replica file{'s' if replicas > 2 else ''}"
    if not newest:
        return f"newest windows: none yet in {where}"
    shown = sorted(newest.values(), key=lambda r: (-_order(r)[0], -_order(r)[1], str(r[key_field])))[:NEWEST_KEYS]
    return (f"newest windows of {len(shown)} keys ({where}, {len(newest)} keys in its last {len(rows)} lines):\n"
            + _render(shown, key_field))


def _order(row: dict[str, Any]) -> tuple[float, float]:
    end, start = row.get("window_end"), row.get("window_start")
    return (float(end) if isinstance(end, (int, float)) else float("-inf"),
            float(start) if isinstance(start, (int, float)) else float("-inf"))


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def _render(rows: list[dict[str, Any]], key_field: str) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # plain text: a key or a field name may hold brackets, never rich markup

    skip = {"id", key_field, "window_start", "window_end"}
    fields = [f for f in rows[0] if f not in skip][:FIELDS_SHOWN]
    table = Table()
    table.add_column(Text(key_field))
    table.add_column("window")
    for f in fields:
        table.add_column(Text(f), justify="right")
    for row in rows:
        table.add_row(Text(_cell(row[key_field])), Text(f"[{_cell(row.get('window_start'))}, {_cell(row.get('window_end'))})"),
                      *(Text(_cell(row.get(f, ""))) for f in fields))
    out = io.StringIO()
    Console(file=out, width=200, color_system=None, highlight=False).print(table)
    return out.getvalue().rstrip("\n")
