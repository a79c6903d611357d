"""The sink's seen-id sets: exact against a plain set, closed only by watermarks, per origin."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from streampipe.stages.api import StageContext
from streampipe.stages.builtins.consumer import Consumer
from streampipe.stages.seen import NOTHING, SeenByOrigin, SeenIds
from streampipe.stages.state import save_state


def test_matches_a_plain_set_under_shuffled_redelivery() -> None:
    rng = random.Random(4)
    ids = list(range(5000))
    for i in range(0, 5000, 97):      # permanent holes, as dead letters make
        ids.remove(i)
    stream = ids + rng.sample(ids, 800)   # redeliveries
    rng.shuffle(stream)
    seen, plain = SeenIds(), set()
    for i in stream:
        assert seen.add(i) == (i not in plain)
        plain.add(i)
    assert all((i in seen) == (i in plain) for i in range(-5, 5100))
    assert seen.holes <= 53, "memory grows with holes, not ids"
    again = SeenIds.from_state(seen.state())
    assert all((i in again) == (i in plain) for i in range(0, 5100, 7))


def test_add_many_of_a_strided_partition_matches_add() -> None:
    a, b = SeenIds(), SeenIds()
    ids = list(range(1, 400, 2)) + [0, 5, 7, 401, 400, 2]
    a.add_many(ids)
    for i in ids:
        b.add(i)
    assert all((i in a) == (i in b) == (i in ids) for i in range(-3, 410)) and a.mark == b.mark


def test_a_strided_origin_is_one_run_whatever_its_batches() -> None:
    """Replica 1 of 3 owns 1, 4, 7, ...: every batch joins the run before it, in order or not."""
    seen = SeenIds()
    batches = [list(range(k, k + 300, 3)) for k in range(1, 30_000, 300)]
    for batch in batches[:3] + [batches[4], batches[3]] + batches[5:]:   # one overtook another
        seen.add_many(batch)
    assert seen.runs() == [[1, 3, 29_998]]
    assert 4 in seen and 5 not in seen and 29_998 in seen and 30_001 not in seen
    half = SeenIds()                                       # a sink replica that gets every other batch
    for batch in batches[::2]:
        half.add_many(batch)
    assert half.holes == len(batches[::2]), "one run per batch: the other replica's batches are its gaps"
    half.close_below(15_000)
    assert half.holes == 25 and half.mark == 15_000 and 15_001 in half and 15_301 not in half


def test_holes_stay_open_until_a_watermark_closes_them() -> None:
    seen = SeenIds()
    for i in (0, 1, 3, 4, 6):
        seen.add(i)
    assert seen.runs() == [[0, 1, 1], [3, 1, 4], [6, 1, 6]] and 2 not in seen and 5 not in seen
    assert seen.close_below(3) == 2                # [0, 1] and [3, 4]
    assert seen.mark == 5 and seen.floor == 3 and seen.runs() == [[6, 1, 6]]
    assert 2 in seen and not seen.written(2) and seen.written(4) and 5 not in seen
    assert seen.close_below(2) == 0 and seen.mark == 5  # an old watermark changes nothing
    assert seen.close_below(10) == 1 and seen.mark == 10 and seen.runs() == []


def test_closing_a_million_runs_is_one_pass() -> None:
    seen = SeenIds()
    ids = [i for i in range(6_000_000) if i % 3]    # 1 2 _ 4 5 _ ...: 2 M runs of two
    seen.add_many(ids)
    assert seen.holes == 2_000_000
    assert seen.close_below(3_000_001) == 1_000_001         # [1, 2] ... [3_000_001, 3_000_002]
    assert seen.mark == 3_000_003 and seen.holes == 999_999 and int(seen.starts[0]) == 3_000_004
    assert 3_000_002 in seen and 3_000_003 not in seen and 3_000_004 in seen and 5_999_997 not in seen
    assert seen.close_below(6_000_000) == 999_999 and seen.holes == 0 and seen.mark == 6_000_000


def test_each_origin_has_its_own_holes() -> None:
    sbo = SeenByOrigin()
    a, b = sbo.of("gen.0/0"), sbo.of("gen.1/0")
    a.add_many([0, 2, 4])
    b.add_many([1, 3])
    a.close_below(6)                       # gen.0 says: all of mine below 6 is done
    assert 5 in a and 1 in a
    assert 5 not in b and 7 not in b       # gen.1's quiet partition keeps its holes
    again = SeenByOrigin.from_state(json.loads(json.dumps(sbo.state())))
    assert again.sets["gen.0/0"].mark == 6 and again.sets["gen.1/0"].runs() == [[1, 2, 3]]


def test_a_new_generation_sees_what_an_older_one_wrote() -> None:
    sbo = SeenByOrigin()
    old = sbo.of("gen.0/0")
    old.add_many([0, 2, 4, 6])
    old.close_below(3)                     # committed up to id 2; 4 and 6 written after it
    sbo.of("gen.0/1")
    assert sbo.older_written("gen.0/1", 4) and sbo.older_written("gen.0/1", 6)
    assert not sbo.older_written("gen.0/1", 1), "below the old floor: another partition's id, not known"
    assert not sbo.older_written("gen.0/0", 4) and not sbo.older_written("other.0/1", 4)


def sink(tmp_path: Path, **options: object) -> Consumer:
    c = Consumer(output="out.jsonl", **options)
    c.context = StageContext(run_dir=tmp_path)
    c.setup()
    return c


def lines(tmp_path: Path) -> list[int]:
    return [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_consumer_dedups_per_origin_and_closes_by_watermark(tmp_path: Path) -> None:
    c = sink(tmp_path)
    c.on_origin("a.0/0", None)
    c.process([{"id": 0}, {"id": 2}])
    c.on_origin("b.0/0", None)
    c.process([{"id": 0}, {"id": 2}])            # another source's ids: not duplicates
    c.on_origin("a.0/0", 3)
    c.process([{"id": 4}, {"id": 2}])            # 2 again: a duplicate
    assert c.seen.sets["a.0/0"].mark == 3 and c.seen.sets["a.0/0"].runs() == [[4, 1, 4]]
    assert c.seen.sets["b.0/0"].runs() == [[0, 2, 2]]
    c.on_origin("a.0/0", 1)
    c.process([{"id": 1}])                       # resent from before: below the watermark = done
    c.on_origin("b.0/0", None)
    c.process([{"id": 1}, {"id": "x"}, {"v": 1}])
    assert c.stats()["duplicates_dropped"] == 2 and c.stats()["not_deduplicated"] == 2
    c.teardown()
    assert lines_or_none(tmp_path) == [0, 2, 0, 2, 4, 1, "x", None]


def lines_or_none(tmp_path: Path) -> list[object]:
    return [json.loads(x).get("id") for x in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_consumer_recovers_each_origin_after_a_crash(tmp_path: Path) -> None:
    c = sink(tmp_path, checkpoint_s=1e9)
    c.on_origin("a.0/0", None)
    c.process([{"id": 0}, {"id": 1}])
    c.checkpoint()
    c.process([{"id": 2}])
    c.on_origin("b.0/0", None)
    c.process([{"id": 5}])
    assert c._file is not None and c._journal is not None
    c._file.close()                               # a SIGKILL: no checkpoint of ids 2 and 5
    c._journal.close()
    again = sink(tmp_path)
    assert again.seen.sets["a.0/0"].mark == NOTHING and again.seen.sets["a.0/0"].runs() == [[0, 1, 2]]
    assert again.seen.sets["b.0/0"].runs() == [[5, 1, 5]]
    again.on_origin("a.0/0", None)
    again.process([{"id": 2}, {"id": 5}])          # 2 was written (dup); a's 5 was not
    again.teardown()
    assert lines(tmp_path) == [0, 1, 2, 5, 5]


def crash(c: Consumer) -> None:
    """What a SIGKILL leaves: the files as they are, no checkpoint."""
    assert c._file is not None and c._journal is not None
    c._file.close()
    c._journal.close()


def test_consumer_recovers_the_same_origins_after_a_second_crash(tmp_path: Path) -> None:
    """Killed, restarted, killed again before its next checkpoint: the lines the first recovery
    found keep their origin (the second recovery once read them as origin None, so their ids were
    written again when redelivered: 511 duplicates in a long chaos run)."""
    c = sink(tmp_path, checkpoint_s=1e9)
    c.on_origin("a.0/1", None)
    c.process([{"id": 0}, {"id": 3}])
    c.checkpoint()
    c.process([{"id": 6}, {"id": 9}])
    crash(c)
    again = sink(tmp_path, checkpoint_s=1e9)
    again.on_origin("b.0/0", None)
    again.process([{"id": 1}])
    crash(again)
    third = sink(tmp_path, checkpoint_s=1e9)
    assert set(third.seen.sets) == {"a.0/1", "b.0/0"}
    third.on_origin("a.0/1", None)
    third.process([{"id": 6}, {"id": 9}, {"id": 12}])   # redelivered with their origin: 6 and 9 are written
    third.on_origin("b.0/0", None)
    third.process([{"id": 1}])
    third.teardown()
    assert lines(tmp_path) == [0, 3, 6, 9, 1, 12]


def test_old_format_state_starts_afresh(tmp_path: Path) -> None:
    c = sink(tmp_path)
    c.teardown()
    save_state(c.state_path, {"path": str(c.path), "offset": 0, "seen": {"mark": 10, "ranges": [[12, 13]]}, "count": 0})
    again = sink(tmp_path)
    assert again.seen.sets == {}
    again.teardown()


def test_the_horizon_option_is_refused(tmp_path) -> None:
    """The old time horizon is gone: naming it is a config error at validate, not silently ignored."""
    from streampipe.launcher.config import load_config
    from streampipe.launcher.errors import ConfigError

    cfg = tmp_path / "services.yaml"
    cfg.write_text("stages:\n  gen: {type: generator, options: {count: 10}}\n"
                   "  sink:\n    type: consumer\n    inputs: [gen]\n    options: {dedup_horizon_s: 300}\n")
    with pytest.raises(ConfigError, match="dedup_horizon_s") as err:
        load_config(cfg)
    assert "services.yaml:6" in str(err.value) and "stages.sink.options.dedup_horizon_s" in str(err.value)


@pytest.mark.parametrize("seed", range(40))
def test_batches_in_any_order_match_a_plain_set(seed: int) -> None:
    """Batches of one origin (strided or not, split by a router, overtaking each other, resent),
    added whole or id by id, with watermarks and state round-trips between them: the set holds
    exactly what a plain set plus the watermark says, and its runs stay sorted and disjoint."""
    rng = random.Random(seed)
    stride = rng.choice([1, 1, 2, 3, 7])
    ids = list(range(rng.randrange(stride), 3000, stride))
    batches: list[list[int]] = []
    k = 0
    while k < len(ids):
        cut = ids[k:k + rng.randint(1, 60)]
        k += len(cut)
        if rng.random() < 0.3:                       # a router splits it over two outputs
            main = [i for i in cut if rng.random() < 0.7]
            batches += [main, [i for i in cut if i not in main]]
        elif rng.random() < 0.1:
            batches += [[i for i in cut if i % 2 == 0], [i for i in cut if i % 2]]
        else:
            batches.append(cut)
    batches = [b for b in batches if b]
    for j in range(len(batches)):                    # overtaking
        o = min(len(batches) - 1, j + rng.randint(0, 4))
        batches[j], batches[o] = batches[o], batches[j]
    batches += rng.sample(batches, len(batches) // 5)   # resent
    seen, plain, w = SeenIds(), set(), None
    for batch in batches:
        if rng.random() < 0.5:
            seen.add_many(rng.sample(batch, len(batch)))
        else:
            for i in batch:
                assert seen.add(i) == (i not in plain and (w is None or i >= w))
        plain.update(batch)
        if rng.random() < 0.05:
            w = rng.randrange(0, 3000) if w is None else rng.randrange(w, 3001)
            seen.close_below(w)
        S, L = seen.starts, seen.lasts
        assert (L >= S).all() and (S[1:] > L[:-1]).all() and (not len(S) or S[0] >= seen.mark)
        if rng.random() < 0.1:
            seen = SeenIds.from_state(json.loads(json.dumps(seen.state())))
    q = np.arange(-5, 3005, dtype=np.int64)
    want = np.array([i in plain or (w is not None and i < w) for i in q.tolist()])
    assert (seen.contains(q) == want).all()
    assert (seen.written_mask(q) == (want & (q >= seen.floor))).all()
