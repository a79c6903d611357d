"""nats / nats_sink: NATS JetStream in and out (nats-py, in a thread of its own with an asyncio loop).

**Source** (type ``nats``): a durable pull consumer on ``stream`` (made if missing, ``ack_policy``
all, ``deliver_policy`` all). A message is acknowledged to the server only in :meth:`committed`,
when every record up to it is acknowledged end to end by the pipeline: with the consumer's
``AckAll`` policy one ``+ACK`` of the highest message covers everything below it. A record's
``id`` is the message's **stream sequence**, so a message the server delivers again (after a
crash of any stage, or of the server) has the id it had, and the sinks' dedup drops the copy. A
payload's own ``id``, if it has one, is kept as ``source_id``. A payload that is not a JSON object
is dead-lettered (``<run dir>/deadletter/<stage>.jsonl``, with subject and sequence) and acked
with the records around it: it never wedges the consumer.

Order, which the sink's dedup needs (ids increase per source replica): within one process a
message delivered again (``ack_wait`` passed while the pipeline still had it) is dropped, the
first delivery is the one acked. A restarted replica first takes back what its dead predecessor
had pending: it holds every message it fetches until the server's ``num_ack_pending`` is all in
its hands (the old ones come again once their ``ack_wait`` runs out), then emits them in sequence
order; messages at or below its saved position are acked and dropped (their acks were lost with
the process). It does the same after a reconnect (a fetch the server answered while the
connection was down is pending on the server and lost to us: it comes again after ``ack_wait``).
So a restart or a reconnect costs up to ``ack_wait_s``: keep it above the time a record takes
through the pipeline, and low enough for a fast recovery. A pending message that never comes
back (deleted from the stream meanwhile) is given up after 3 ``ack_wait_s`` + 30 s, with a warning.

Replicas: ``subject`` may hold ``{replica}`` (``events.{replica}``): replica ``r`` then consumes
only that subject with a durable of its own (``<durable>_<r>``), the way partitions map onto
replicas. Without it a source has one replica.

The server going away: nats-py reconnects (every ``RECONNECT_WAIT_S``, forever), fetches fail
meanwhile and are retried with capped backoff, nothing is acked, and the pipeline waits
(backpressure); the stream keeps every message. An unreachable server, or a missing stream
without ``create``, fails ``setup`` with a clear error in ``status``.

    events:
      type: nats
      options: {url: "nats://127.0.0.1:4222", stream: EVENTS, subject: "events.in", create: true}

**Sink** (type ``nats_sink``): publishes each record as JSON to ``subject`` and waits for the
server's PubAck of every one before the batch is acknowledged upstream. Each message carries
``Nats-Msg-Id: <origin>/<id>`` (the source replica that made the record, and its id), so a record
published again after a crash within the stream's ``duplicate_window`` (default 2 minutes) is
dropped by the server: exactly once in the stream while replays stay inside that window, at least
once beyond it. Records without an integer id are published without a message id (at least once).
A server that is down blocks the sink (retried with capped backoff, backpressure upstream); a
record the server refuses (``err`` in its PubAck) is dead-lettered. A sink blocked past its
``heartbeat_timeout`` is replaced as hung: set it above the outages to ride through.

    out:
      type: nats_sink
      inputs: [normalizer]
      options: {url: "nats://127.0.0.1:4222", stream: SCORED, subject: "scored", create: true}
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from typing import Any, NamedTuple

import orjson
from loguru import logger

from streampipe.stages.api import Batch, Record, Source, Stage
from streampipe.stages.builtins.brokers import Backoff, LoopThread, check_url, decode, encode, printable, safe_url

NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")             # stream and durable names: no '.', '*', '>' or spaces
SUBJECT = re.compile(r"[^\s]{1,500}")
CONNECT_TIMEOUT_S = 5.0      # one connection attempt
FIRST_CONNECT_TRIES = 2      # setup fails after twice that without a connection (a server starting up gets a second try)
RECONNECT_WAIT_S = 0.25      # nats-py's wait between reconnect attempts (it retries forever)
FETCH_WAIT_S = 0.25          # one pull request's wait for messages; the fetch loop asks again after it
FETCH_LOST_S = 1.0           # ... and a request unanswered this long after it expired was lost (a reconnect)
REQUEST_TIMEOUT_S = 5.0      # a JetStream API call (stream / consumer info) or a PubAck
PREFETCH_BATCHES = 4         # fetched but not yet generated: at most this many fetch batches
RECOVERY_CHECK_S = 0.25      # a restarted source asks how much is pending this often while it takes it back
RECOVERY_GIVE_UP_WAITS = 3   # ... and goes on without what has not come back after 3 ack_waits
RECOVERY_GIVE_UP_S = 30.0    # ... plus 30 s (a message deleted from the stream meanwhile never comes)
IDLE_S = 0.005               # the fetch loop's nap while the stage has enough in hand


class Message(NamedTuple):
    """A message as the source keeps it: its stream sequence, ack subject, payload and subject."""

    seq: int
    reply: str
    data: bytes
    subject: str


def stream_seq(reply: str) -> int:
    """The stream sequence in a JetStream ack subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<seq>...``,
    or with a domain and an account hash after ``$JS.ACK``).

    >>> stream_seq("$JS.ACK.IN.src.1.42.40.1764130000000000000.7")
    42
    >>> stream_seq("$JS.ACK.hub.ACC.IN.src.1.42.40.1764130000000000000.7.tok")
    42
    """
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def _url(url: str) -> str:
    return check_url(url, "nats|tls|ws|wss", "nats://127.0.0.1:4222")


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a JetStream name (letters, digits, - and _)")
    return value


async def _connect(url: str, timeout: float, on_event: Any) -> Any:
    import nats  # here: the CLI validates options without the client

    async def disconnected() -> None:
        on_event("disconnected")

    async def reconnected() -> None:
        on_event("reconnected")

    errors: list[str] = []

    async def error(exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}".rstrip(": "))
        on_event(f"error: {errors[-1]}")

    # nats-py retries a first connection as it retries a reconnect, forever with max_reconnect_attempts=-1
    # (what a running stage wants): the first one is bounded here, and fails with the last reason
    connecting = asyncio.ensure_future(nats.connect(
        url, connect_timeout=timeout, max_reconnect_attempts=-1, allow_reconnect=True, reconnect_time_wait=RECONNECT_WAIT_S,
        disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error))
    try:
        return await asyncio.wait_for(connecting, timeout * FIRST_CONNECT_TRIES)
    except asyncio.TimeoutError:
        raise ConnectionError(errors[-1] if errors else f"no answer in {timeout * FIRST_CONNECT_TRIES:g}s") from None


class _Client:
    """A NATS connection in its own loop thread; what both stages need of it."""

    def __init__(self, stage: str, url: str, connect_timeout_s: float) -> None:
        self.url, self.stage = url, stage
        self.reconnects = 0
        self.last_event = ""
        self.closing = False
        self.on_lost: Any = None      # called (in the loop thread) when delivered messages may have been lost
        self.aio = LoopThread(f"nats-{stage}")
        try:
            self.nc = self.aio.run(_connect(url, connect_timeout_s, self._event), connect_timeout_s * FIRST_CONNECT_TRIES + 5)
        except Exception as exc:
            self.aio.stop()
            reason = str(exc) if isinstance(exc, ConnectionError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise ConnectionError(f"nats: cannot connect to {safe_url(url)}: {reason}") from None
        self.js = self.nc.jetstream(timeout=REQUEST_TIMEOUT_S)

    def _event(self, what: str) -> None:
        self.last_event = what
        if self.closing:
            return
        if (what == "reconnected" or "SlowConsumer" in what) and self.on_lost is not None:
            self.on_lost()
        if what == "reconnected":
            self.reconnects += 1
            logger.info(f"nats: reconnected to {safe_url(self.url)}")
        elif what == "disconnected":
            logger.warning(f"nats: disconnected from {safe_url(self.url)}; reconnecting")

    async def ensure_stream(self, stream: str, subjects: list[str], create: bool) -> None:
        from nats.js.errors import NotFoundError

        try:
            await self.js.stream_info(stream)
        except NotFoundError:
            if not create:
                raise LookupError(f"nats: stream {stream!r} does not exist (create it, or set create: true)") from None
            await self.js.add_stream(name=stream, subjects=subjects)
            logger.info(f"nats: created stream {stream} on {', '.join(subjects)}")

    def close(self) -> None:
        self.closing = True
        try:
            self.aio.run(self.nc.close(), REQUEST_TIMEOUT_S)
        except Exception:
            pass
        self.aio.stop()


class NatsSource(Source):
    def __init__(self, stream: str, url: str = "nats://127.0.0.1:4222", subject: str | None = None,
                 durable: str | None = None, create: bool = False, batch: int = 1000, ack_wait_s: float = 30.0,
                 max_ack_pending: int = 50_000, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__()
        self.url, self.stream = _url(url), _name(stream, "stream")
        if subject is not None and (not isinstance(subject, str) or not SUBJECT.fullmatch(subject)):
            raise ValueError(f"subject {subject!r} is not a NATS subject")
        self.subject = subject
        self.durable = _name(durable, "durable") if durable is not None else None
        self.create = bool(create)
        if not (isinstance(batch, int) and 1 <= batch <= 10_000):
            raise ValueError("batch must be an integer from 1 to 10000 (messages per pull request)")
        self.batch = batch
        if not ack_wait_s > 0:
            raise ValueError("ack_wait_s must be above 0")
        self.ack_wait_s = float(ack_wait_s)
        if not (isinstance(max_ack_pending, int) and max_ack_pending >= batch):
            raise ValueError("max_ack_pending must be an integer of at least batch")
        self.max_ack_pending = max_ack_pending
        if not connect_timeout_s > 0:
            raise ValueError("connect_timeout_s must be above 0")
        self.connect_timeout_s = float(connect_timeout_s)
        self.position = 0                  # the highest stream sequence generated (or dropped) so far
        self.committed_seq = 0             # ... and acknowledged end to end
        self.client: _Client | None = None
        self.inbox: deque[Any] = deque()   # fetched messages, filled by the loop thread
        self.ready: deque[Any] = deque()   # messages taken back after a restart, in order (this thread only)
        self.taken_back: list[Any] = []
        self.held: deque[tuple[int, Any]] = deque()   # (seq, msg) generated, not acked yet
        self.recovering = True
        self.running = False
        self.fetched = self.redelivered = self.acked = self.dead_lettered = self.fetch_errors = 0
        self.last_error = ""

    # -- set-up ------------------------------------------------------------------------------
    @property
    def consumer_name(self) -> str:
        base = self.durable or _name(self.context.name, "stage name (as the durable; set durable:)")
        return f"{base}_{self.context.replica}" if self.partitioned else base

    @property
    def partitioned(self) -> bool:
        return bool(self.subject and "{replica}" in self.subject)

    @property
    def filter_subject(self) -> str | None:
        return self.subject.replace("{replica}", str(self.context.replica)) if self.subject else None

    def restore(self, state: dict[str, Any]) -> None:
        self.position = self.committed_seq = int(state.get("seq", 0))

    def setup(self) -> None:
        if self.context.replicas > 1 and not self.partitioned:
            raise ValueError("nats: several replicas need a subject with {replica} (one subject per replica)")
        self.client = _Client(self.context.name, self.url, self.connect_timeout_s)
        self.client.on_lost = self.recover
        try:
            self.client.aio.run(self._prepare(), REQUEST_TIMEOUT_S * 4)
        except BaseException:
            self.teardown()
            raise
        self.running = True
        self.client.aio.spawn(self._fetch_loop())

    async def _prepare(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        assert self.client is not None
        js = self.client.js
        subjects = [self.subject.replace("{replica}", "*") if self.subject else f"{self.stream}.>"]
        await self.client.ensure_stream(self.stream, subjects, self.create)
        try:
            info = await js.consumer_info(self.stream, self.consumer_name)
        except NotFoundError:
            info = await js.add_consumer(self.stream, ConsumerConfig(
                durable_name=self.consumer_name, ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait_s, max_ack_pending=self.max_ack_pending, max_deliver=-1,
                filter_subject=self.filter_subject))
            logger.info(f"nats: created durable consumer {self.consumer_name} on {self.stream}")
        self.ack_all = info.config.ack_policy == AckPolicy.ALL
        self.recover()
        self.recovering = bool(info.num_ack_pending)
        if self.recovering:
            logger.info(f"nats: {info.num_ack_pending} messages pending from before the restart; "
                        f"taking them back first (up to ack_wait {info.config.ack_wait:g}s)")
        # pull requests answered on an inbox of our own, taken by a callback: nats-py's fetch() waits
        # for each message with a timer of its own, which cost ~3x the messages/s of this
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer_name}"
        self.reply_inbox = self.client.nc.new_inbox()
        self.answered = asyncio.Event()
        self.awaited = 0
        await self.client.nc.subscribe(self.reply_inbox, cb=self._on_msg, pending_msgs_limit=self.max_ack_pending * 2,
                                       pending_bytes_limit=-1)

    async def _on_msg(self, msg: Any) -> None:
        if not msg.reply:                            # a status: 404 no messages, 408 request expired, 409 ...
            self.answered.set()
            return
        self.inbox.append(Message(stream_seq(msg.reply), msg.reply, msg.data, msg.subject))
        self.awaited -= 1
        if self.awaited <= 0:
            self.answered.set()

    async def _fetch_loop(self) -> None:
        """One pull request for ``batch`` messages at a time, while fewer than PREFETCH_BATCHES are in hand."""
        assert self.client is not None
        nc = self.client.nc
        request = orjson.dumps({"batch": self.batch, "expires": int(FETCH_WAIT_S * 1e9)})
        backoff = Backoff()
        while self.running:
            if len(self.inbox) >= self.batch * PREFETCH_BATCHES:
                await asyncio.sleep(IDLE_S)          # backpressure: the server keeps what we do not take
                continue
            self.answered.clear()
            self.awaited = self.batch
            try:
                await nc.publish(self.next_subject, request, reply=self.reply_inbox)
                await asyncio.wait_for(self.answered.wait(), FETCH_WAIT_S + FETCH_LOST_S)
                backoff.reset()
                if self.awaited >= self.batch:
                    await asyncio.sleep(IDLE_S)      # answered with a status and nothing else: not a busy loop
            except asyncio.CancelledError:
                raise
            except Exception as exc:                 # the server is away: nats-py reconnects meanwhile
                self.fetch_errors += 1
                self.last_error = f"fetch: {type(exc).__name__}: {exc}"
                await asyncio.sleep(backoff.next())

    # -- the stream --------------------------------------------------------------------------
    def generate(self) -> Any:
        while True:
            if self.recovering:
                self._recover()
                yield None
                continue
            try:
                msg = self.ready.popleft() if self.ready else self.inbox.popleft()
            except IndexError:
                yield None
                continue
            record = self._take(msg)
            if record is not None:
                yield record
            elif self._rejected:
                yield None                           # the runtime dead-letters it now

    def _take(self, msg: Any) -> Record | None:
        """A fetched message as a record, or None: a copy of one generated already (acked if it
        is committed already), or a payload that is not a record (dead-lettered, acked later)."""
        self.fetched += 1
        seq = msg.seq
        if seq <= self.position:
            self.redelivered += 1
            if seq <= self.committed_seq:
                self._ack([msg])                      # its ack was lost: again
            return None
        self.position = seq
        self.held.append((seq, msg))
        try:
            record = decode(msg.data)
        except ValueError as exc:
            self.dead_lettered += 1
            self.reject({"subject": msg.subject, "stream_seq": seq, "data": printable(msg.data)},
                        f"nats message {self.stream}:{seq} on {msg.subject}: {exc}")
            return None
        own = record.get("id")
        if own is not None and own != seq:
            record["source_id"] = own
        record["id"] = seq
        return record

    def recover(self) -> None:
        """From now on hold what is fetched until every message pending on the consumer is in hand."""
        self.recovering = True
        self.recovery_started = time.monotonic()
        self.recovery_checked = 0.0

    def _recover(self) -> None:
        """Take every message pending on the consumer back before emitting any: after a restart
        (what the dead process had), after a reconnect or a slow-consumer drop (a fetch answered
        while the connection was down is delivered for the server and lost for us), so the ids
        still go out in increasing order and nothing is skipped."""
        now = time.monotonic()
        if now - self.recovery_checked < RECOVERY_CHECK_S:
            return
        self.recovery_checked = now
        assert self.client is not None
        try:
            info = self.client.aio.run(self.client.js.consumer_info(self.stream, self.consumer_name), REQUEST_TIMEOUT_S)
        except Exception as exc:
            self.last_error = f"consumer info: {type(exc).__name__}: {exc}"
            return
        while self.inbox:
            self.taken_back.append(self.inbox.popleft())
        latest: dict[int, Any] = {}
        for m in self.taken_back:                     # one per sequence (the latest delivery)
            latest[m.seq] = m
        in_hand = {seq for seq, _ in self.held} | set(latest)
        pending = info.num_ack_pending or 0
        waited = now - self.recovery_started
        if len(in_hand) >= pending or waited > RECOVERY_GIVE_UP_WAITS * self.ack_wait_s + RECOVERY_GIVE_UP_S:
            if len(in_hand) < pending:
                logger.warning(f"nats: {pending - len(in_hand)} pending messages did not come back in "
                               f"{waited:.0f}s (deleted from the stream?); going on without them")
            self.ready = deque(latest[s] for s in sorted(latest))
            self.taken_back = []
            self.recovering = False
            logger.info(f"nats: every pending message in hand after {waited:.1f}s ({len(latest)} taken back)")

    def committed(self, state: dict[str, Any]) -> None:
        seq = int(state.get("seq", 0))
        done = []
        while self.held and self.held[0][0] <= seq:
            done.append(self.held.popleft()[1])
        self.committed_seq = max(self.committed_seq, seq)
        if done:
            self._ack(done[-1:] if self.ack_all else done)

    def _ack(self, msgs: list[Any]) -> None:
        assert self.client is not None
        nc = self.client.nc

        async def ack() -> None:
            for m in msgs:
                try:
                    await nc.publish(m.reply, b"+ACK")      # buffered by nats-py while it reconnects
                except Exception as exc:                    # lost: the server delivers it again, acked then
                    self.last_error = f"ack: {type(exc).__name__}: {exc}"
                    return
            self.acked += len(msgs)

        self.client.aio.spawn(ack())

    def snapshot(self) -> dict[str, Any]:
        return {"seq": self.position}

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"fetched": self.fetched, "position": self.position, "committed": self.committed_seq}
        if self.recovering:
            stats["recovering"] = True
        if self.redelivered:
            stats["redelivered"] = self.redelivered
        if self.dead_lettered:
            stats["malformed"] = self.dead_lettered
        if self.client is not None and self.client.reconnects:
            stats["reconnects"] = self.client.reconnects
        if self.fetch_errors:
            stats["fetch_errors"] = self.fetch_errors
        return stats

    def teardown(self) -> None:
        self.running = False
        if self.client is not None:
            if self.client.nc.is_connected:
                try:
                    self.client.aio.run(self.client.nc.flush(), REQUEST_TIMEOUT_S)   # the last acks leave
                except Exception:
                    pass
            self.client.close()
            self.client = None


class NatsSink(Stage):
    def __init__(self, subject: str, url: str = "nats://127.0.0.1:4222", stream: str | None = None,
                 create: bool = False, timeout_s: float = REQUEST_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__()
        self.url = _url(url)
        if not isinstance(subject, str) or not SUBJECT.fullmatch(subject) or any(c in subject for c in "*>"):
            raise ValueError(f"subject {subject!r} is not a NATS subject to publish to (no wildcards)")
        self.subject = subject
        self.stream = _name(stream, "stream") if stream is not None else None
        if create and self.stream is None:
            raise ValueError("create: true needs the stream to create (stream:)")
        self.create = bool(create)
        if not timeout_s > 0 or not connect_timeout_s > 0:
            raise ValueError("timeout_s and connect_timeout_s must be above 0")
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.client: _Client | None = None
        self.ack_sub: Any = None              # the PubAcks come here (made on the first batch, in the loop thread)
        self.ack_inbox = ""
        self.attempt = 0
        self.acks: dict[int, Any] = {}
        self.awaiting = 0
        self.all_acked: asyncio.Event | None = None
        self.origin: str | None = None
        self.published = self.duplicates = self.retries = self.undeduplicated = 0

    def setup(self) -> None:
        self.client = _Client(self.context.name, self.url, self.connect_timeout_s)
        try:
            if self.stream is not None:
                self.client.aio.run(self.client.ensure_stream(self.stream, [self.subject], self.create), REQUEST_TIMEOUT_S * 2)
            else:
                self.client.aio.run(self._find_stream(), REQUEST_TIMEOUT_S * 2)
        except BaseException:
            self.teardown()
            raise

    async def _find_stream(self) -> None:
        from nats.js.errors import NotFoundError

        assert self.client is not None
        try:
            await self.client.js.find_stream_name_by_subject(self.subject)
        except NotFoundError:
            raise LookupError(f"nats: no stream takes subject {self.subject!r} (make one, or set stream: and create: true)") from None

    def on_origin(self, origin: str | None, watermark: int | None) -> None:
        self.origin = origin

    def process(self, batch: Batch) -> list[Record]:
        if not batch:
            return []
        assert self.client is not None
        todo = list(range(len(batch)))
        payloads = [encode(r) for r in batch]
        headers: list[dict[str, str] | None] = []
        for r in batch:
            i = r.get("id")
            if type(i) is int and self.origin is not None:
                headers.append({"Nats-Msg-Id": f"{self.origin}/{i}"})
            else:
                headers.append(None)
                self.undeduplicated += 1
        backoff = Backoff()
        while todo:
            try:
                results = self.client.aio.run(self._publish(todo, payloads, headers), self.timeout_s * 2 + 5)
            except Exception as exc:                 # the loop itself: treat as all to retry
                results = [exc] * len(todo)
            again = []
            for k, res in zip(todo, results):
                if isinstance(res, Exception):
                    again.append(k)
                elif "error" in res:
                    self.reject(batch[k], f"nats: the server refused the message: {res['error']}")
                else:
                    self.published += 1
                    self.duplicates += bool(res.get("duplicate"))
            if again:
                self.retries += 1
                if self.retries == 1 or self.retries % 20 == 0:
                    logger.warning(f"nats: {len(again)} of {len(todo)} messages not acknowledged by the server "
                                   f"({type(results[todo.index(again[0])]).__name__}); retrying")
                time.sleep(backoff.next())
            todo = again
        return []

    async def _publish(self, todo: list[int], payloads: list[bytes], headers: list[dict[str, str] | None]) -> list[Any]:
        """Publish ``todo`` at once, each asking for its PubAck on ``<inbox>.<attempt>.<k>``; the PubAcks
        (or an exception for each one missing after ``timeout_s``) in the order of ``todo``. One
        subscription for all, not a request per record: nats-py's request() cost ~4x the messages/s."""
        assert self.client is not None
        nc = self.client.nc
        if self.ack_sub is None:
            self.ack_inbox = nc.new_inbox()
            self.ack_sub = await nc.subscribe(f"{self.ack_inbox}.*.*", cb=self._on_puback, pending_msgs_limit=-1,
                                              pending_bytes_limit=-1)
        self.attempt += 1
        self.acks, self.awaiting = {}, len(todo)
        self.all_acked = asyncio.Event()
        prefix = f"{self.ack_inbox}.{self.attempt}."
        for k in todo:
            await nc.publish(self.subject, payloads[k], reply=f"{prefix}{k}", headers=headers[k])
        try:
            await asyncio.wait_for(self.all_acked.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            pass
        lost = TimeoutError(f"no PubAck in {self.timeout_s:g}s")
        return [self.acks.get(k, lost) for k in todo]

    async def _on_puback(self, msg: Any) -> None:
        _, _, attempt, k = msg.subject.rsplit(".", 3)
        if int(attempt) != self.attempt or int(k) in self.acks:
            return                                    # an answer to an earlier attempt, or a repeat
        status = msg.headers.get("Status") if msg.headers else None
        if status:                                    # 503: no stream listening (it is restarting) -> again
            self.acks[int(k)] = ConnectionError(f"status {status} {msg.headers.get('Description', '')}".strip())
        else:
            try:
                self.acks[int(k)] = orjson.loads(msg.data)
            except orjson.JSONDecodeError as exc:
                self.acks[int(k)] = exc
        if len(self.acks) >= self.awaiting and self.all_acked is not None:
            self.all_acked.set()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"published": self.published}
        if self.duplicates:
            stats["duplicates"] = self.duplicates       # dropped by the server's dedup window
        if self.retries:
            stats["retries"] = self.retries
        if self.undeduplicated:
            stats["undeduplicated"] = self.undeduplicated
        if self.client is not None and self.client.reconnects:
            stats["reconnects"] = self.client.reconnects
        return stats

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
