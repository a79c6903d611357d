"""The source cursor (stages/runtime/cursor.py) alone: positions, commits and the watermark, with
no process, socket or state file (the runtime writes the file between ``to_save`` and ``saved``)."""

from __future__ import annotations

from typing import Any

from streampipe.stages.columns import Columns
from streampipe.stages.runtime.counters import Counters
from streampipe.stages.runtime.cursor import SourceCursor


def cursor() -> tuple[SourceCursor, list[dict[str, Any]]]:
    commits: list[dict[str, Any]] = []
    return SourceCursor("gen", 1, Counters(None), on_commit=commits.append), commits


def test_the_watermark_rises_only_once_its_position_is_saved() -> None:
    c, commits = cursor()
    assert c.check_ids([{"id": i} for i in range(10)]) == [{"id": i} for i in range(10)]
    mark = c.mark({"pos": 10})
    mark.outstanding = 1                       # one batch cut with it, not acknowledged yet
    c.advance()
    assert c.committed is None and commits == []
    mark.outstanding = 0                       # acknowledged end to end
    c.advance()
    assert c.committed == {"pos": 10} and commits == [{"pos": 10}]
    assert c.stamp == ("gen.1/0", None), "committed, not saved: nothing announced yet"
    top, field = c.to_save()
    assert (top, field) == (10, [0, 10, True])
    c.saved(top)
    assert c.stamp == ("gen.1/0", 10)


def test_a_mark_is_never_committed_past_an_earlier_one_still_in_flight() -> None:
    c, _ = cursor()
    c.check_ids([{"id": 0}])
    first = c.mark({"pos": 1})
    first.outstanding = 1
    c.check_ids([{"id": 1}])
    c.mark({"pos": 2})                         # nothing outstanding, but behind the first
    c.advance()
    assert c.committed is None
    first.outstanding = 0
    c.advance()
    assert c.committed == {"pos": 2} and c.to_save()[0] == 2


def test_ids_that_stop_increasing_freeze_the_watermark_and_one_below_it_is_dead_lettered() -> None:
    c, _ = cursor()
    c.check_ids([{"id": i} for i in range(5)])
    c.mark({"pos": 5}).outstanding = 0
    c.advance()
    c.saved(c.to_save()[0])
    assert c.watermark == 5
    kept = c.check_ids([{"id": 7}, {"id": 3}, {"id": 8}])
    assert kept == [{"id": 7}, {"id": 8}] and c.counters.dead == 1 and c.out_of_order == 1
    c.mark({"pos": 9}).outstanding = 0
    c.advance()
    assert c.to_save() == (5, [0, 5, False]), "out of order: the watermark stays where it was"


def test_a_columnar_batch_of_increasing_ids_takes_the_fast_path() -> None:
    c, _ = cursor()
    batch = Columns.from_records([{"id": i} for i in range(100)])
    assert c.check_id_column(batch) is batch and c.id_top == 100


def test_restore_keeps_the_watermark_of_its_generation_only() -> None:
    c, _ = cursor()
    c.restore({"state": {"pos": 3}, "generation": 2, "watermark": [2, 40, True]})
    assert c.committed == {"pos": 3} and c.stamp == ("gen.1/2", 40) and c.id_top == 40
    c, _ = cursor()
    c.restore({"state": {"pos": 3}, "generation": 3, "watermark": [2, 40, True]})
    assert c.stamp == ("gen.1/3", None) and c.id_top is None
