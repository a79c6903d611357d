"""The plan of ``streampipe apply``: the diff of two configs, sorted by how each change is made live."""

from __future__ import annotations

import doctest
from typing import Any

from streampipe.launcher import plan as plan_module
from streampipe.launcher.config import PipelineConfig
from streampipe.launcher.plan import make_plan


def cfg(stages: dict[str, dict[str, Any]], **top: Any) -> PipelineConfig:
    return PipelineConfig.model_validate({"stages": stages, **top})


BASE = {
    "gen": {"type": "generator", "options": {"rate": 100}},
    "norm": {"type": "normalizer", "inputs": ["gen"], "replicas": 2},
    "mark": {"type": "m:Tag", "inputs": ["norm"], "options": {"tag": "a"}},
    "audit": {"type": "consumer", "inputs": ["mark"], "options": {"output": "output/audit.jsonl"}},
    "sink": {"type": "consumer", "inputs": ["mark"]},
}


def changed() -> dict[str, dict[str, Any]]:
    stages = {k: dict(v) for k, v in BASE.items()}
    stages["norm"]["replicas"] = 3
    stages["mark"]["options"] = {"tag": "b"}
    del stages["audit"]
    stages["enrich"] = {"type": "m:Enrich", "inputs": ["mark"]}
    stages["sink"]["inputs"] = ["enrich"]
    return stages


def test_the_same_config_is_an_empty_plan() -> None:
    plan = make_plan(cfg(BASE), cfg(BASE))
    assert plan.empty and not plan.refusals and plan.steps() == []


def test_added_removed_changed_and_what_changed() -> None:
    plan = make_plan(cfg(BASE), cfg(changed()))
    assert plan.added == ["enrich"] and plan.removed == ["audit"] and not plan.refusals
    assert set(plan.changed) == {"norm", "mark", "sink"}         # gen: nothing changed
    assert plan.changed["norm"].replicas == (2, 3) and not plan.changed["norm"].needs_restart
    mark = plan.changed["mark"]
    assert mark.restart == {"options": ({"tag": "a"}, {"tag": "b"})}
    assert mark.outputs == (["default>audit", "default>sink"], ["default>enrich"])   # new consumers: it restarts
    sink = plan.changed["sink"]
    assert sink.inputs == (["mark"], ["enrich"]) and not sink.needs_restart            # its input socket stays
    kinds = [(kind, stage) for kind, stage, _ in plan.steps()]
    assert kinds == [("add", "enrich"), ("inputs", "sink"), ("scale", "norm"), ("restart", "mark"), ("remove", "audit")]


def test_supervisor_settings_apply_in_place_and_data_plane_settings_restart() -> None:
    new = {k: dict(v) for k, v in BASE.items()}
    new["norm"].update(restart="on-failure", max_restarts=9, heartbeat_timeout=3.0)
    new["sink"].update(max_batch=500)
    plan = make_plan(cfg(BASE, poll_interval=0.5), cfg(new, poll_interval=0.2))
    assert plan.changed["norm"].settings == {"restart": ("always", "on-failure"), "heartbeat_timeout": (10.0, 3.0),
                                             "max_restarts": (5, 9)}
    assert not plan.changed["norm"].needs_restart
    assert plan.changed["sink"].restart == {"max_batch": (1000, 500)} and plan.changed["sink"].needs_restart
    assert plan.pipeline == {"poll_interval": (0.5, 0.2)}


def test_defaults_reach_every_stage() -> None:
    plan = make_plan(cfg(BASE), cfg(BASE, defaults={"stop_grace": 9.0}))
    assert set(plan.changed) == set(BASE) and all(c.settings == {"stop_grace": (5.0, 9.0)} for c in plan.changed.values())


def test_pipeline_wide_settings_are_refused() -> None:
    plan = make_plan(cfg(BASE), cfg(BASE, delivery="at-most-once", transport="tcp"))
    assert len(plan.refusals) == 2
    assert plan.refusals[0].startswith("delivery: 'at-least-once' -> 'at-most-once' cannot change while the pipeline runs")
    assert plan.refusals[1].startswith("transport: ")


def test_a_source_is_not_scaled_live_and_no_stage_turns_into_a_source() -> None:
    new = {k: dict(v) for k, v in BASE.items()}
    new["gen"]["replicas"] = 2
    new["mark"]["inputs"] = []
    new["mark"]["type"] = "m:Source"
    new["audit"]["inputs"] = ["norm"]
    refusals = make_plan(cfg(BASE), cfg(new)).refusals
    assert any(r.startswith("stages.gen.replicas: gen is a source") for r in refusals)
    assert any(r.startswith("stages.mark.inputs: a stage cannot turn into a source") for r in refusals)


def test_removed_stages_stop_sources_first_and_added_start_downstream_first() -> None:
    old = cfg({"a": {"type": "generator"}, "b": {"type": "normalizer", "inputs": ["a"]},
               "c": {"type": "consumer", "inputs": ["b"]}})
    new = cfg({"x": {"type": "generator"}, "y": {"type": "normalizer", "inputs": ["x"]},
               "z": {"type": "consumer", "inputs": ["y"]}})
    plan = make_plan(old, new)
    assert plan.removed == ["a", "b", "c"] and plan.added == ["z", "y", "x"]


def test_docstring_examples() -> None:
    assert doctest.testmod(plan_module).failed == 0
