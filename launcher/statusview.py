"""The ``status`` table, fitted to the terminal it is printed on (``status``, ``status --watch``, ``top``).

A column is shown whole or not at all: each column's width is the widest of its header and its
cells, and columns join the table by priority while the table still fits the width: first the
compact set that every width keeps (stage, replica, state, restarts, rate, errors), then pid and
the record counts, uptime, CPU and RSS, the info column (a stage's own ``stats()``), fds and
threads, the last error. Only the two text columns at the end (info, last error) may be cut short
(``…``), and only when they are the last thing that fits; a stage name or a number never is.
Hidden columns are named under the table; ``wide=True`` (``status --wide``) shows every column
whatever the width.

>>> st = {"pipeline": "demo", "supervisor_pid": 10, "uptime_s": 5, "delivery": "at-least-once", "stages": [
...     {"name": "a_rather_long_stage_name", "replica": 0, "pid": 123456, "state": "running", "uptime_s": 5.0,
...      "restarts": 0, "cpu_percent": 3.0, "rss_bytes": 50_000_000, "num_fds": 9, "num_threads": 3,
...      "records_in": 123456, "records_out": 123456, "rate": 2000.0, "errors": 0, "last_error": "",
...      "type": "mystages:Counter", "stats": {"seen": 42, "mood": "good"}}]}
>>> [c.header for c, _ in fitted_columns(st["stages"], 80)]
['stage', 'r', 'pid', 'state', 'restarts', 'rate/s', 'errors']
>>> "info" in [c.header for c, _ in fitted_columns(st["stages"], 200)]
True
>>> info(st["stages"][0])
'seen=42 mood=good'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

STATE_STYLE = {"running": "green", "blocked": "yellow", "starting": "cyan", "backoff": "yellow", "stopping": "magenta",
               "stopped": "dim", "completed": "blue", "failed": "bold red"}
TEXT_MIN_WIDTH = 16     # an info / last-error column narrower than this says too little to be worth a column
TEXT_MAX_WIDTH = 60     # ... and wider than this crowds the numbers (the full text is in `status --json`)
LAST_ERROR_CHARS = 120  # of a last error's last line, in --wide
USER_STATS_SHOWN = 8    # a user stage's stats() figures in the info column, at most
USER_STAT_CHARS = 40    # a figure's value longer than this (a list, a long string) is cut
DRIFT_MARK = "*"        # on the replicas of a stage that runs another count than its config says


def fmt_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def fmt_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def fmt_uptime(s: float) -> str:
    if s <= 0:
        return "-"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{(s % 3600) // 60:02.0f}m"


# stats() figures of the built-in stages that say something at a glance; a user's stage shows all its own
BUILTIN_FIGURES = ("written", "duplicates_dropped", "rejected", "drift_count", "exception_types", "ids_out_of_order",
                   "ids_below_watermark", "emitted", "open", "late",   # emitted, open: a window's; late: it and the joins'
                   "pairs", "unmatched", "enriched", "missing")        # a join's, an enrich's


def _user_stage(row: dict[str, Any]) -> bool:
    return ":" in str(row.get("type") or "")     # `module:Class`; a built-in type is a bare name


def _figure(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        text = str(value)
    else:
        text = str(value).replace(" ", "")
    return text if len(text) <= USER_STAT_CHARS else text[: USER_STAT_CHARS - 1] + "…"


def info(row: dict[str, Any]) -> str:
    """The info column: backoff and blocked, the model, a stage's ``stats()`` figures, dead letters."""
    stats = row.get("stats") or {}
    parts = []
    if row.get("state") == "backoff":
        parts.append(f"backoff {row.get('backoff_s', 0):.1f}s")
    if row.get("blocked"):
        parts.append("blocked")
    if row.get("waiting"):
        parts.append(f"waiting for {row['waiting']}")
    if "model_version" in stats:
        metric = stats.get("metric")
        parts.append(f"model v{stats['model_version']}" + (f" {stats.get('metric_name', 'metric')}={metric:.3f}" if isinstance(metric, (int, float)) else ""))
    if _user_stage(row):
        shown = [(k, _figure(v)) for k, v in stats.items() if k not in ("model_version", "metric", "metric_name")]
        parts += [f"{k}={text}" for k, text in shown[:USER_STATS_SHOWN] if text is not None]
    else:
        parts += [f"{key}={stats[key]}" for key in BUILTIN_FIGURES if stats.get(key)]
    if row.get("dead_letters"):
        parts.append(f"dead={row['dead_letters']}")
    if row.get("malformed"):
        parts.append(f"malformed={row['malformed']}")
    if row.get("dead_letters_dropped"):
        parts.append(f"dead_dropped={row['dead_letters_dropped']}")
    if row.get("unreachable"):
        parts.append(f"unreachable={','.join(row['unreachable'])}")
    if row.get("denied"):
        parts.append(f"curve_denied={row['denied']}")
    if row.get("insecure"):
        parts.append("INSECURE: tcp without CURVE")
    return " ".join(parts)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict[str, Any]], str]
    priority: int           # lower joins the table first; 0: every width keeps it
    right: bool = True      # numbers are right-aligned
    text: bool = False      # free text: may be cut short to fit (info, last error)


