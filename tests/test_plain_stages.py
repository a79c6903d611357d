"""Stages as users write them: plain classes and functions, and ``options`` checked at validate.

The end-to-end test runs a real pipeline through the real CLI; the validate tests run
``streampipe validate`` as a user would and read its exit status and message.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from streampipe.stages.api import FunctionStage, Plain, as_stage
from streampipe.testing import run_stage
from tests.conftest import cli, wait_for

MYSTAGES = textwrap.dedent('''
    """User stages that import nothing from streampipe."""
    import asyncio

    class Count:
        """A plain source: generate() and a resumable position."""
        def __init__(self, n: int):
            self.n, self.next = n, 0
        def generate(self):
            while self.next < self.n:
                yield {"id": self.next, "x": [float(self.next)], "y": self.next % 2}
                self.next += 1
        def snapshot(self):
            return {"next": self.next}
        def restore(self, state):
            self.next = state["next"]

    class Tag:
        """A plain transform; it reads self.context, set by the runtime."""
        def __init__(self, tag: str = "none"):
            self.tag = tag
        def process(self, batch):
            return [{**r, "tag": self.tag, "stage": self.context.name} for r in batch]

    def enrich(record):
        if record["id"] % 10 == 0:
            return None                                   # dropped
        return {**record, "double": record["id"] * 2}

    async def lookup(record):
        await asyncio.sleep(0)                            # an I/O-bound call, say
        return [{**record, "looked_up": True}]

    class Nothing:
        def __init__(self, level: int = 1):
            self.level = level

    class Loose:
        def __init__(self, level: int = 1, **options):
            self.level, self.options = level, options
        def process(self, batch):
            return batch

    def two(record, other):
        return record

    print("imported mystages")                            # must not confuse validate
    NOT_A_STAGE = 42
''')

PIPELINE = """\
pipeline: plain
stages:
  count:
    type: mystages:Count
    options: {n: 300}
  tag:
    type: mystages:Tag
    inputs: [count]
    options: {tag: plain}
  enrich: {type: "mystages:enrich", inputs: [tag]}
  lookup: {type: "mystages:lookup", inputs: [enrich]}
  sink: {type: consumer, inputs: [lookup]}
"""


def test_plain_class_and_functions_run_end_to_end(pipeline, tmp_path: Path) -> None:
    (tmp_path / "mystages.py").write_text(MYSTAGES)
    p = pipeline(PIPELINE)
    p.up()
    expected = [i for i in range(300) if i % 10]
    wait_for(lambda: sorted(p.output_ids()) == expected, timeout=60, what="every record not dropped at the sink")
    lines = [json.loads(line) for line in (p.run_dir / "output" / "records.jsonl").read_text().splitlines()]
    assert all(r["tag"] == "plain" and r["stage"] == "tag" and r["double"] == 2 * r["id"] and r["looked_up"] for r in lines)
    wait_for(lambda: p.row("count")["state"] == "completed", timeout=30, what="the plain source to complete")


def _validate(tmp_path: Path, stages: str) -> tuple[int, str]:
    (tmp_path / "mystages.py").write_text(MYSTAGES)
    (tmp_path / "services.yaml").write_text("pipeline: v\nstages:\n" + stages)
    proc = cli("validate", "--config", str(tmp_path / "services.yaml"), cwd=tmp_path, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


# (name, stages: yaml, line, field, text the message must contain)
MISTAKES = [
    ("class_without_process", """\
  gen: {type: generator}
  odd:
    type: mystages:Nothing
    inputs: [gen]
""", 5, "stages.odd.type", "has neither process(batch), generate() nor"),
    ("misspelt_option", """\
  gen:
    type: generator
    options:
      rate: 0
      cout: 1000
""", 7, "stages.gen.options.cout", "did you mean 'count'?"),
    ("wrong_type_builtin", """\
  gen:
    type: generator
    options: {count: lots}
