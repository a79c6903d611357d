"""``streampipe status`` finds the run directory without loading the config when the config
cannot name one (issue 19: the config's models cost ~150 ms of every ``status``), and the answer
is the one loading it gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from streampipe.launcher import cli
from streampipe.launcher.config import load_config
from streampipe.launcher.errors import ConfigError

STAGES = "stages:\n  generator: {type: generator}\n"


def the_long_way(config: Path) -> Path:
    """What resolve_run_dir answered before it had a short way: always load the config."""
    try:
        return load_config(config, check_stages=False).default_run_dir()
    except ConfigError:
        return (config.resolve().parent / ".streampipe").resolve()


@pytest.mark.parametrize(("text", "loads"), [
    (f"pipeline: a\n{STAGES}", False),                                   # no run_dir: .streampipe beside it
    (f"pipeline: a\nrun_dir: elsewhere\n{STAGES}", True),                # run_dir: read from the config
    ("pipeline: a\nrun_dir: elsewhere\nstages: [not, a, map]\n", True),  # invalid: .streampipe beside it
    (f'pipeline: a\n"run\\u005fdir": escaped\n{STAGES}', True),          # a key spelled with an escape
    ("pipeline: [unclosed\n", False),                                    # not even YAML
    (f"pipeline: a\nrun_dir:\n{STAGES}", True),                          # run_dir: null
])
def test_the_run_dir_is_the_configs_and_the_config_is_loaded_only_when_it_may_name_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, loads: bool) -> None:
    config = tmp_path / "services.yaml"
    config.write_text(text)
    expected = the_long_way(config)
    loaded: list[Path] = []
    real = load_config

    def spy(path: Path, **kwargs: bool):
        loaded.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr("streampipe.launcher.config.load_config", spy)
    assert cli.resolve_run_dir(None, config) == expected
    assert bool(loaded) == loads
    if "escaped" in text:
        assert expected == (tmp_path / "escaped").resolve()


def test_a_run_dir_given_is_taken_as_it_is(tmp_path: Path) -> None:
    assert cli.resolve_run_dir(tmp_path / "x", tmp_path / "missing.yaml") == (tmp_path / "x").resolve()
