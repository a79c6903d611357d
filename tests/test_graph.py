"""``streampipe graph``: Mermaid and DOT list every stage and edge; a PNG is written without graphviz."""

from __future__ import annotations

import textwrap

import pytest

from streampipe.launcher.config import load_config
from streampipe.launcher.graph import figure, layers, render_png, to_dot, to_mermaid
from tests.conftest import cli

SERVICES = textwrap.dedent("""\
    pipeline: demo
    stages:
      generator:
        type: generator
      normalizer:
        type: normalizer
        inputs: [generator]
        replicas: 2
      trainer:
        type: consumer
        inputs: [normalizer]
      evaluator:
        type: consumer
        inputs: [normalizer.holdout, trainer]
      facts:
        type: log_extractor
    """)


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "services.yaml"
    path.write_text(SERVICES)
    return load_config(path)


def test_mermaid_lists_every_stage_and_edge(cfg):
    text = to_mermaid(cfg)
    assert text.startswith("flowchart LR")
    for name in cfg.stages:
        assert f"{name}<br/>" in text
    assert "normalizer ×2" in text and "log_extractor ×1" in text
    assert "generator --> normalizer" in text
    assert "normalizer -->|holdout| evaluator" in text
    assert "trainer --> evaluator" in text
    assert text.count("-->") == len(cfg.edges()) == 4


def test_dot_lists_every_stage_and_edge(cfg):
    text = to_dot(cfg)
    assert text.startswith('digraph "demo" {') and text.rstrip().endswith("}")
    for name in cfg.stages:
        assert f'"{name}" [label=' in text
    assert '"normalizer" [label="normalizer\\nnormalizer ×2"]' in text
    assert '"normalizer" -> "evaluator" [label="holdout"];' in text
    assert '"generator" -> "normalizer";' in text
    assert text.count("->") == 4


def test_layers_follow_dependency_depth(cfg):
    grid = layers(cfg)
    assert sorted(grid[0]) == ["facts", "generator"]
    assert grid[1] == ["normalizer"] and grid[2] == ["trainer"] and grid[3] == ["evaluator"]


def test_render_png_without_graphviz(cfg, tmp_path):
    out = tmp_path / "pipeline.png"
    render_png(cfg, out, engine="matplotlib")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_render_png_auto(cfg, tmp_path):
    out = tmp_path / "sub" / "auto.png"
    render_png(cfg, out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_without_the_plot_extra_the_error_names_it(cfg, tmp_path):
    """matplotlib is the `plot` extra: without it, `graph --png` and `report` say what to install."""
    import os
    import subprocess
    import sys

    blocked = ("import sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'streampipe'; "
               "from streampipe.launcher.cli import main; main()")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}   # no Graphviz either
    for args in (["graph", "--png", str(tmp_path / "g.png"), "--config", str(cfg.path)],
                 ["report", "--run-dir", str(tmp_path), "--out", str(tmp_path / "r.png")]):
        if args[0] == "report":
            (tmp_path / "metrics.jsonl").write_text('{"time": 1.0, "version": 1, "records_seen": 10, "metrics": {"accuracy": 0.9}}\n')
        proc = subprocess.run([sys.executable, "-c", blocked, *args], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "pip install 'streampipe[plot]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not list(tmp_path.glob("*.png"))


PARALLEL = SERVICES.replace("type: consumer\n    inputs: [normalizer]", "type: consumer\n    inputs: [normalizer, normalizer.holdout]")


def test_parallel_edges_are_drawn_apart_and_each_labelled(tmp_path):
    """issue 27: normalizer -> trainer by `default` and by `holdout` were two arrows on one line."""
    path = tmp_path / "services.yaml"
    path.write_text(PARALLEL)
    cfg = load_config(path)
    assert "normalizer -->|default| trainer" in to_mermaid(cfg) and "normalizer -->|holdout| trainer" in to_mermaid(cfg)
    assert '"normalizer" -> "trainer" [label="default"];' in to_dot(cfg)
    assert "generator --> normalizer" in to_mermaid(cfg), "a lone default edge stays unlabelled"
    fig = figure(cfg)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    arrows = {p.get_gid(): p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("edge normalizer.")}
    labels = {t.get_gid(): t for t in fig.axes[0].texts if (t.get_gid() or "").startswith("label normalizer.")}
    pair = ["normalizer.default>trainer", "normalizer.holdout>trainer"]
    assert set(pair) <= {g.removeprefix("edge ") for g in arrows}
    assert [labels[f"label {e}"].get_text() for e in pair] == ["default", "holdout"]
    one, two = (labels[f"label {e}"].get_window_extent(renderer) for e in pair)
    assert not one.overlaps(two), "the two labels sit on their own curves"
    mids = fig.axes[0].transData.transform([arrows[f"edge {e}"].get_path().vertices.mean(axis=0) for e in pair])
    assert abs(mids[0] - mids[1]).max() > 10, "the two curves are apart (display pixels)"
    assert "label generator.default>normalizer" not in {t.get_gid() for t in fig.axes[0].texts}


def test_graph_png_prints_only_where_it_wrote(tmp_path):
    path = tmp_path / "services.yaml"
    path.write_text(PARALLEL)
    out = tmp_path / "pipeline.png"
    proc = cli("graph", "--config", str(path), "--png", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {out}\n" and "flowchart" not in proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = cli("graph", "--config", str(path), cwd=tmp_path)
    assert proc.stdout.startswith("flowchart LR") and "wrote" not in proc.stdout + proc.stderr