COLUMNS = (   # in the order they are shown
    Column("stage", lambda r: str(r["name"]), 0, right=False),
    Column("r", lambda r: f"{r['replica']}{DRIFT_MARK if r.get('drift') else ''}", 0),
    Column("pid", lambda r: str(r["pid"] or "-"), 1),
    Column("state", lambda r: str(r["state"]), 0, right=False),
    Column("uptime", lambda r: fmt_uptime(r["uptime_s"]), 4),
    Column("restarts", lambda r: str(r["restarts"]), 0),
    Column("cpu%", lambda r: "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.0f}", 5),
    Column("rss", lambda r: fmt_bytes(r["rss_bytes"]) if r["rss_bytes"] else "-", 6),
    Column("fds", lambda r: str(r.get("num_fds") or "-"), 8),
    Column("thr", lambda r: str(r.get("num_threads") or "-"), 8),
    Column("in", lambda r: fmt_count(r["records_in"]), 2),
    Column("out", lambda r: fmt_count(r["records_out"]), 3),
    Column("rate/s", lambda r: "-" if r["rate"] is None else fmt_count(r["rate"]), 0),
    Column("errors", lambda r: str(r["errors"]), 0),
    Column("info", info, 7, right=False, text=True),
    Column("last error", lambda r: last_line(r["last_error"])[:LAST_ERROR_CHARS], 9, right=False, text=True),
)


def _width(col: Column, rows: list[dict[str, Any]]) -> int:
    return max([len(col.header), *(len(col.cell(r)) for r in rows)])


def table_width(widths: list[int]) -> int:
    """What a rich table of these column widths takes: one space each side of a cell, a rule between and around."""
    return sum(w + 2 for w in widths) + len(widths) + 1


def fitted_columns(rows: list[dict[str, Any]], width: int | None, wide: bool = False) -> list[tuple[Column, int]]:
    """The columns shown at ``width`` (None or ``wide``: all of them), in display order, each with its width."""
    widths = {c.header: _width(c, rows) for c in COLUMNS}
    if wide or width is None:
        return [(c, widths[c.header]) for c in COLUMNS]
    chosen = {c.header: widths[c.header] for c in COLUMNS if c.priority == 0}
    for col in sorted((c for c in COLUMNS if c.priority > 0), key=lambda c: c.priority):
        need = widths[col.header]
        room = width - table_width([*chosen.values(), 0])     # what the table has left for one more column
        if col.text:   # free text: worth a column only with some room, even if not all it would take
            if any(col.cell(r) for r in rows) and room >= min(need, TEXT_MIN_WIDTH):
                chosen[col.header] = min(need, room, TEXT_MAX_WIDTH)
        elif need <= room:
            chosen[col.header] = need
    return [(c, chosen[c.header]) for c in COLUMNS if c.header in chosen]


def rows_of(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: the status rows, each of a stage in ``drift`` marked ``drift`` (its ``r`` cell gets a ``*``)."""
    drift = st.get("drift") or {}
    return [{**r, "drift": True} if r["name"] in drift else r for r in st["stages"]]


def drift_lines(st: dict[str, Any]) -> list[str]:
    """One line per stage whose running replica count is not its config's (after ``streampipe scale``).

    >>> drift_lines({"config": "/p/services.yaml", "drift": {"summer": {"running": 3, "configured": 1}}})
    ['* summer: running 3 replicas, services.yaml says 1 (streampipe apply scales it back to 1)']
    """
    name = os.path.basename(str(st.get("config") or "")) or "the config"
    return [f"{DRIFT_MARK} {stage}: running {d['running']} replicas, {name} says {d['configured']} "
            f"(streampipe apply scales it back to {d['configured']})" for stage, d in (st.get("drift") or {}).items()]


def status_table(st: dict[str, Any], width: int | None = None, wide: bool = False) -> Table:
    """The status of a pipeline (what the ``status`` control command answers) as a rich table that fits ``width``."""
    from rich.markup import escape
    from rich.table import Table

    rows = rows_of(st)
    malformed = "".join(f"  malformed on {sock}: {n}" for sock, n in sorted((st.get("malformed") or {}).items()))
    columns = fitted_columns(rows, width, wide)
    shown = [c for c, _ in columns]
    hidden = [c.header for c in COLUMNS if c not in shown and (not c.text or any(c.cell(r) for r in rows))]
    table = Table(title=f"{st['pipeline']}  supervisor {st['supervisor_pid']}  up {fmt_uptime(st['uptime_s'])}  "
                        f"delivery {st['delivery']}{malformed}", title_justify="left", header_style="bold",
                  caption="\n".join(escape(line) for line in [
                      *drift_lines(st), *([f"not shown at this width: {', '.join(hidden)} (--wide shows all)"] if hidden else [])])
                  or None, caption_justify="left")
    for col, w in columns:
        table.add_column(col.header, justify="right" if col.right else "left", no_wrap=True,
                         overflow="ellipsis" if col.text else "fold", min_width=None if col.text else w,
                         max_width=w if col.text and not wide else None)
    for r in rows:
        cells = []
        for col, _ in columns:
            text = escape(col.cell(r))
            if col.header == "state":
                text = f"[{STATE_STYLE.get(r['state'], '')}]{text}[/]"
            cells.append(text)
        table.add_row(*cells)
    return table


def print_status(console: Console, st: dict[str, Any], wide: bool = False) -> None:
    """Print the status table on ``console``: fitted to its width, or (``wide``) at the width all columns take."""
    table = status_table(st, console.width, wide)
    if not wide:
        console.print(table)
        return
    width = console.width
    console.width = max(width, table_width([w for _, w in fitted_columns(rows_of(st), None, True)]))
    try:
        console.print(table)
    finally:
        console.width = width
