"""services.yaml validation: every kind of mistake exits 2 naming the file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from streampipe.launcher.config import load_config
from streampipe.launcher.errors import ConfigError
from tests.conftest import cli

GOOD = """\
pipeline: t
stages:
  gen:
    type: generator
    options: {count: 10}
  norm:
    type: normalizer
    inputs: [gen]
  sink:
    type: consumer
    inputs: [norm, norm.holdout]
"""

# (name, yaml, line the error must name, text the message must contain)
BROKEN = [
    ("unknown_top_key", GOOD.replace("pipeline: t", "pipeline: t\nstagez: 1"), 2, "stagez: unknown key (did you mean 'stages'?)"),
    ("unknown_stage_key", GOOD.replace("    inputs: [gen]", "    inputs: [gen]\n    replica: 2"), 9, "stages.norm.replica: unknown key"),
    ("wrong_type", GOOD.replace("    inputs: [gen]", "    inputs: [gen]\n    replicas: two"), 9, "stages.norm.replicas"),
    ("out_of_range", GOOD.replace("    inputs: [gen]", "    inputs: [gen]\n    replicas: 0"), 9, "greater than or equal to 1"),
    ("bad_restart", GOOD.replace("    inputs: [gen]", "    inputs: [gen]\n    restart: sometimes"), 9, "stages.norm.restart"),
    ("unknown_input", GOOD.replace("inputs: [gen]", "inputs: [gen, nope]"), 8, "unknown stage 'nope'"),
    ("duplicate_input", GOOD.replace("inputs: [gen]", "inputs: [gen, gen.default]"), 8, "'gen.default' is already an input of 'norm'"),
    ("unknown_output", GOOD.replace("norm.holdout", "norm.sideways"), 11, "has no output 'sideways'"),
    ("missing_type", GOOD.replace("    type: normalizer\n", ""), 6, "stages.norm.type: this key is required"),
    ("no_implementation", GOOD.replace("type: consumer", "type: consumr"), 10, "unknown stage type 'consumr'"),
    ("missing_module", GOOD.replace("type: consumer", "type: nosuchmodule:Sink"), 10, "module 'nosuchmodule' not found"),
    ("yaml_syntax", GOOD.replace("inputs: [gen]", "inputs: [gen"), 9, "invalid YAML"),
    ("source_with_inputs", GOOD.replace("    options: {count: 10}", "    options: {count: 10}\n    inputs: [sink]"), 6, "is a source"),
    ("misspelt_stage_key", GOOD.replace("inputs: [gen]", "input: [gen]"), 8, "stages.norm.input: unknown key (did you mean 'inputs'?)"),
    ("misspelt_default", GOOD.replace("stages:", "defaults: {max_restart: 3}\nstages:"), 2, "defaults.max_restart: unknown key (did you mean 'max_restarts'?)"),
    ("misspelt_input", GOOD.replace("inputs: [gen]", "inputs: [gne]"), 8, "unknown stage 'gne' (did you mean 'gen'?)"),
    ("misspelt_builtin", GOOD.replace("type: consumer", "type: consumr"), 10, "unknown stage type 'consumr' (did you mean 'consumer'?)"),
]

CYCLE = """\
pipeline: t
stages:
  gen: {type: generator}
  a:
    type: normalizer
    inputs: [gen, b]
  b:
    type: normalizer
    inputs: [a]
