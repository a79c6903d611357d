"""label_join: predictions scored by labels that come later, on another input, against a brute-force join.

The reference joins the two streams after the fact, in plain Python, by the rule the stage states:
same key, event times at most ``within`` apart; a record without a partner is unmatched once the
other stream's final watermark (its greatest time less ``lateness``) passed its time plus
``within``, pending otherwise. The stage must give exactly that, whatever the batches, the
interleaving of the two streams, a snapshot/restore in the middle, or SIGKILLs of its process.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from typing import Any

import pytest

from streampipe.stages.builtins.label_join import LabelJoin
from streampipe.testing import check_stage
from tests.conftest import PACED_SOURCE, wait_for


def reference(predictions: list[dict[str, Any]], labels: list[dict[str, Any]], within: float, lateness: float,
              key: str = "id", label_key: str = "id", time: str = "t", label_time: str = "t") -> dict[str, Any]:
    """What the join must end with: counts, and per model version the pairs and how many were right."""
    assert len({p[key] for p in predictions}) == len(predictions), "the reference takes one prediction per key"
    assert len({lb[label_key] for lb in labels}) == len(labels), "and one label per key"
    by_key = {lb[label_key]: lb for lb in labels}
    edge_p = max((p[time] for p in predictions), default=None)
    edge_l = max((lb[label_time] for lb in labels), default=None)
    matched: set[Any] = set()
    versions: Counter[Any] = Counter()
    right: Counter[Any] = Counter()
    out = Counter(predictions=len(predictions), labels=len(labels))
    for p in predictions:
        lb = by_key.get(p[key])
        if lb is not None and abs(lb[label_time] - p[time]) <= within:
            matched.add(p[key])
            out["matched"] += 1
            if p["prediction"] is None or p["model_version"] is None:
                out["unscored"] += 1
            else:
                versions[str(p["model_version"])] += 1
                right[str(p["model_version"])] += p["prediction"] == lb["y"]
        elif edge_l is not None and p[time] < edge_l - lateness - within:
            out["unmatched_predictions"] += 1
        else:
            out["pending_predictions"] += 1
    for lb in labels:
        if lb[label_key] in matched:
            continue
        if edge_p is not None and lb[label_time] < edge_p - lateness - within:
            out["unmatched_labels"] += 1
        else:
            out["pending_labels"] += 1
    return {"counts": dict(out), "versions": {v: {"matched": n, "accuracy": round(right[v] / n, 6)}
                                              for v, n in versions.items()}}


def as_reference(row: dict[str, Any]) -> dict[str, Any]:
    names = ("predictions", "labels", "matched", "unscored", "unmatched_predictions", "unmatched_labels",
             "pending_predictions", "pending_labels")
    return {"counts": {n: row[n] for n in names if row[n]}, "versions": row["versions"]}


def streams(rng: random.Random, n: int, disorder: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """n predictions at times 0..n-1 over three versions, some unscored; labels for most of them,
    some early, some late beyond the window, some for no prediction. Each stream arrives out of
    its time order by up to ``disorder``."""
    predictions = []
    for i in range(n):
        version = None if i < 20 else 1 + i * 3 // n
        predictions.append({"id": i, "t": float(i), "model_version": version,
                            "prediction": None if version is None else rng.randint(0, 1), "y": "ignored"})
    labels = []
    for i in range(n + 40):
        if i % 7 == 3:
            continue                                           # never labelled
        lag = rng.choice([-8.0, 2.0, 5.0, 9.5, 30.0]) if i % 4 == 0 else 3.0
        labels.append({"id": i, "t": i + lag, "y": rng.randint(0, 1)})

    def arrival(stream: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for _, r in sorted(((r["t"] + rng.uniform(0, disorder), r) for r in stream), key=lambda x: x[0])]

    return arrival(predictions), arrival(labels)


def interleave(rng: random.Random, a: list[Any], b: list[Any]) -> list[Any]:
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and rng.random() < 0.5):
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_join_is_the_brute_force_join_whatever_the_batches_and_the_interleaving(seed: int) -> None:
    rng = random.Random(seed)
    within, lateness, disorder = 10.0, 4.0, 3.5
    predictions, labels = streams(rng, 3000, disorder)
    expected = reference(predictions, labels, within, lateness)
    stream = interleave(rng, predictions, labels)
    join = LabelJoin(within=within, lateness=lateness, every=10**9)
    at = 0
    while at < len(stream):
        size = rng.randint(1, 300)
        join.process(stream[at:at + size])
        at += size
        if rng.random() < 0.1:                 # a restart: a fresh instance from the snapshot, as after a crash
            state = json.loads(json.dumps(join.snapshot()))
            join = LabelJoin(within=within, lateness=lateness, every=10**9)
            join.restore(state)
    row = join.row()
    assert row["late"] == 0 and row["duplicates"] == 0
    assert as_reference(row) == expected
    assert expected["counts"]["unmatched_predictions"] > 100 and expected["counts"]["unmatched_labels"] > 100
    assert 0 < expected["counts"]["unscored"] <= 20 and len(expected["versions"]) == 3


def test_late_duplicate_and_malformed_records_are_counted_or_dead_lettered() -> None:
    join = LabelJoin(within=5, lateness=1, every=10**9)
    join.process([{"id": 1, "t": 100, "prediction": 1, "model_version": 2},
                  {"id": 1, "t": 101, "prediction": 0, "model_version": 2},      # a second one for a waiting key
                  {"id": 2, "t": 50, "prediction": 1, "model_version": 2},       # 50 behind: later than lateness
                  {"id": 2, "t": 52, "y": 1},                                    # its partner is waiting: joined
                  {"t": 3, "y": 1}, {"id": [1], "t": 3, "y": 1}, {"id": 4, "t": "soon", "y": 1}, {"id": 5, "t": 6}])
    row = join.row()
    assert (row["duplicates"], row["late"], row["matched"], row["versions"]) == (1, 1, 1, {"2": {"matched": 1, "accuracy": 1.0}})
    reasons = [why for _, why, _ in join.take_rejected()]
    assert reasons == ["label without a key: field 'id' must be an integer or a string",
                       "label without a key: field 'id' must be an integer or a string",
                       "label without an event time: field 't' must be a finite number",
                       "neither a prediction (no 'prediction' field) nor a label (no 'y' field)"]


def test_a_regressor_is_scored_by_mae_and_rmse_and_the_contract_holds() -> None:
    join = LabelJoin(key="order", label_key="ref", time="at", label_time="paid_at", label="amount", within=60, every=10**9)
    join.process([{"order": "a", "at": 0.0, "prediction": 10.0, "model_version": 1},
                  {"order": "b", "at": 1.0, "prediction": 4.0, "model_version": 1},
                  {"ref": "a", "paid_at": 30.0, "amount": 13.0}, {"ref": "b", "paid_at": 31.0, "amount": 3.0}])
    assert join.row()["versions"] == {"1": {"matched": 2, "mae": 2.0, "rmse": 2.236068}}
    batches = [[{"id": i, "t": float(i), "prediction": i % 2, "model_version": 1} for i in range(50)],
               [{"id": i, "t": float(i) + 2, "y": 1} for i in range(50)]]
    check_stage(lambda: LabelJoin(within=5, lateness=0), batches, bad_records=[{"id": 99, "t": None, "y": 1}])


LABELS = '''
import itertools
from paced import Paced
from streampipe.stages.builtins.generator import Generator


def plan(count, seed, extra=60):
    """(at, ref, y) for each label, in the order of ``at``: most come 100 ids after their prediction,
    every 5th 50 ids before it, every 13th 900 after (beyond the window), every 7th never; some
    refs were never predicted."""
    ys = [r["y"] for r in itertools.islice(Generator(count=count, seed=seed).generate(), count)]
    out = []
    for ref in range(count + extra):
        if ref % 7 == 3:
            continue
        lag = 900 if ref % 13 == 5 else -50 if ref % 5 == 1 else 100
        out.append((ref + lag, ref, ys[ref] if ref < count else 0))
    return sorted(out)


class Labels(Paced):
    def __init__(self, count: int, seed: int, rate: float = 3000):
        super().__init__(count, rate)
        self.seed = seed

    def setup(self):
        super().setup()
        self.plan = plan(self.count, self.seed)

    def total(self):
        return len(self.plan)

    def record(self, j):
        at, ref, y = self.plan[j]
        return {"id": j, "ref": ref, "y": y, "at": at}
'''

PIPELINE = """
pipeline: latelabels
defaults: {heartbeat_timeout: 60, ack_timeout: 0.5}
stages:
  generator: {type: generator, options: {rate: 2500, seed: 7, count: COUNT}}
  normalizer: {type: normalizer, inputs: [generator], options: {holdout: 0.1}}
  trainer: {type: trainer, inputs: [normalizer], options: {checkpoint_every: 3000, checkpoint_seconds: 0}}
  predictor: {type: predictor, inputs: [normalizer], options: {poll_seconds: 0.2}}
  predictions: {type: consumer, inputs: [predictor], options: {output: output/predictions.jsonl}}
  labels: {type: "latelabels:Labels", options: {count: COUNT, seed: 7, rate: 2500}}
  labels_out: {type: consumer, inputs: [labels], options: {output: output/labels.jsonl}}
  outcomes:
    type: label_join
    inputs: [predictor, labels]
    options: {label_key: ref, time: id, label_time: at, within: 300, lateness: 5000, every: 500}