""", 5, "stages.gen.options.count", "Input should be a valid integer, got 'lots'"),
    ("wrong_type_nested", """\
  gen: {type: generator}
  norm:
    type: normalizer
    inputs: [gen]
    options:
      schema: {x: 1}
""", 8, "stages.norm.options.schema", "valid string"),
    ("function_arity", """\
  gen: {type: generator}
  f:
    type: mystages:two
    inputs: [gen]
""", 5, "stages.f.type", "does not take exactly one positional argument"),
    ("function_with_options", """\
  gen: {type: generator}
  f:
    type: mystages:enrich
    inputs: [gen]
    options: {factor: 2}
""", 7, "stages.f.options", "a function stage takes no options"),
    ("missing_required", """\
  src: {type: "mystages:Count"}
""", 3, "stages.src.options", "needs option(s) n"),
    ("neither_class_nor_function", """\
  gen: {type: generator}
  f: {type: "mystages:NOT_A_STAGE", inputs: [gen]}
""", 4, "stages.f.type", "neither a class nor a function"),
    ("named_option_of_kwargs_stage", """\
  gen: {type: generator}
  loose:
    type: mystages:Loose
    inputs: [gen]
    options: {level: high, anything: 1}
""", 7, "stages.loose.options.level", "valid integer"),
    ("user_source_with_inputs", """\
  gen: {type: generator}
  src: {type: "mystages:Count", inputs: [gen], options: {n: 3}}
""", 4, "stages.src.inputs", "is a source and takes no inputs"),
]


@pytest.mark.parametrize("name,stages,line,field,needle", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_validate_exits_2_naming_line_and_field(tmp_path: Path, name: str, stages: str, line: int, field: str, needle: str) -> None:
    code, out = _validate(tmp_path, stages)
    assert code == 2, out
    assert f"services.yaml:{line}: {field}:" in out, out
    assert needle in " ".join(out.split()), out


def test_kwargs_stage_accepts_extra_keys_and_floats_take_ints(tmp_path: Path) -> None:
    code, out = _validate(tmp_path, """\
  gen:
    type: generator
    options: {rate: 5, count: 10}
  loose:
    type: mystages:Loose
    inputs: [gen]
    options: {level: 3, anything: 1, more: [1, 2]}
""")
    assert code == 0, out


def test_broken_module_is_a_config_error(tmp_path: Path) -> None:
    """A module that is found but raises when imported: validate imported it, so it says so (issue 27),
    naming the services.yaml line of the type, the module's file and line, and the error."""
    (tmp_path / "broken.py").write_text("import os\n\nraise RuntimeError('no database here')\n")
    code, out = _validate(tmp_path, """\
  gen: {type: generator}
  b:
    type: broken:Sink
    inputs: [gen]
    options: {whatever: 1}
""")
    assert code == 2, out
    assert "services.yaml:5: stages.b.type: module 'broken' fails to import: broken.py:3: RuntimeError: no database here" in out
    assert "introspect" not in out and "importlib" not in out, "only the user's frames of the traceback"


def test_harness_adapts_plain_objects_and_functions() -> None:
    class Upper:
        def process(self, batch):
            return [{**r, "name": r["name"].upper()} for r in batch]

    def split(record):
        return [record, {**record, "copy": True}] if record["name"] != "bad" else record["missing"]

    up = run_stage(Upper(), [[{"id": 0, "name": "ada"}]])
    assert up.records == [{"id": 0, "name": "ADA"}] and up.by_output == {"default": up.records}
    run = run_stage(split, [[{"id": 0, "name": "a"}, {"id": 1, "name": "bad"}]])
    assert [r["id"] for r in run.records] == [0, 0] and [r["id"] for r, _ in run.dead_letters] == [1]
    assert isinstance(as_stage(Upper()), Plain) and isinstance(as_stage(split), FunctionStage)
    with pytest.raises(TypeError, match="is a class"):
        as_stage(Upper)