"""


@pytest.mark.parametrize("name,text,line,needle", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_names_line_and_field(tmp_path: Path, name: str, text: str, line: int, needle: str) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"services.yaml:{line}:" in str(info.value), str(info.value)
    assert needle in str(info.value)


def test_cycle_is_named(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(CYCLE)
    with pytest.raises(ConfigError, match=r"cycle in inputs: .*a.*b") as info:
        load_config(path)
    assert info.value.line in (6, 9)


def test_class_missing_from_user_module(tmp_path: Path) -> None:
    (tmp_path / "mystages.py").write_text("class Other:\n    pass\n")
    path = tmp_path / "services.yaml"
    path.write_text(GOOD.replace("type: consumer", "type: mystages:Sink"))
    with pytest.raises(ConfigError, match="defines no 'Sink'"):
        load_config(path)


def test_module_missing_a_dependency_is_a_config_error(tmp_path: Path) -> None:
    """issue 27: the check imports the module in a child anyway, so it says what fails and where
    (a stage that fails later, in setup, still starts and fails: tests/test_monitor.py)."""
    (tmp_path / "broken.py").write_text("import os\nimport nosuchdependency\nclass Sink:\n    pass\n")
    path = tmp_path / "services.yaml"
    path.write_text(GOOD.replace("type: consumer", "type: broken:Sink"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = GOOD.splitlines().index("    type: consumer") + 1
    assert str(info.value).startswith(f"{path}:{line}: stages.sink.type: module 'broken' fails to import: "
                                      "broken.py:2: ModuleNotFoundError: No module named 'nosuchdependency'\n"), str(info.value)


def test_defaults_apply_unless_overridden(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(GOOD.replace("stages:", "defaults: {restart: never, max_batch: 7}\nstages:").replace(
        "    inputs: [gen]", "    inputs: [gen]\n    restart: on-failure"))
    cfg = load_config(path)
    assert cfg.stages["gen"].restart == "never" and cfg.stages["norm"].restart == "on-failure"
    assert all(s.max_batch == 7 for s in cfg.stages.values())
    assert cfg.downstream_first().index("sink") < cfg.downstream_first().index("norm") < cfg.downstream_first().index("gen")


def test_cli_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(BROKEN[5][1])
    for command in ("validate", "up"):
        proc = cli(command, "--config", str(path), cwd=tmp_path, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "services.yaml:8:" in proc.stderr and "stages.norm.inputs[1]" in proc.stderr
    assert not (tmp_path / ".streampipe").exists()


def test_default_services_yaml_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "services.yaml")
    assert {"generator", "normalizer", "consumer"} <= set(cfg.stages)


def test_example_in_readme_is_valid(tmp_path: Path) -> None:
    """The README's services.yaml reference example loads."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text().split("\n## services.yaml\n", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mystages.py").write_text(textwrap.dedent("""
        from streampipe import Stage
        class Enricher(Stage):
            def process(self, batch):
                return batch
    """))
    (tmp_path / "services.yaml").write_text(block)
    load_config(tmp_path / "services.yaml")


def test_connector_examples_in_readme_are_valid(tmp_path: Path) -> None:
    """Each services.yaml of the README's Connectors section loads, and its stages take their options
    (no server needed: a stage's __init__ checks them and connects only in setup)."""
    from streampipe.stages.registry import load_target

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text().split("\n## Connectors\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert len(blocks) == 3
    for k, block in enumerate(blocks):
        (tmp_path / f"{k}.yaml").write_text(block)
        cfg = load_config(tmp_path / f"{k}.yaml")
        for stage in cfg.stages.values():
            load_target(stage.type)(**stage.options)


def test_bad_log_rotation_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(GOOD.replace("pipeline: t", "pipeline: t\nlogging: {rotation: bogus}"))
    with pytest.raises(ConfigError, match="logging.rotation") as info:
        load_config(path)
    assert info.value.line == 2


def test_two_stages_of_one_name_are_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(GOOD.replace("  sink:\n", "  norm:\n    type: consumer\n    inputs: [gen]\n  sink:\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "services.yaml:9: stages.norm: duplicate key 'norm': first at line 6, again at line 9" in str(info.value)


def test_an_input_naming_an_output_its_stage_never_declares_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mystages.py").write_text(textwrap.dedent("""
        def add_sum(record):
            return record

        class Summer:
            def process(self, batch):
                return batch

        class Splitter:
            outputs = ("holdout",)
            def process(self, batch):
                return batch
            def route(self, record):
                return "holdout"
    """))
    path = tmp_path / "services.yaml"
    base = """\
        pipeline: t
        stages:
          gen: {type: generator}
          summer: {type: "mystages:Summer", inputs: [gen]}
          fn: {type: "mystages:add_sum", inputs: [gen]}
          split: {type: "mystages:Splitter", inputs: [gen]}
          sink: {type: consumer, inputs: [INPUT]}
    """
    for ref, needle in (("summer.holdotu", "a class declares its named outputs"),
                        ("fn.side", "a function has only the default output"),
                        ("split.holdotu", "did you mean split.holdout?")):
        path.write_text(textwrap.dedent(base).replace("INPUT", ref))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert "services.yaml:7: stages.sink.inputs[0]:" in str(info.value) and needle in str(info.value), str(info.value)
    path.write_text(textwrap.dedent(base).replace("INPUT", "split.holdout, summer, fn.default"))
    load_config(path)


# -- issue 21: what passed validate and broke up, or wrote outside the run directory ---------------

LONG_NAME = "n" * 90
REFUSED_AT_VALIDATE = [
    ("output_climbs_out", GOOD.replace("inputs: [norm, norm.holdout]", "inputs: [norm, norm.holdout]\n    options: {output: ../elsewhere/notes.txt}"),
     12, "stages.sink.options.output: '../elsewhere/notes.txt' climbs out of the run directory"),
    ("output_absolute", GOOD.replace("inputs: [norm, norm.holdout]", "inputs: [norm, norm.holdout]\n    options: {output: /etc/notes.txt}"),
     12, "stages.sink.options.output: '/etc/notes.txt' is an absolute path"),
    ("trainer_folder_out", GOOD + "  tr:\n    type: trainer\n    inputs: [norm]\n    options:\n      checkpoint_dir: a/../../models\n",
     16, "stages.tr.options.checkpoint_dir: 'a/../../models' climbs out"),
    ("sqlite_path_absolute", GOOD.replace("type: consumer", "type: sqlite").replace("inputs: [norm, norm.holdout]", "inputs: [norm, norm.holdout]\n    options: {path: /tmp/else.db}"),
     12, "stages.sink.options.path: '/tmp/else.db' is an absolute path"),
    ("file_max_mb_inf", "logging: {file_max_mb: .inf}\n" + GOOD, 1, "logging.file_max_mb: Input should be a finite number"),
    ("timeout_nan", GOOD.replace("    inputs: [gen]", "    inputs: [gen]\n    heartbeat_timeout: .nan"), 9,
     "stages.norm.heartbeat_timeout: Input should be a finite number"),
    ("default_inf", GOOD.replace("stages:", "defaults: {stop_grace: .inf}\nstages:"), 2, "Input should be a finite number"),
    ("label_join_replicas", GOOD + "  join:\n    type: label_join\n    inputs: [norm]\n    replicas: 2\n", 15,
     "stages.join.replicas: label_join runs as one replica"),
    ("label_join_output_out", GOOD + "  join:\n    type: label_join\n    inputs: [norm]\n    options: {output: ../../x.jsonl}\n", 15,
     "stages.join.options.output: '../../x.jsonl' climbs out of the run directory"),
    ("partition_key_without_key", GOOD.replace("    inputs: [gen]", "    inputs: [gen]\n    partition: key"), 9,
     "stages.norm.key: partition: key needs the record field to split by"),
    ("key_without_partition", GOOD.replace("    inputs: [gen]", "    inputs: [gen]\n    key: user"), 9,
     "stages.norm.partition: key: is the field of partition: key"),
    ("window_replicas_unkeyed", GOOD + "  w:\n    type: window\n    inputs: [norm]\n    replicas: 2\n    options: {time: t, size: 5, key: user}\n",
     15, "stages.w.partition: a window with replicas must get each key's records in one replica: add partition: key and key: user"),
    ("stage_name_too_long", GOOD.replace("norm", LONG_NAME), 6,
     f"stages.{LONG_NAME}: a stage name of 90 bytes: at most 64, so that its socket paths fit"),
]


@pytest.mark.parametrize("name,text,line,needle", REFUSED_AT_VALIDATE, ids=[b[0] for b in REFUSED_AT_VALIDATE])
def test_refused_at_validate_with_file_and_line(tmp_path: Path, name: str, text: str, line: int, needle: str) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(text)
    proc = cli("validate", "--config", str(path), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"services.yaml:{line}:" in message and needle in message, message
    assert not (tmp_path / ".streampipe").exists()


def test_outside_the_run_dir_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(GOOD.replace("inputs: [norm, norm.holdout]",
                                 "inputs: [norm, norm.holdout]\n    allow_outside_run_dir: true\n    options: {output: ../notes.txt}"))
    assert load_config(path).stages["sink"].options["output"] == "../notes.txt"
    inside = tmp_path / "inside.yaml"
    inside.write_text(GOOD.replace("inputs: [norm, norm.holdout]", "inputs: [norm, norm.holdout]\n    options: {output: out/../x.jsonl}"))
    assert load_config(inside).stages["sink"].options["output"] == "out/../x.jsonl"