"""


@pytest.mark.timeout(240)
def test_a_pipeline_scores_its_predictions_by_late_labels_exactly_through_sigkills(pipeline) -> None:
    count = 24000
    p = pipeline(PIPELINE.replace("COUNT", str(count)))
    (p.folder / "paced.py").write_text(PACED_SOURCE)
    (p.folder / "latelabels.py").write_text(LABELS)
    p.up()
    for kill in range(3):
        wait_for(lambda kill=kill: p.row("outcomes")["stats"].get("predictions", 0) > 4000 * (kill + 1),
                 timeout=90, what=f"the join to take {4000 * (kill + 1)} predictions")
        os.kill(p.row("outcomes")["pid"], signal.SIGKILL)
        wait_for(lambda kill=kill: p.row("outcomes")["state"] == "running" and p.row("outcomes")["restarts"] == kill + 1,
                 timeout=60, what="the join restarted")
    wait_for(lambda: p.row("generator")["state"] == "completed" and p.row("labels")["state"] == "completed",
             timeout=120, what="both sources completed")

    def taken() -> bool:
        stats = p.row("outcomes")["stats"]
        return (stats.get("predictions"), stats.get("labels")) == (
            len(p.output_records("output/predictions.jsonl")), len(p.output_records("output/labels.jsonl")))

    wait_for(taken, timeout=90, what="the join to hold every prediction and label the sinks hold")
    p.down()
    predictions = p.output_records("output/predictions.jsonl")
    labels = p.output_records("output/labels.jsonl")
    assert len({r["id"] for r in predictions}) == len(predictions) > 0.85 * count
    rows = [json.loads(x) for x in (p.run_dir / "served.jsonl").read_text().splitlines()]
    records = [r["records"] for r in rows]
    assert records == sorted(set(records)), "a row written twice, or out of order, after a restore"
    last = rows[-1]
    assert last["late"] == 0 and last["duplicates"] == 0
    expected = reference(predictions, labels, within=300, lateness=5000, key="id", label_key="ref",
                         time="id", label_time="at")
    assert as_reference(last) == expected
    counts = expected["counts"]
    assert counts["unmatched_predictions"] > 1000 and counts["unmatched_labels"] > 1000 and counts["matched"] > 10000
    scored = expected["versions"]
    assert len(scored) >= 3 and max(v["accuracy"] for v in scored.values()) > 0.8
    assert last["task"] == "classification" and last["model_version"] == max(int(v) for v in scored)
