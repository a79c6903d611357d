"""A replica's states and the decision taken when it exits, without a process (launcher/replica.py).

The supervisor routes what it hears (a spawn, a heartbeat, READY, an exit) to these methods; here
they are driven directly, with a clock passed in, as circus tests a watcher with a fake process.
"""

from __future__ import annotations

import os
import time

import pytest

from streampipe.launcher import fencing
from streampipe.launcher.config import StageConfig
from streampipe.launcher.replica import Replica, State
from streampipe.monitor.health import Reading
from streampipe.stages import fence


def replica(**cfg: object) -> Replica:
    return Replica.of("norm", 0, StageConfig(type="normalizer", **cfg))  # type: ignore[arg-type]


def test_spawn_ready_beat_blocked_and_back() -> None:
    rep = replica()
    assert rep.state == State.STOPPED and not rep.live
    rep.spawned(os.getpid(), "fork")
    assert rep.state == State.STARTING and not rep.settled.is_set() and not rep.exited.is_set()
    rep.beat({"records_in": 10}, now=100.0)
    assert rep.state == State.STARTING          # a beat before READY does not make it running
    rep.ready(100.1)
    assert rep.state == State.RUNNING and rep.settled.is_set() and rep.fenced == 0
    rep.beat({"records_in": 10, "blocked": True}, now=100.2)
    assert rep.state == State.BLOCKED and rep.live
    rep.beat({"records_in": 510, "blocked": False, "last_error": "ValueError: x"}, now=101.2)
    assert rep.state == State.RUNNING and rep.rate == pytest.approx(500 / 1.2) and rep.last_error == "ValueError: x"
    assert rep.status(time.time())["state"] == "running"


def test_a_replica_gone_shows_no_stale_cpu_rss_or_rate() -> None:
    rep = replica()
    rep.spawned(os.getpid(), "fork")
    rep.ready(0.0)
    rep.beat({"records_in": 0}, now=0.0)
    rep.beat({"records_in": 1000}, now=1.0)
    rep.reading = Reading(alive=True, cpu_percent=97.0, rss_bytes=300 << 20)
    rep.gone()
    row = rep.status(time.time())
    assert (row["cpu_percent"], row["rss_bytes"], row["num_fds"], row["num_threads"], row["rate"], row["pid"]) == (None,) * 6
    rep.spawned(os.getpid(), "fork")          # started again: measured again
    rep.reading = Reading(alive=True, cpu_percent=5.0, rss_bytes=1 << 20)
    row = rep.status(time.time())
    assert (row["cpu_percent"], row["rss_bytes"], row["rate"]) == (5.0, 1 << 20, 0.0)
    rep.completed()                           # a source at its end: what its process measures is no longer its work
    assert rep.status(time.time())["cpu_percent"] is None


def test_exits_back_off_then_fail_after_max_restarts() -> None:
    """exit -> restart at once -> backoff doubling -> failed once max_restarts fall in the window."""
    rep = replica(backoff_initial=0.1, backoff_max=1.0, max_restarts=3, restart_window=60)
    delays, states = [], []
    for t in range(4):
        rep.spawned(os.getpid(), "fork")
        rep.gone()
        after = rep.after_exit(code=1, uptime=0.5, stopping=False, now=float(t))
        delays.append(after.delay if after.restart else None)
        states.append(rep.state)
    assert delays == [0.0, 0.1, 0.2, None]
    assert states == [State.STARTING, State.BACKOFF, State.BACKOFF, State.FAILED]
    assert rep.restarts == 3 and rep.settled.is_set() and rep.exited.is_set() and rep.pid is None
    assert after.event == "failed" and "max_restarts 3" in after.reason


def test_a_wanted_stop_stays_down_and_says_nothing() -> None:
    rep = replica()
    rep.spawned(os.getpid(), "fork")
    rep.ready(1.0)
    rep.stopping(wanted=True, reason="restart requested")
    assert rep.state == State.STOPPING and rep.wanted_down and rep.kill_reason == "restart requested"
    rep.gone()
    after = rep.after_exit(code=0, uptime=5.0, stopping=False, now=6.0)
    assert not after.restart and after.event == "" and rep.state == State.STOPPED and rep.restarts == 0


def test_a_stop_before_the_start_cancels_it_and_a_completed_source_stays_completed() -> None:
    rep = replica()
    rep.waiting()
    assert rep.cancel_start() and rep.state == State.STOPPED and rep.wanted_down
    rep.spawned(os.getpid(), "fork")
    assert not rep.wanted_down                     # a new start is wanted again
    rep.ready(1.0)
    rep.completed()
    rep.stopping(wanted=True, reason="down")
    assert rep.state == State.COMPLETED


def test_fenced_exits_are_retried_soon_and_not_counted_up_to_a_limit() -> None:
    rep = replica(max_restarts=100)
    for _ in range(fencing.FENCED_RETRIES):
        after = rep.after_exit(code=fence.FENCED_EXIT, uptime=0.0, stopping=False, now=0.0)
        assert after.restart and after.event == "fenced" and after.delay == fencing.FENCED_RETRY_DELAY_S
    assert rep.restarts == 0
    after = rep.after_exit(code=fence.FENCED_EXIT, uptime=0.0, stopping=False, now=0.0)
    assert after.event != "fenced" and rep.restarts == 1          # a holder we cannot kill: an ordinary exit
    rep.ready(1.0)
    assert rep.fenced == 0


def test_hung_and_over_limit_replicas_are_to_be_replaced() -> None:
    rep = replica(heartbeat_timeout=2.0, ready_timeout=5.0, max_rss_mb=100, limit_for=3.0)
    rep.spawned(os.getpid(), "fork")
    rep.started_at = time.time() - 6.0                     # READY never came
    assert rep.health(time.monotonic()) == ("hung", "not READY after ready_timeout 5s")
    rep.ready(time.time())
    rep.reading = Reading(alive=True, rss_bytes=10 << 20)
    now = time.monotonic()
    assert rep.health(now + 1.0) is None
    event, reason = rep.health(now + 3.0) or ("", "")
    assert event == "hung" and "no heartbeat" in reason

    over = replica(heartbeat_timeout=60.0, max_rss_mb=100, limit_for=3.0)
    over.spawned(os.getpid(), "fork")
    over.ready(time.time())
    over.beat({}, now=0.0)
    over.reading = Reading(alive=True, rss_bytes=200 << 20)
    beat = over.last_beat or 0.0
    assert over.health(beat + 0.1) is None                 # over the limit, not for limit_for yet
    assert over.health(beat + 3.2) == ("limit", "rss 200 MB over max_rss_mb 100 for 3.1s")
    over.stopping(wanted=False, reason="rss 200 MB over max_rss_mb 100")
    assert not over.live and over.health(beat + 9.0) is None   # being replaced: judged no more
