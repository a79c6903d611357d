"""The sink's seen-id set against a plain Python set, and its memory bound."""

from __future__ import annotations

import random

from streampipe.stages.seen import SeenIds


def test_matches_a_plain_set_under_shuffled_redelivery() -> None:
    rng = random.Random(4)
    ids = list(range(5000))
    for i in range(0, 5000, 97):      # permanent holes, as dead letters make
        ids.remove(i)
    stream = ids + rng.sample(ids, 800)   # redeliveries
    rng.shuffle(stream)
    seen, plain = SeenIds(horizon_s=1e9), set()
    for i in stream:
        assert seen.add(i) == (i not in plain)
        plain.add(i)
    assert all((i in seen) == (i in plain) for i in range(-5, 5100))
    assert len(seen.starts) <= 53, "memory grows with holes, not ids"
    again = SeenIds.from_state(seen.state(), horizon_s=1e9)
    assert all((i in again) == (i in plain) for i in range(0, 5100, 7))


def test_old_holes_are_closed() -> None:
    seen = SeenIds(horizon_s=10.0)
    for i in (0, 1, 3, 4, 6):
        seen.add(i)
    assert seen.ranges() == [[0, 2], [3, 5], [6, 7]] and 2 not in seen
    assert seen.close_old_holes(now=seen.born[0] + 5) == 0
    assert seen.close_old_holes(now=seen.born[-1] + 11) == 3
    assert seen.mark == 7 and seen.ranges() == [] and 2 in seen
