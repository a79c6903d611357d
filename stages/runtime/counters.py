"""What a replica counts and reports (the heartbeat, ``status``): :class:`Counters`, with the one
:meth:`Counters.reject` every dead letter goes through; the rate-limited error log."""

from __future__ import annotations

import bisect
import time
from typing import Any

from loguru import logger

from streampipe.stages import wire
from streampipe.stages.runtime.tunables import LATENCY_BUCKETS_MS, LOG_ERRORS_PER_S
from streampipe.stages.state import DeadLetters


class ErrorLog:
    """Logs records that failed in ``process``, with their traceback, at most ``LOG_ERRORS_PER_S`` a second.

    A stream of bad records must not turn into a stream of tracebacks: past the limit, failures
    are counted and summed up in one line a second (the dead-letter file still has every one).
    """

    def __init__(self) -> None:
        self.window_start, self.logged, self.suppressed = 0.0, 0, 0

    def report(self, outcome: Any) -> None:
        now = time.monotonic()
        if now - self.window_start >= 1.0:
            if self.suppressed:
                logger.warning(f"{self.suppressed} more records failed in the last second (see the dead-letter file)")
            self.window_start, self.logged, self.suppressed = now, 0, 0
        excs = iter(outcome.exceptions)
        for record, error, tb in outcome.rejected:
            exc = next(excs, None) if tb else None
            if self.logged >= LOG_ERRORS_PER_S:
                self.suppressed += 1
                continue
            self.logged += 1
            rid = record.get("id") if isinstance(record, dict) else None
            if exc is not None:
                logger.opt(exception=exc).error(f"record {rid} failed in process: {error}; sent to the dead-letter file")
            else:
                logger.warning(f"record {rid} rejected: {error}; sent to the dead-letter file")


def _packable(value: Any) -> Any:
    """``value`` if msgpack can carry it, else its repr."""
    try:
        wire.packb(value)
        return value
    except Exception:
        try:
            return repr(value)[:200]
        except Exception:
            return f"<unprintable {type(value).__name__}>"


class Counters:
    """The replica's record counts, latency and last error: written only through these methods.

    ``reject`` is the one way a record goes to the dead-letter file (``dead_letters``; None in a
    unit test that only counts)."""

    def __init__(self, dead_letters: DeadLetters | None) -> None:
        self.records_in = self.records_out = self.errors = self.dead = self.resent = 0
        self.copies_dropped = 0      # input batches that were resent copies of ones taken already
        self.batches = 0
        self.lat_ewma_ms = 0.0
        self.lat_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.last_error = ""
        self.dead_letters = dead_letters
        self.error_log = ErrorLog()

    def took(self, n: int) -> None:
        """``n`` records came in (from upstream, or out of a source)."""
        self.records_in += n

    def sent(self, n: int) -> None:
        """A batch of ``n`` records left for the first time."""
        self.records_out += n

    def resending(self) -> None:
        self.resent += 1

    def copy_dropped(self) -> None:
        self.copies_dropped += 1

    def note_error(self, error: str) -> None:
        """The stage's last error, as the heartbeat reports it."""
        self.last_error = error

    def reject(self, record: Any, error: str, tb: str = "", source: str | None = None, replay_of: str | None = None) -> None:
        """The one way a record goes to the dead-letter file: counted, and the stage's last error.
        ``source``: the replica an input record came from (it can be replayed into this stage)."""
        self.errors += 1
        self.dead += 1
        self.last_error = error
        if self.dead_letters is not None:
            self.dead_letters.write(record, error, tb, source, replay_of)

    def reject_output(self, record: Any, reason: str) -> None:
        """An output record that cannot be sent: counted and dead-lettered."""
        self.reject(repr(record)[:2000], f"unsendable output: {reason}")

    def observe_latency(self, ms: float) -> None:
        self.batches += 1
        self.lat_ewma_ms = ms if self.batches == 1 else 0.9 * self.lat_ewma_ms + 0.1 * ms
        self.lat_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1

    def report(self) -> dict[str, Any]:
        """The heartbeat's share of these counts."""
        return {"records_in": self.records_in, "records_out": self.records_out, "errors": self.errors,
                "dead_letters": self.dead,
                "dead_letters_dropped": self.dead_letters.dropped if self.dead_letters is not None else 0,
                "resent": self.resent, "copies_dropped": self.copies_dropped,
                "latency_ms": round(self.lat_ewma_ms, 3), "latency_buckets": self.lat_buckets, "batches": self.batches}


class StageStats:
    """A stage's own ``stats()`` as msgpack can carry it, for the heartbeat. A problem is reported
    once (the stage's last error and a warning) and the heartbeat goes on: a heartbeat that
    cannot be sent gets the stage killed as hung."""

    def __init__(self, stage: Any, counters: Counters) -> None:
        self.stage, self.counters = stage, counters
        self.reported = False

    def read(self) -> dict[str, Any]:
        try:
            stats = self.stage.stats()
            if not isinstance(stats, dict):
                raise TypeError(f"returned a {type(stats).__name__}, not a dict")
        except Exception as exc:
            return self.problem(f"stats() failed: {type(exc).__name__}: {exc}", {"stats_error": str(exc)[:200]})
        try:
            size = len(wire.packb(stats))
        except Exception as exc:
            stats = {str(k): _packable(v) for k, v in stats.items()}
            size = len(wire.packb(stats))
            self.problem(f"stats() returned what msgpack cannot carry ({exc}); its values are sent as text", stats)
        if size > wire.STATS_MAX_BYTES:
            return self.problem(f"stats() is {size} bytes packed, over {wire.STATS_MAX_BYTES}: not sent", {})
        return stats

    def problem(self, problem: str, stats: dict[str, Any]) -> dict[str, Any]:
        if not self.reported:
            self.reported = True
            self.counters.note_error(problem)
            logger.warning(problem)
        return stats
