"""The features example's own stages: a stream of card transactions, and window results as training records.

``Transactions`` is a source of per-user card transactions, ``{"id": 42, "user": "u017",
"t": 2.1, "amount": 23.5, "fraud": 0}``. Event time ``t`` is ``id / per_second`` seconds: it
follows the stream, not the clock, so a run's windows are the same in every run. Each record is a
function of ``(seed, id)`` alone, so a restarted source that resumes at a saved ``id`` replays
exactly what was lost. Accounts get *compromised*: in each ``episode`` seconds of event time a
``compromised`` share of the users is taken over (which ones is drawn from ``(seed, episode)``),
and for that episode such a user transacts ``burst`` times as often, and each of their
transactions is fraudulent with probability ``fraud_share``, with larger amounts (a log-normal
around 90 where an honest one is around 20, overlapping).

``training_record`` turns one window result of the ``window`` stage (count, mean and max of the
amounts, and ``max`` of the ``fraud`` flags: 1 when the window holds any fraudulent transaction)
into what the trainer learns from: ``x`` = [count / 20 - 1, log(1 + mean) - 3, log(1 + max) - 4],
features of about unit scale centred near an honest user's window (so the trainer's SGD needs no
running scaler, and a checkpoint scores such ``x`` as it is), and ``y`` = the window's fraud
flag. A linear model separates them well (~0.95 accuracy where always saying "honest" gets
~0.67): a compromised account's window has more transactions and larger ones, though not always.

>>> src = Transactions(seed=3)
>>> a = [src.transaction(i) for i in range(5)]
>>> a == [Transactions(seed=3).transaction(i) for i in range(5)], [r["id"] for r in a], a[4]["t"]
(True, [0, 1, 2, 3, 4], 0.04)
>>> training_record({"id": 7, "user": "u001", "window_start": 0, "window_end": 20, "n": 20, "mean": 19.0,
...                  "top": 63.0, "fraud": 1})
{'id': 7, 'user': 'u001', 't': 20, 'x': [0.0, -0.004268, 0.158883], 'y': 1}
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from streampipe import BadRecord, Source

# an honest user's window (1 transaction a second, 20-second windows; amounts around 20, the largest
# of 20 around 55): the features are offsets from it, so plain SGD starts near the answer
HONEST = (20.0, 3.0, 4.0)


class Transactions(Source):
    """Per-user card transactions with compromised accounts; see the module's docstring.

    Options: ``users`` (how many), ``per_second`` (transactions per second of event time, all
    users together), ``rate`` (records per wall-clock second; 0 = as fast as downstream takes
    them), ``count`` (stop after so many; None = endless), ``seed``, ``episode`` (seconds of
    event time per compromise episode), ``compromised`` (share of users taken over in an
    episode), ``burst`` (how much more often a compromised user transacts), ``fraud_share``
    (share of a compromised user's transactions that are fraudulent).
    """

    def __init__(self, users: int = 100, per_second: float = 100.0, rate: float = 4000.0, count: int | None = None,
                 seed: int = 7, episode: float = 120.0, compromised: float = 0.3, burst: float = 1.6,
                 fraud_share: float = 0.35) -> None:
        super().__init__()
        if users < 1 or not per_second > 0 or rate < 0 or not episode > 0 or burst < 1:
            raise ValueError("users >= 1, per_second > 0, rate >= 0, episode > 0 and burst >= 1, please")
        if not (0 <= compromised <= 1 and 0 <= fraud_share <= 1):
            raise ValueError("compromised and fraud_share are shares between 0 and 1")
        self.users, self.per_second, self.rate, self.count, self.seed = int(users), float(per_second), float(rate), count, int(seed)
        self.episode, self.compromised, self.burst, self.fraud_share = float(episode), float(compromised), float(burst), float(fraud_share)
        self.next = 0
        self._episode: tuple[int, list[bool], list[float]] = (-1, [], [])

    def taken_over(self, episode: int) -> tuple[list[bool], list[float]]:
        """Which users are compromised in ``episode``, and the cumulative weights users are drawn by."""
        if self._episode[0] != episode:
            rng = random.Random(f"{self.seed}/episode/{episode}")
            bad = [rng.random() < self.compromised for _ in range(self.users)]
            self._episode = (episode, bad, list(accumulate(self.burst if b else 1.0 for b in bad)))
        return self._episode[1], self._episode[2]

    def transaction(self, i: int) -> dict[str, Any]:
        """Record ``i``: a function of ``(seed, i)`` alone."""
        t = round(i / self.per_second, 6)
        bad, weights = self.taken_over(math.floor(t / self.episode))
        rng = random.Random(f"{self.seed}/{i}")
        user = min(bisect.bisect_right(weights, rng.random() * weights[-1]), self.users - 1)
        fraud = bad[user] and rng.random() < self.fraud_share
        amount = rng.lognormvariate(4.5, 0.7) if fraud else rng.lognormvariate(3.0, 0.8)
        return {"id": i, "user": f"u{user:03d}", "t": t, "amount": round(amount, 2), "fraud": int(fraud)}

    def generate(self) -> Iterator[dict[str, Any] | None]:
        started, base = time.monotonic(), self.next
        while self.count is None or self.next < self.count:
            if self.rate > 0 and self.next - base >= (time.monotonic() - started) * self.rate:
                yield None                       # ahead of the rate: the runtime serves its sockets meanwhile
                continue
            self.next += 1                       # advance first: a snapshot after the yield never repeats it
            yield self.transaction(self.next - 1)

    def snapshot(self) -> dict[str, Any]:
        return {"next": self.next}

    def restore(self, state: dict[str, Any]) -> None:
        self.next = int(state.get("next", 0))


def features(window: dict[str, Any]) -> list[float]:
    """The feature vector of one window result (``n``, ``mean``, ``top`` as the window stage names them);
    :class:`BadRecord` (a dead letter with the reason) for a result without them."""
    for name in ("n", "mean", "top"):
        value = window.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise BadRecord(f"window result: {name!r} must be a number >= 0, not {value!r}")
    count, mean, top = HONEST
    return [round(window["n"] / count - 1, 6), round(math.log1p(window["mean"]) - mean, 6),
            round(math.log1p(window["top"]) - top, 6)]


def training_record(window: dict[str, Any]) -> dict[str, Any]:
    """A window result as a training record: ``x`` its features, ``y`` whether it held a fraud; the id
    (a hash of the user and the window's start) is kept, so the hold-out split and the sink's dedup follow it."""
    x = features(window)
    if window.get("fraud") not in (0, 1) or "id" not in window:
        raise BadRecord(f"window result: needs an id and a fraud flag 0 or 1, not {window.get('fraud')!r}")
    return {"id": window["id"], "user": window.get("user"), "t": window.get("window_end"), "x": x, "y": int(window["fraud"])}
