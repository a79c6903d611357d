"""A sink with replicas writes each id once across its files, even when acknowledgements come late.

Each consumer replica deduplicates only what it has seen itself. With one PUSH socket per edge,
a batch resent after ``ack_timeout`` went round-robin, often to the *other* replica, which wrote
it again: 18,000 of 1 M records in a benchmark with a slow sink. Here every ack is late (each
consumer replica takes 30 ms a batch, ``ack_timeout`` is 20 ms), so batches are resent again and
again, from the normalizer and from the generator.
"""

from __future__ import annotations

import collections

from tests.conftest import Pipeline, wait_for

SLOW_SINK = """\
import time

from streampipe.stages.consumer import Consumer


class SlowConsumer(Consumer):
    def process(self, batch):
        time.sleep(0.03)
        return super().process(batch)
"""

CONFIG = """\
pipeline: late-acks
delivery: at-least-once
defaults:
  ack_timeout: 0.02
  max_batch: 50
  linger_ms: 5
stages:
  generator:
    type: generator
    replicas: 2
    options: {{count: {n}, rate: {rate}, seed: 5}}
  normalizer:
    type: normalizer
    inputs: [generator]
    replicas: 2
  consumer:
    type: slowsink:SlowConsumer
    inputs: [normalizer]
    replicas: 2
    options: {{checkpoint_s: 0.05}}
"""


def all_ids(p: Pipeline) -> list[int]:
    return p.output_ids("output/records.jsonl") + p.output_ids("output/records.1.jsonl")


def test_late_acks_duplicate_nothing_across_sink_replicas(pipeline, tmp_path) -> None:
    n = 3000
    p = pipeline(CONFIG.format(n=n, rate=1500))
    (p.folder / "slowsink.py").write_text(SLOW_SINK)
    p.up()
    wait_for(lambda: len(set(all_ids(p))) >= n, timeout=120, what=f"{n} distinct ids in the two files")
    wait_for(lambda: all(r["state"] == "completed" for r in p.rows("generator")), timeout=60,
             what="both generator replicas completed")
    resent = sum(int(r.get("resent") or 0) for stage in ("generator", "normalizer") for r in p.rows(stage))
    p.down()
    counts = collections.Counter(all_ids(p))
    assert sorted(counts) == list(range(n)), f"lost: {sorted(set(range(n)) - set(counts))[:20]}"
    dups = {i: c for i, c in counts.items() if c > 1}
    assert not dups, f"{len(dups)} ids written more than once, e.g. {list(dups.items())[:10]}"
    assert p.output_ids("output/records.1.jsonl"), "both replicas wrote"
    assert resent > 0, "the test made no late acks: it proves nothing"
