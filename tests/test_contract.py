"""The stage contract, checked against every built-in stage and the README's example stage.

Like river's estimator checks: :func:`streampipe.testing.check_stage` runs the generic
properties every stage must have (the function a stage author runs on theirs), each a check
function of its own that runs and reports whatever the others found. ``test_builtin_passes_check``
is the matrix of built-in stage x check; the tests below it show that each check fails on a
stage that breaks it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streampipe import Source, Stage
from streampipe.stages.api import is_source
from streampipe.stages.builtins.compare import Compare
from streampipe.stages.builtins.consumer import Consumer
from streampipe.stages.builtins.evaluator import Evaluator
from streampipe.stages.builtins.follow import Follow
from streampipe.stages.builtins.generator import Generator
from streampipe.stages.builtins.http_source import HttpSource
from streampipe.stages.builtins.join import Enrich, Join
from streampipe.stages.builtins.label_join import LabelJoin
from streampipe.stages.builtins.log_extractor import LogExtractor
from streampipe.stages.builtins.normalizer import Normalizer
from streampipe.stages.builtins.predictor import Predictor
from streampipe.stages.builtins.serve import Serve
from streampipe.stages.builtins.sqlite_sink import SqliteSink
from streampipe.stages.builtins.trainer import Trainer
from streampipe.stages.builtins.window import Window
from streampipe.stages.delivery import ExactSink
from streampipe.stages.registry import BUILTINS, load_target
from streampipe.testing import StageContractError, StageReport, check_stage, run_stage

ROOT = Path(__file__).resolve().parent.parent


def readme_code(marker: str) -> str:
    """The README's Python block that contains ``marker``."""
    text = (ROOT / "README.md").read_text()
    return next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if marker in block)


def readme_stage(folder: Path) -> type[Stage]:
    """The ``mystages.py`` example of the README, imported as written (from ``folder``, not tests/)."""
    (folder / "mystages.py").write_text(readme_code("class Enricher"))
    sys.path.insert(0, str(folder))
    try:
        sys.modules.pop("mystages", None)
        import mystages  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mystages", None)
    return mystages.Enricher  # type: ignore[no-any-return]


def records(n: int = 300) -> list[dict[str, Any]]:
    return Normalizer().process(list(itertools.islice(Generator(seed=3).generate(), n)))


def batches(n: int = 300, size: int = 100) -> list[list[dict[str, Any]]]:
    rs = records(n)
    return [rs[i:i + size] for i in range(0, n, size)]


# name -> (folder -> factory of fresh instances)
TRANSFORMS: dict[str, Any] = {
    "normalizer": lambda tmp: lambda: Normalizer(holdout=0.2),
    "consumer": lambda tmp: lambda: Consumer(output="out.jsonl"),
    "sqlite": lambda tmp: lambda: ExactSink(SqliteSink(path="out.db")),     # as load_stage gives it
    "trainer": lambda tmp: lambda: Trainer(checkpoint_every=100, checkpoint_seconds=0),
    "evaluator": lambda tmp: lambda: Evaluator(every=50),
    "predictor": lambda tmp: lambda: Predictor(poll_seconds=0),
    "compare": lambda tmp: lambda: Compare(every=100),
    "label_join": lambda tmp: lambda: LabelJoin(within=5),
    "window": lambda tmp: lambda: Window(time="t", size=0.01, aggregate={"n": "count", "y": "sum:y"}),    # the records are labels: they wait, the MALFORMED lack a time
    "join": lambda tmp: lambda: Join(key="id", time="t", within=5, how="left"),    # every batch from its left input: they wait
    "enrich": lambda tmp: lambda: Enrich(key="id", time="t"),                     # every batch a table row: kept
    "readme:Enricher": readme_stage,
}
# which input the batches come by, for a stage of two (StageContext.input)
CONTEXTS: dict[str, dict[str, Any]] = {"join": {"inputs": ("a", "b"), "input": "a"}, "enrich": {"inputs": ("a", "b"), "input": "b"}}
SOURCES: dict[str, Any] = {
    "generator": lambda tmp: lambda: Generator(count=500, seed=1),
    "log_extractor": lambda tmp: lambda: LogExtractor(window_s=1),
    "http": lambda tmp: lambda: HttpSource(port=0),
    "serve": lambda tmp: lambda: Serve(port=0),
    "follow": lambda tmp: lambda: Follow(path=str(tmp / "app.jsonl")),
}
STATEFUL = {"normalizer", "generator", "log_extractor", "label_join", "window", "join", "enrich"}   # the others keep their state in files (or have none)
ACCEPTS_ANY_MAP = {"consumer", "sqlite", "compare"}   # nothing is malformed to a sink that writes any map
MALFORMED = [{"id": 10_000, "x": "not-a-vector", "y": 1}, {"id": 10_001, "y": 0}, {"id": 10_002, "x": [1.0, None], "y": 0}]
ALL_CHECKS = ["init", "empty batch", "outputs", "snapshot", "restore", "teardown"]


