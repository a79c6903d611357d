"""The stage contract, checked against every built-in stage and the README's example stage.

Like river's estimator checks: a handful of generic properties every stage must have, run
in-process through :mod:`stages.testing` (the same Processor the runtime uses).
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from streampipe.stages import wire
from streampipe.stages.api import Stage, is_source
from streampipe.stages.consumer import Consumer
from streampipe.stages.evaluator import Evaluator
from streampipe.stages.generator import Generator
from streampipe.stages.log_extractor import LogExtractor
from streampipe.stages.normalizer import Normalizer
from streampipe.stages.registry import BUILTINS, load_class
from streampipe.stages.trainer import Trainer
from streampipe.testing import run_stage

ROOT = Path(__file__).resolve().parent.parent


def readme_stage() -> type[Stage]:
    """The ``mystages.py`` example of the README, imported as written."""
    text = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "class Enricher" in block)
    path = Path(__file__).parent / "_readme_mystages.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("_readme_mystages", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["_readme_mystages"] = module
    spec.loader.exec_module(module)
    path.unlink()
    return module.Enricher


def records(n: int = 300) -> list[dict[str, Any]]:
    norm = Normalizer()
    return norm.process(list(itertools.islice(Generator(seed=3).generate(), n)))


TRANSFORMS: dict[str, Any] = {
    "normalizer": lambda: Normalizer(holdout=0.2),
    "consumer": lambda: Consumer(output="out.jsonl"),
    "trainer": lambda: Trainer(checkpoint_every=100, checkpoint_seconds=0),
    "evaluator": lambda: Evaluator(every=50),
    "readme:Enricher": lambda: readme_stage()(),
}
SOURCES: dict[str, Any] = {
    "generator": lambda: Generator(count=500, seed=1),
    "log_extractor": lambda: LogExtractor(window_s=1),
}

ACCEPTS_ANY_MAP = {"consumer"}   # a sink writes whatever map it gets: nothing is malformed to it
MALFORMED = [{"id": 10_000, "x": "not-a-vector", "y": 1}, {"id": 10_001, "y": 0}, {"id": 10_002, "x": [1.0, None], "y": 0}]


def test_every_builtin_is_covered() -> None:
    assert set(BUILTINS) == set(TRANSFORMS) - {"readme:Enricher"} | set(SOURCES)
    for name, builtin in BUILTINS.items():
        assert is_source(load_class(name)) == builtin.source, name


@pytest.mark.parametrize("name", TRANSFORMS)
def test_empty_batch(name: str, tmp_path: Path) -> None:
    run = run_stage(TRANSFORMS[name](), [[]], run_dir=tmp_path)
    assert run.records == [] and run.dead_letters == []


@pytest.mark.parametrize("name", TRANSFORMS)
def test_malformed_records_are_dead_lettered_not_fatal(name: str, tmp_path: Path) -> None:
    good = records(200)
    if name == "evaluator":   # it scores (and so checks records) once a model exists
        run_stage(Trainer(checkpoint_every=100, checkpoint_seconds=0), [good], run_dir=tmp_path)
    run = run_stage(TRANSFORMS[name](), [good[:100], MALFORMED + good[100:150], good[150:]], run_dir=tmp_path)
    failed_ids = {r.get("id") for r, _ in run.dead_letters}
    assert failed_ids <= {m["id"] for m in MALFORMED}
    if name not in ACCEPTS_ANY_MAP:
        assert 10_000 in failed_ids, f"{name} let a non-vector through"
    assert all(reason for _, reason in run.dead_letters)
    # the stage kept processing the records after the bad ones
    if run.records:
        assert any(r["id"] >= 150 for r in run.records)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_output_is_msgpack_serialisable(name: str, tmp_path: Path) -> None:
    run = run_stage(TRANSFORMS[name](), [records(100)], run_dir=tmp_path)
    assert wire.unpackb(wire.packb(run.records)) == run.records


@pytest.mark.parametrize("name", [*TRANSFORMS, *SOURCES])
def test_snapshot_restore_round_trips(name: str, tmp_path: Path) -> None:
    make = {**TRANSFORMS, **SOURCES}[name]
    stage = make()
    if name in SOURCES:
        run_stage(stage, run_dir=tmp_path, limit=50, teardown=False)
    else:
        run_stage(stage, [records(100)], run_dir=tmp_path, teardown=False)
    snap = stage.snapshot()
    assert wire.unpackb(wire.packb(snap)) == snap, "a snapshot must cross msgpack unchanged"
    again = make()
    again.restore(wire.unpackb(wire.packb(snap)))
    assert again.snapshot() == snap
    stage.teardown()


@pytest.mark.parametrize("name", SOURCES)
def test_sources_yield_records_with_ids(name: str, tmp_path: Path) -> None:
    if name == "log_extractor":
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "a.0.jsonl").write_text("")
        run = run_stage(SOURCES[name](), run_dir=tmp_path, limit=10)
        assert run.records == [], "no log lines: nothing to say yet"
        return
    run = run_stage(SOURCES[name](), run_dir=tmp_path, limit=500)
    ids = [r["id"] for r in run.records]
    assert ids == list(range(500))
    assert all(isinstance(r["t"], float) for r in run.records)


def test_generator_resumes_without_skipping(tmp_path: Path) -> None:
    first = Generator(count=300, seed=9)
    run_a = run_stage(first, run_dir=tmp_path, limit=120)
    resumed = Generator(count=300, seed=9)
    resumed.restore(first.snapshot())
    run_b = run_stage(resumed, run_dir=tmp_path)
    full = run_stage(Generator(count=300, seed=9), run_dir=tmp_path)
    assert [r["id"] for r in run_a.records + run_b.records] == list(range(300))
    assert [r["x"] for r in run_a.records + run_b.records] == [r["x"] for r in full.records]


def test_generator_replays_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b,label\n1,2.5,x\n3,4.5,y\n")
    (tmp_path / "data.jsonl").write_text('{"id": 7, "v": 1}\n{"id": 8, "v": 2}\n')
    csv_run = run_stage(Generator(file="data.csv"), run_dir=tmp_path, context={"config_dir": tmp_path})
    assert [(r["id"], r["a"], r["b"], r["label"]) for r in csv_run.records] == [(0, 1, 2.5, "x"), (1, 3, 4.5, "y")]
    jsonl = Generator(file="data.jsonl")
    run = run_stage(jsonl, run_dir=tmp_path, context={"config_dir": tmp_path})
    assert [r["id"] for r in run.records] == [7, 8]
    resumed = Generator(file="data.jsonl")
    resumed.restore({"next": 1, "offset": len('{"id": 7, "v": 1}\n')})
    assert [r["id"] for r in run_stage(resumed, run_dir=tmp_path, context={"config_dir": tmp_path}).records] == [8]


def test_async_stage_is_driven_on_an_event_loop(tmp_path: Path) -> None:
    import asyncio

    class Lookup(Stage):
        async def process(self, batch):
            await asyncio.sleep(0)
            return [{**r, "looked_up": True} for r in batch]

    run = run_stage(Lookup(), [records(10)], run_dir=tmp_path)
    assert len(run.records) == 10 and all(r["looked_up"] for r in run.records)


def test_unsendable_output_is_dead_lettered_not_fatal(pipeline, tmp_path: Path) -> None:
    """numpy values and tuples are converted; a record holding an object is dead-lettered."""
    import json
    import textwrap

    from tests.conftest import wait_for

    (tmp_path / "odd.py").write_text(textwrap.dedent("""
        import numpy as np
        from streampipe import Stage

        class Odd(Stage):
            def process(self, batch):
                out = []
                for r in batch:
                    r = {**r, "n": np.float32(1.5), "pair": (1, 2)}
                    if r["id"] % 100 == 3:
                        r["obj"] = object()
                    out.append(r)
                return out
    """))
    p = pipeline("""\
        pipeline: odd
        stages:
          generator: {type: generator, options: {rate: 2000}}
          odd: {type: "odd:Odd", inputs: [generator]}
          consumer: {type: consumer, inputs: [odd]}
    """)
    p.up()
    wait_for(lambda: len(p.output_ids()) > 300, timeout=30, what="records through the odd stage")
    line = json.loads((p.run_dir / "output" / "records.jsonl").read_text().splitlines()[0])
    assert line["n"] == 1.5 and line["pair"] == [1, 2]
    dead = wait_for(lambda: (p.run_dir / "deadletter" / "odd.jsonl").read_text().splitlines(), timeout=30, what="dead letters")
    assert "unsendable output" in json.loads(dead[0])["error"]
    assert p.row("odd")["restarts"] == 0 and p.row("odd")["state"] == "running"
    assert not [i for i in p.output_ids() if i % 100 == 3]


def test_odd_process_results_are_isolated(tmp_path: Path) -> None:
    class Odd(Stage):
        def process(self, batch):
            return [*batch, "a string", None]

    class Bare(Stage):
        def process(self, batch):
            return batch[0]

    class BadRoute(Stage):
        outputs = ("side",)

        def route(self, record):
            return "side" if record["id"] % 2 else "default"

    run = run_stage(Odd(), [[{"id": 1}]], run_dir=tmp_path)
    assert run.records == [{"id": 1}] and len(run.dead_letters) == 2
    assert run_stage(Bare(), [[{"id": 7}, {"id": 8}]], run_dir=tmp_path).records == [{"id": 7}]
    assert run_stage(BadRoute(), [[{"id": 1}, {"id": 2}]], run_dir=tmp_path).by_output == {"side": [{"id": 1}], "default": [{"id": 2}]}
