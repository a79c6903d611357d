"""The stage runtime's tunables, each with why it has its value."""

from __future__ import annotations

HEARTBEAT_INTERVAL_S = 0.25     # 40 beats inside the default 10 s heartbeat_timeout
RESEND_CHECK_S = 0.05           # how often unacked batches are checked for a late ack
IDLE_WAIT_MS = 2                # a source that yielded None is asked again after this
ACK_FLUSH_EVERY = 16            # acks sent after this many batches, not only once per loop pass
SOURCE_BATCHES_PER_TICK = 8     # batches a busy source makes between two looks at its sockets
MAX_MSGS_PER_TICK = 64          # input messages handled before serving acks/heartbeats again
ZERO_COPY_BYTES = 64 << 10      # a message at least this big is sent with copy=False (below it costs more)
EOS_RESEND_S = 0.5              # an end-of-stream not acknowledged is sent again after this
EOS_WAIT_S = 60.0               # give up waiting for downstream to confirm end-of-stream
STATE_SAVE_S = 1.0              # a source commits its position at most this often (an fsync: ~ms on a busy disk)
PROMPT_SAVE_S = 0.01            # ... or this often when it waits on the saves (``saved()``: an HTTP answer holds on it)
ACK_SAVE_MIN_S = 0.02           # a stateful transform saves at most this often; its acks wait up to this long,
                                # which a window of max_inflight=128 batches absorbs up to 6,400 batches/s
ACK_SAVE_SHARE = 0.2            # ... and spends at most this share of its time saving (an fsync: 1-100 ms)
RECONNECT_IVL_MS = 10           # PUSH reconnect timer: ZeroMQ's 100 ms default delays respawn
MAX_SENDERS = 512               # run-stage: ack endpoints remembered (and ack sockets kept open)
LOG_ERRORS_PER_S = 10          # failed records logged with a traceback per second; the rest counted
LATENCY_BUCKETS_MS = (0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0)
GC_GEN0 = 20_000                # allocations between young collections (CPython's default 700 made a
                                # 1000-record batch of dicts trigger ~3 of them: half of msgpack decode's time)

ADOPT_WAIT_S = 2.0              # a forked stage waits at most this long to be adopted by the supervisor

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_START_FAILED = 3