SOURCE_CHECKS = ["init", "snapshot", "generate", "restore", "teardown"]
CHECKS_OF = {**{name: [*ALL_CHECKS, "bad records"] for name in TRANSFORMS}, **{name: SOURCE_CHECKS for name in SOURCES}}


def prepare(name: str, folder: Path) -> None:
    """What a stage's run directory holds before its check: the evaluator scores (and so checks
    records) once a model exists; the log extractor reads the logs there."""
    if name in ("evaluator", "predictor"):
        run_stage(Trainer(checkpoint_every=100, checkpoint_seconds=0), [records(200)], run_dir=folder)
    if name == "follow":
        (folder / "app.jsonl").write_text("".join(json.dumps({"n": i}) + "\n" for i in range(150)))
    if name == "log_extractor":
        (folder / "logs").mkdir()
        lines = [json.dumps({"record": {"level": {"name": "INFO"}, "message": f"line {i}", "time": {"timestamp": 1.0 + i}}})
                 for i in range(5)]
        (folder / "logs" / "a.0.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[StageReport, Path]]:
    """``contract(name)``: the report of check_stage on that built-in (or the README's stage) and its
    run directory. Each stage is checked once, every check reported; the matrix reads the outcomes."""
    done: dict[str, tuple[StageReport, Path]] = {}

    def run(name: str) -> tuple[StageReport, Path]:
        if name not in done:
            folder = tmp_path_factory.mktemp(re.sub(r"\W", "-", name))
            prepare(name, folder)
            try:
                if name in TRANSFORMS:
                    report = check_stage(TRANSFORMS[name](folder), batches(), bad_records=MALFORMED, run_dir=folder,
                                         context=CONTEXTS.get(name))
                else:
                    report = check_stage(SOURCES[name](folder), run_dir=folder, limit=120 if name == "generator" else 100)
            except StageContractError as exc:
                assert exc.report is not None
                report = exc.report
            done[name] = (report, folder)
        return done[name]

    return run


# connectors to a server: checked against a real one in their own files (tests/test_connectors_*.py)
NEED_A_SERVER = {"postgres", "nats", "nats_sink", "redis", "redis_sink"}


def test_every_builtin_is_covered() -> None:
    assert set(BUILTINS) - NEED_A_SERVER == set(TRANSFORMS) - {"readme:Enricher"} | set(SOURCES)
    for name, builtin in BUILTINS.items():
        assert is_source(load_target(name)) == builtin.source, name


@pytest.mark.parametrize(("name", "check"), [pytest.param(name, check, id=f"{name}-{check}")
                                             for name, checks in CHECKS_OF.items() for check in checks])
def test_builtin_passes_check(contract: Callable[[str], tuple[StageReport, Path]], name: str, check: str) -> None:
    """The matrix: every built-in stage (and the README's) x every check of the contract."""
    report, _ = contract(name)
    outcome = report.outcome(check)
    assert outcome.passed, f"{name}: {check}: {outcome.reason}"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_passes_the_contract(name: str, contract: Callable[[str], tuple[StageReport, Path]]) -> None:
    report, tmp_path = contract(name)
    assert not report.failed
    assert report.checks == [*ALL_CHECKS, "bad records"]
    assert report.stateful == (name in STATEFUL), report.snapshot
    dead = {r.get("id") for r, _ in report.dead_letters}
    if name in ACCEPTS_ANY_MAP:
        assert not dead, f"{name} dead-lettered records it should pass on"
    else:
        assert 10_000 in dead, f"{name} let a non-vector through"
        assert dead <= {m["id"] for m in MALFORMED}
    if name == "consumer":    # a sink: the bad records and the good ones after them reached its file
        written = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert {10_000, 10_001, 10_002} <= set(written) and set(range(300)) <= set(written)
    if name in ("normalizer", "readme:Enricher"):
        assert len(report.records) == 300


def test_generator_passes_the_contract_and_resumes_exactly(contract: Callable[[str], tuple[StageReport, Path]]) -> None:
    report, _ = contract("generator")
    assert not report.failed
    assert report.checks == ["init", "snapshot", "generate", "restore", "teardown"]
    assert [r["id"] for r in report.records] == list(range(240))
    assert report.snapshot == {"segments": [[120, 1, None]]} and report.stateful


def test_log_extractor_passes_the_contract(contract: Callable[[str], tuple[StageReport, Path]]) -> None:
    report, _ = contract("log_extractor")
    assert not report.failed
    assert report.stateful and report.snapshot["positions"], report.snapshot
    assert report.records and all(r["kind"] == "logfacts" for r in report.records)


def test_readme_check_stage_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme_stage(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mystages", raising=False)
    namespace: dict[str, Any] = {}
    exec(compile(readme_code("check_stage("), "README.md", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


# -- check_stage must be able to fail: one broken stage per check ---------------------------------
class Counter(Stage):
    """Counts records; its snapshot round-trips. The broken stages below break one thing each."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.n = 0

    def process(self, batch):
        self.n += len(batch)
        return [{**r, "n": self.n} for r in batch]

    def snapshot(self):
        return {"n": self.n}

    def restore(self, state):
        self.n = state["n"]


class ForgetsOnRestore(Counter):
    def restore(self, state):
        pass


class HalfSnapshot(Counter):
    """Its snapshot round-trips, but part of its state is not in it: a restart changes its output."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.total = 0

    def process(self, batch):
        self.total += len(batch)
        return [{**r, "total": self.total} for r in super().process(batch)]


class Unpackable(Counter):
    def process(self, batch):
        return [{**r, "obj": object()} for r in batch]


class NotAMap(Counter):
    def process(self, batch):
        return ["a string" for _ in batch]


LEAKED: list[Any] = []   # what the two stages below open in __init__ (closed by the test)


class OpensAFile(Counter):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        LEAKED.append(open(os.devnull))   # on purpose: the mistake under test


class OpensASocket(Counter):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        LEAKED.append(socket.socket())


class FailsOnEmpty(Counter):
    def process(self, batch):
        return batch[0]


class RejectsGood(Counter):
    def process(self, batch):
        if any("x" not in r for r in batch):
            raise ValueError("a batch with a bad record")   # retried record by record: only the bad one fails
        return batch


class RepeatsAfterRestore(Source):
    """The classic off-by-one of resume state: the position moves only when the next record is asked for."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.next_id = 0

    def generate(self):
        while self.next_id < 50:
            yield {"id": self.next_id}
            self.next_id += 1

    def snapshot(self):
        return {"next_id": self.next_id}

    def restore(self, state):
        self.next_id = state["next_id"]


class Plain:
    """No base class: any object with the stage methods is a stage."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def process(self, batch):
        return [{**r, "plain": True} for r in batch]


SAMPLE = [[{"id": 1, "x": [1.0]}, {"id": 2, "x": [2.0]}], [{"id": 3, "x": [3.0]}]]


@pytest.mark.parametrize(("broken", "check", "words"), [
    (ForgetsOnRestore, "snapshot", "restore(snapshot()) on a fresh instance gives snapshot {'n': 0}"),
    (HalfSnapshot, "restore", "after restore(snapshot())"),
    (Unpackable, "outputs", "msgpack cannot carry"),
    (NotAMap, "outputs", "a str, not a record"),
    (OpensAFile, "init", os.devnull),
    (OpensASocket, "init", "socket:["),
    (FailsOnEmpty, "empty batch", "IndexError"),
])
def test_check_stage_fails_on_a_broken_stage(broken: type[Stage], check: str, words: str) -> None:
    try:
        with pytest.raises(StageContractError) as caught:
            check_stage(broken, SAMPLE)
    finally:
        while LEAKED:
            LEAKED.pop().close()
    assert caught.value.check == check, str(caught.value)
    assert words in str(caught.value) and str(caught.value).startswith(f"check_stage({broken.__qualname__}): {check}: ")


def test_check_stage_runs_every_check_and_reports_each() -> None:
    """Not only the first failure: a stage that forgets its state on restore fails both the
    snapshot and the restore check; the others run and pass, and the error names both."""
    with pytest.raises(StageContractError) as caught:
        check_stage(ForgetsOnRestore, SAMPLE, bad_records=[{"id": 9}])
    report = caught.value.report
    assert report is not None and report.checks == [*ALL_CHECKS, "bad records"]
    assert [(o.check, o.passed) for o in report.outcomes] == [
        ("init", True), ("empty batch", True), ("outputs", True), ("snapshot", False), ("restore", False),
        ("teardown", True), ("bad records", True)]
    assert list(report.failed) == ["snapshot", "restore"] and all(report.failed.values())
    lines = str(caught.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["snapshot", "restore"]
    assert all(line.startswith("check_stage(ForgetsOnRestore): ") for line in lines)


def test_check_stage_takes_a_plain_function() -> None:
    """A per-record function is a stage in services.yaml (`type: mystages:add_sum`), so here too."""
    def add_sum(record):
        return {**record, "sum": sum(record["x"])}

    report = check_stage(add_sum, SAMPLE, bad_records=[{"id": 9, "x": "not numbers"}])
    assert report.stage == "test_check_stage_takes_a_plain_function.<locals>.add_sum"
    assert report.checks == [*ALL_CHECKS, "bad records"] and not report.failed
    assert [r["sum"] for r in report.records] == [1.0, 2.0, 3.0]
    assert [r["id"] for r, _ in report.dead_letters] == [9]


def test_check_stage_takes_a_factory_of_a_function_as_run_stage_takes_the_function() -> None:
    """A factory may make a function stage (issue 27: "function has neither process() nor generate()"):
    checked as it runs in a pipeline, and with the output run_stage gives for the same function."""
    def add_sum(record, field="x"):
        return {**record, "sum": sum(record[field])}

    report = check_stage(lambda: add_sum, SAMPLE, bad_records=[{"id": 9, "x": "not numbers"}])
    assert report.stage.endswith("add_sum") and report.checks == [*ALL_CHECKS, "bad records"] and not report.failed
    assert report.records == run_stage(add_sum, SAMPLE).records
    assert [r["id"] for r, _ in report.dead_letters] == [9]
    with pytest.raises(StageContractError, match="init: int has neither process"):
        check_stage(lambda: 3, SAMPLE)


def test_check_stage_fails_when_good_records_beside_bad_ones_are_dead_lettered() -> None:
    class DropsTheBatch(Counter):
        def process(self, batch):
            if any("x" not in r for r in batch):
                for r in batch:
                    self.reject(r, "one bad record spoils the batch")
                return []
            return batch

    assert check_stage(RejectsGood, SAMPLE, bad_records=[{"id": 9}]).dead_letters[0][0] == {"id": 9}
    with pytest.raises(StageContractError, match="bad records: a good record beside the bad ones"):
        check_stage(DropsTheBatch, SAMPLE, bad_records=[{"id": 9}])


def test_check_stage_fails_on_a_source_that_repeats_after_restore() -> None:
    with pytest.raises(StageContractError, match=r"restore: after restore\(snapshot\(\)\) the source went on with ids \[19,"):
        check_stage(RepeatsAfterRestore, limit=20)


def test_check_stage_takes_plain_classes_and_refuses_instances() -> None:
    assert check_stage(Plain, SAMPLE).records == [{**r, "plain": True} for b in SAMPLE for r in b]
    with pytest.raises(TypeError, match="the stage class or a factory"):
        check_stage(Plain(), SAMPLE)  # type: ignore[arg-type]


def test_async_stage_is_driven_on_an_event_loop(tmp_path: Path) -> None:
    import asyncio

    class Lookup(Stage):
        async def process(self, batch):
            await asyncio.sleep(0)
            return [{**r, "looked_up": True} for r in batch]

    run = run_stage(Lookup(), [records(10)], run_dir=tmp_path)
    assert len(run.records) == 10 and all(r["looked_up"] for r in run.records)
    assert check_stage(Lookup, batches(20, 10)).checks == ALL_CHECKS


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
