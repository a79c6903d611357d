"""``streampipe graph``: Mermaid and DOT list every stage and edge; a PNG is written without graphviz."""

from __future__ import annotations

import textwrap

import pytest

from streampipe.launcher.config import load_config
from streampipe.launcher.graph import layers, render_png, to_dot, to_mermaid

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
