"""``streampipe graph``: the pipeline of a ``services.yaml`` as Mermaid, Graphviz DOT or a PNG.

Every stage is a node labelled with its name, its type and its replicas (``normalizer ×2``);
every edge is an arrow, labelled with the output it reads when that is a named one
(``holdout``), or ``default`` too when a named edge joins the same two stages. Sources are drawn
rounded, the rest as boxes; in the PNG, edges between the same two stages bend apart.

``render_png`` uses Graphviz's ``dot`` when it is on ``PATH`` and otherwise draws the graph
with matplotlib (a layered layout: a stage's layer is its longest distance from a source; the
order inside a layer follows the parents' mean position, one barycenter sweep as in Sugiyama's
method), so it works without Graphviz installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Literal

DOT_TIMEOUT_S = 30.0    # graphviz lays out a few dozen nodes in milliseconds; 30 s means it hung

_MERMAID_RESERVED = {"end", "graph", "subgraph", "flowchart", "style", "class", "classDef", "click",
                     "linkStyle", "direction", "default"}


def _label(cfg: Any, name: str) -> tuple[str, str]:
    stage = cfg.stages[name]
    return name, f"{stage.type} ×{stage.replicas}"


def _sources(cfg: Any) -> set[str]:
    return {n for n, s in cfg.stages.items() if not s.inputs}


def _mermaid_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"stage_{safe}" if safe in _MERMAID_RESERVED or safe != name or not safe[:1].isalpha() else safe


def edge_labels(cfg: Any) -> list[tuple[Any, str | None]]:
    """Each edge with its label: the output it reads, or None for a lone ``default`` edge (beside a
    named edge between the same two stages, ``default`` is named too, so each of the two says which)."""
    edges = cfg.edges()
    pairs = Counter((e.src, e.dest) for e in edges)
    return [(e, None if e.output == "default" and pairs[e.src, e.dest] == 1 else e.output) for e in edges]


def to_mermaid(cfg: Any) -> str:
    """A Mermaid flowchart of the pipeline (paste into Markdown inside a ```mermaid block)."""
    sources = _sources(cfg)
    out = ["flowchart LR"]
    for name in cfg.stages:
        title, sub = _label(cfg, name)
        text = f"{title}<br/>{sub}".replace('"', "#quot;")
        shape = f'(["{text}"])' if name in sources else f'["{text}"]'
        out.append(f"    {_mermaid_id(name)}{shape}")
    for e, label in edge_labels(cfg):
        arrow = "-->" if label is None else f"-->|{label}|"
        out.append(f"    {_mermaid_id(e.src)} {arrow} {_mermaid_id(e.dest)}")
    return "\n".join(out) + "\n"


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(cfg: Any) -> str:
    """A Graphviz DOT digraph of the pipeline (``dot -Tsvg`` renders it)."""
    sources = _sources(cfg)
    out = [f"digraph {_dot_str(getattr(cfg, 'pipeline', 'pipeline'))} {{",
           "    rankdir=LR;",
           '    node [shape=box, style="rounded,filled", fillcolor="#eef3fb", color="#4a6fa5", fontname="Helvetica"];',
           '    edge [color="#555555", fontname="Helvetica", fontsize=10];']
    for name in cfg.stages:
        title, sub = _label(cfg, name)
        extra = ', fillcolor="#e6f4ea", color="#3a8a4a", shape=box' if name in sources else ""
        label = _dot_str(title)[:-1] + "\\n" + _dot_str(sub)[1:]      # DOT's own line break: \n
        out.append(f"    {_dot_str(name)} [label={label}{extra}];")
    for e, text in edge_labels(cfg):
        label = "" if text is None else f" [label={_dot_str(text)}]"
        out.append(f"    {_dot_str(e.src)} -> {_dot_str(e.dest)}{label};")
    out.append("}")
    return "\n".join(out) + "\n"


def layers(cfg: Any) -> list[list[str]]:
    """Stages by layer (longest path from a source), each layer ordered to limit crossings."""
    parents: dict[str, list[str]] = {n: [] for n in cfg.stages}
    for e in cfg.edges():
        parents[e.dest].append(e.src)
    depth: dict[str, int] = {}

    def d(n: str, trail: frozenset[str] = frozenset()) -> int:
        if n not in depth:
            ps = [p for p in parents[n] if p not in trail]        # a cycle cannot pass validation
            depth[n] = 1 + max((d(p, trail | {n}) for p in ps), default=-1)
        return depth[n]

    for n in cfg.stages:
        d(n)
    out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in cfg.stages:
        out[depth[n]].append(n)
    position: dict[str, float] = {}
    for layer in out:
        if position:
            layer.sort(key=lambda n: (sum(position[p] for p in parents[n]) / len(parents[n])) if parents[n] else 0.0)
        for i, n in enumerate(layer):
            position[n] = i - (len(layer) - 1) / 2
    return out


def render_png(cfg: Any, path: Path, engine: Literal["auto", "dot", "matplotlib"] = "auto") -> None:
    """Write a PNG of the pipeline: Graphviz ``dot`` when installed, else matplotlib."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dot = shutil.which("dot") if engine in ("auto", "dot") else None
    if engine == "dot" and dot is None:
        raise FileNotFoundError("graphviz 'dot' is not on PATH")
    if dot is not None:
        subprocess.run([dot, "-Tpng", "-Gdpi=150", "-o", str(path)], input=to_dot(cfg).encode(),
                       check=True, timeout=DOT_TIMEOUT_S, capture_output=True)
        return
    _render_matplotlib(cfg, path)


EDGE_SPREAD = 0.4       # arc3 bend between two parallel edges (fraction of their chord)
PORT_GAP = 0.22         # and between their ends on a box (data units; a box is 0.9 high)


def edge_bends(n: int, base: float = 0.0) -> list[float]:
    """The arc3 ``rad`` of each of ``n`` edges between the same two stages: spread around ``base``
    so that none is drawn over another (``normalizer -> consumer`` by ``default`` and ``holdout``).

    >>> edge_bends(1), edge_bends(2), edge_bends(3, base=0.4)
    ([0.0], [-0.2, 0.2], [0.0, 0.4, 0.8])
    """
    return [round(base + (i - (n - 1) / 2) * EDGE_SPREAD, 6) for i in range(n)]


def _render_matplotlib(cfg: Any, path: Path) -> None:
    figure(cfg).savefig(path, format="png")


def figure(cfg: Any) -> Any:
    """The pipeline drawn by matplotlib (a ``Figure``; ``render_png`` saves it when Graphviz is absent)."""
    # Figure + Agg canvas, not pyplot: no global backend switch, no window, thread-safe enough
    from streampipe.launcher.errors import import_extra

    import_extra("matplotlib", "plot", "streampipe graph --png (without Graphviz)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    grid = layers(cfg)
    sources = _sources(cfg)
    box_w, box_h, dx, dy = 2.2, 0.9, 3.4, 1.5
    pos: dict[str, tuple[float, float]] = {}
    for i, layer in enumerate(grid):
        for j, name in enumerate(layer):
            pos[name] = (i * dx, ((len(layer) - 1) / 2 - j) * dy)
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    xlim = (min(xs) - box_w / 2 - 0.4, max(xs) + box_w / 2 + 0.4)
    ylim = (min(ys) - box_h / 2 - 0.6, max(ys) + box_h / 2 + 0.5)
    inch = 0.9                            # data units per inch: boxes keep their shape at any size
    fig = Figure(figsize=((xlim[1] - xlim[0]) * inch, (ylim[1] - ylim[0]) * inch), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    for name, (x, y) in pos.items():
        title, sub = _label(cfg, name)
        source = name in sources
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.05,rounding_size=0.25" if source else "round,pad=0.05,rounding_size=0.05",
                                    facecolor="#e6f4ea" if source else "#eef3fb",
                                    edgecolor="#3a8a4a" if source else "#4a6fa5", linewidth=1.4))
        ax.text(x, y + 0.13, title, ha="center", va="center", fontsize=10, fontweight="bold")
        ax.text(x, y - 0.2, sub, ha="center", va="center", fontsize=8, color="#444444")
    parallel: dict[tuple[str, str], list[tuple[Any, str | None]]] = {}     # (src, dest) -> its edges, drawn apart
    for e, text in edge_labels(cfg):
        parallel.setdefault((e.src, e.dest), []).append((e, text))
    for (src, dest), group in parallel.items():
        (x0, y0), (x1, y1) = pos[src], pos[dest]
        start, end = (x0 + box_w / 2 + 0.05, y0), (x1 - box_w / 2 - 0.05, y1)
        base = 0.0
        if x1 <= x0:                      # same or earlier layer: go around below
            start, end, base = (x0, y0 - box_h / 2 - 0.05), (x1, y1 - box_h / 2 - 0.05), 0.4
        for k, (rad, (e, text)) in enumerate(zip(edge_bends(len(group), base), group)):
            lift = ((len(group) - 1) / 2 - k) * PORT_GAP     # parallel edges leave and reach the boxes apart too
            a = (start[0], start[1] + lift) if x1 > x0 else (start[0] + lift, start[1])
            b = (end[0], end[1] + lift) if x1 > x0 else (end[0] + lift, end[1])
            ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, color="#555555", linewidth=1.2,
                                         connectionstyle=f"arc3,rad={rad:g}", gid=f"edge {src}.{e.output}>{dest}"))
            if text is None:
                continue
            # the curve's midpoint: arc3 bends by rad * the chord, perpendicular to it (half of it at t=0.5)
            (mx, my), (dx, dy) = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2), (b[0] - a[0], b[1] - a[1])
            ax.text(mx + rad * dy / 2, my - rad * dx / 2, text, ha="center", va="center",
                    fontsize=8, color="#7a4a00", style="italic", gid=f"label {src}.{e.output}>{dest}",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.9})
    ax.text(xlim[0] + 0.15, ylim[1] - 0.15, getattr(cfg, "pipeline", ""), ha="left", va="top", fontsize=11, color="#333333")
    return fig
