"""Repartitioning a source's saved positions, and the replay's dead letters, without processes.

The property tests draw random histories with a seeded generator: replicas emit a random number
of ids, their positions are dealt to a random new replica count, again and again; at the end the
ids left plus the ids emitted must be every id exactly once.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from streampipe.stages import segments
from streampipe.stages.api import StageContext
from streampipe.stages.builtins.generator import Generator
from streampipe.stages.repartition import Refused, repartition
from streampipe.stages.state import load_replica_state, read_layout, replica_file, save_state, write_layout

BOUND = 3000     # ids checked: far above what the histories emit, so the endless tails are covered too


def ids_below(left: list[segments.Segment], bound: int) -> list[int]:
    return list(itertools.takewhile(lambda i: i < bound, segments.ids(left)))


@pytest.mark.parametrize("seed", range(40))
def test_any_n_to_m_keeps_every_id_once(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    layout = [[[r, n, None]] for r in range(n)]
    emitted: list[int] = []
    for _ in range(rng.randint(1, 8)):
        after = []
        for left in layout:
            got = list(itertools.islice(segments.ids(left), rng.randint(0, 40)))
            assert got == sorted(set(got)), "a replica emits its ids in increasing order"
            emitted += got
            after.append(segments.after(left, got[-1] if got else None))
        layout = segments.deal(after, rng.randint(1, 7))
    left = [i for part in layout for i in ids_below(part, BOUND)]
    assert len(emitted) == len(set(emitted)), "an id was emitted twice"
    assert len(left) == len(set(left)), "an id was dealt to two replicas"
    assert not set(left) & set(emitted), "an emitted id was dealt again"
    assert set(left) | set(emitted) == set(range(BOUND)), "an id was lost"


def test_finite_segments_are_dealt_exactly() -> None:
    rng = random.Random(7)
    for _ in range(300):
        old = [[[rng.randint(0, 50), rng.randint(1, 5), rng.choice([None, rng.randint(0, 200)])]
                for _ in range(rng.randint(0, 4))] for _ in range(rng.randint(1, 4))]
        # old replicas never share an id: keep only the ids not already owned by an earlier segment
        owned: set[int] = set()
        clean = []
        for part in old:
            mine = []
            for seg in part:
                mine_ids = set(ids_below([seg], BOUND))
                if mine_ids & owned:
                    continue
                owned |= mine_ids
                mine.append(seg)
            clean.append(mine)
        new = segments.deal(clean, rng.randint(1, 6))
        dealt = [i for part in new for i in ids_below(part, BOUND)]
        assert sorted(dealt) == sorted(owned)


def test_the_generator_resumes_exactly_across_layouts() -> None:
    """Real Generator instances: 1 -> 3 -> 2 -> 1 replicas, snapshots taken mid-stream."""
    count, rng = 500, random.Random(3)
    seen: list[int] = []
    states: list[dict[str, Any]] = [{}]
    for replicas in (3, 2, 1):
        old = len(states)
        for r in range(old):
            g = Generator(count=count, seed=1)
            g.context = StageContext(replica=r, replicas=old)
            g.restore(states[r])
            stream = g.generate()
            seen += [rec["id"] for rec in itertools.islice(stream, rng.randint(0, 60))]
            states[r] = g.snapshot()
        states = Generator.repartition(states, replicas)
    for r, state in enumerate(states):
        g = Generator(count=count, seed=1)
        g.context = StageContext(replica=r, replicas=len(states))
        g.restore(state)
        seen += [rec["id"] for rec in g.generate()]
    assert sorted(seen) == list(range(count))


def test_an_old_position_is_read_as_the_replica_counter_it_was() -> None:
    # before segments, a replica saved {"next": k}: it had emitted k ids, r, r + n, ...
    # replica 0 of 2 emitted 0, 2, 4 and replica 1 emitted 1, 3: everything from 5 on is left
    assert Generator.repartition([{"next": 3}, {"next": 2}], 1) == [{"segments": [[5, 1, None]]}]
    assert Generator.repartition([{"next": 1}, {"next": 3}], 1) == [{"segments": [[2, 2, 8], [7, 1, None]]}]


# -- the state files -----------------------------------------------------------------------------

def test_a_newer_layout_overrides_the_replica_files(tmp_path: Path) -> None:
    save_state(replica_file(tmp_path, "gen", 0), {"state": {"next": 5}, "completed": False, "replicas": 2})
    save_state(replica_file(tmp_path, "gen", 1), {"state": {"next": 4}, "completed": False, "replicas": 2})
    layout = read_layout(tmp_path, "gen")
    assert layout is not None and (layout.generation, layout.replicas) == (0, 2)
    write_layout(tmp_path, "gen", 1, [{"state": {"segments": [[9, 1, None]]}, "completed": False}])
    assert load_replica_state(tmp_path, "gen", 0) == {"state": {"segments": [[9, 1, None]]}, "completed": False,
                                                        "generation": 1, "replicas": 1}
    assert load_replica_state(tmp_path, "gen", 1) is None, "replica 1 of the old layout is gone"
    # the replica commits under the new generation: its own file wins again
    save_state(replica_file(tmp_path, "gen", 0), {"state": {"segments": [[12, 1, None]]}, "completed": False,
                                                  "generation": 1, "replicas": 1})
    assert load_replica_state(tmp_path, "gen", 0)["state"] == {"segments": [[12, 1, None]]}
    layout = read_layout(tmp_path, "gen")
    assert layout is not None and (layout.generation, layout.replicas) == (1, 1)
    assert layout.entries == [{"state": {"segments": [[12, 1, None]]}, "completed": False}]


def test_files_without_a_replica_count_are_taken_to_match_the_config(tmp_path: Path) -> None:
    # written before the count was saved: replica 1 of 3 never saved, so the files cannot tell
    for r in (0, 2):
        save_state(replica_file(tmp_path, "gen", r), {"state": {"next": r}, "completed": False})
    layout = read_layout(tmp_path, "gen")
    assert layout is not None and layout.replicas is None and not layout.differs(3)
    assert [e["state"] for e in layout.entries] == [{"next": 0}, {}, {"next": 2}]
    assert read_layout(tmp_path, "other") is None


def test_repartition_writes_one_file_and_bumps_the_generation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    save_state(replica_file(state, "gen", 0), {"state": {"next": 10}, "completed": False, "replicas": 1})
    message = repartition("gen", "generator", tmp_path, tmp_path, 2)
    assert "generation 1" in message
    assert load_replica_state(state, "gen", 0)["state"] == {"segments": [[10, 2, None]]}
    assert load_replica_state(state, "gen", 1)["state"] == {"segments": [[11, 2, None]]}
    assert load_replica_state(state, "gen", 1)["generation"] == 1
    assert repartition("gen", "generator", tmp_path, tmp_path, 2).endswith("nothing to repartition")


def test_a_completed_source_stays_completed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for r in range(2):
        save_state(replica_file(state, "gen", r), {"state": {"next": 50}, "completed": True, "replicas": 2})
    repartition("gen", "generator", tmp_path, tmp_path, 3)
    assert all(load_replica_state(state, "gen", r)["completed"] for r in range(3))


def test_a_source_that_cannot_repartition_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "mysource.py").write_text(
        "from streampipe import Source\n"
        "class Numbers(Source):\n"
        "    def generate(self):\n"
        "        yield {'id': 0}\n")
    state = tmp_path / "state"
    save_state(replica_file(state, "src", 0), {"state": {"i": 3}, "completed": False, "replicas": 1})
    with pytest.raises(Refused, match=r"saved positions are for 1 replicas .* now says 2.*Set `replicas: 1` back"):
        repartition("src", "mysource:Numbers", tmp_path, tmp_path, 2)
    assert read_layout(state, "src").generation == 0, "nothing written"


# -- the replay's dead letters ------------------------------------------------------------------

def replay(path: Path, state: dict[str, Any] | None = None, take: int | None = None) -> tuple[Generator, list[Any], list[Any]]:
    g = Generator(file=str(path))
    g.context = StageContext(config_dir=path.parent)
    if state is not None:
        g.restore(state)
    records = [r for r in itertools.islice(g.generate(), take) if r is not None]
    return g, records, g.take_rejected()


def test_replay_dead_letters_bad_lines_with_their_line_number(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2\n[1, 2]\n\n\xff\xfe{"id": 3}\n{"id": 4}\n')
    _, records, rejected = replay(path)
    assert [r["id"] for r in records] == [1, 4]
    assert [(rec["line"], reason.split(": ", 1)[1].split(":")[0]) for rec, reason, _ in rejected] == [
        (2, "bad JSON"), (3, "a JSON list, not an object"), (5, "undecodable bytes at column 1")]
    assert rejected[0][1].startswith("in.jsonl:2: ")


def test_replay_dead_letters_csv_rows_of_the_wrong_width(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,a,b\n1,2,3\n2,3\n3,4,5\n4,5,6,7\n")
    _, records, rejected = replay(path)
    assert [r["id"] for r in records] == [1, 3]
    assert [rec["line"] for rec, _, _ in rejected] == [3, 5]
    assert "2 fields where the header has 3" in rejected[0][1]


def test_replay_resumes_after_its_position_with_the_right_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,a\n1,1\nbad\n3,3\n4\n5,5\n")
    g, first, rejected = replay(path, take=3)     # 1,1 / bad (None) / 3,3
    assert [r["id"] for r in first] == [1, 3] and [rec["line"] for rec, _, _ in rejected] == [3]
    _, rest, rejected = replay(path, state=g.snapshot())
    assert [r["id"] for r in rest] == [5] and [rec["line"] for rec, _, _ in rejected] == [5]


def test_replay_dead_letters_rows_whose_own_id_repeats_or_goes_back(tmp_path: Path) -> None:
    """Such a row would reach a sink as a duplicate and be dropped there, silently."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 2}\n{"id": 0}\n{"id": 5}\n{"v": 9}\n')
    _, records, rejected = replay(path)
    assert [r["id"] for r in records][:3] == [1, 2, 5]
    assert [(rec["id"], reason.split(": ")[0]) for rec, reason, _ in rejected] == [(2, "in.jsonl:3"), (0, "in.jsonl:4")]
    assert "repeats or goes back (after 2)" in rejected[1][1]
