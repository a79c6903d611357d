"""The stage process: sockets, batching, framing, acknowledgements, heartbeats, drain on SIGTERM.

One :class:`StageRuntime` runs in each stage replica process. It is a single-threaded loop
around one ``zmq.Poller``; the stage's own code (``process`` / ``generate``) runs inside that
loop, so a heartbeat proves the loop is alive (a stage stuck in ``process`` stops beating and the
supervisor replaces it as hung).

Sockets of one replica::

    PULL  bind    <input>        records from every upstream stage (absent for a source)
    PULL  bind    <ack>          acknowledgements from downstream replicas
    PUSH  connect edge endpoints one per replica of each output edge's dest (:class:`Link`)
    PUSH  connect <ack of src>   acknowledgements back to each upstream sender (lazily)
    DEALER connect <control>     hello / ready / heartbeats up, endpoint changes and stop down

Delivery ``at-least-once``: a sender keeps every batch until its receiver acknowledges it and
resends it, to the same replica, when the ack is late (the receiver died with it queued, or is
slow); a receiver drops a copy of a batch it has taken already (:meth:`AckLedger.copy_of_seen`). A transform acknowledges an
input batch only once every batch it produced from it is acknowledged downstream, so an ack at
the source means the record reached the sink. ``max_inflight`` unacknowledged batches per edge
bound memory and give backpressure. Delivery ``at-most-once`` skips all of that.

Origins and watermarks (what makes the sink's dedup exact without a clock): a source replica
stamps every DATA header with its origin ``o`` (``"<stage>.<replica>/<generation>"``, the
generation of its id space kept in its state file) and, under at-least-once, a watermark ``w``:
one more than the highest id in every batch up to its committed position *as saved in its state
file*, so every id of this origin below ``w`` is acknowledged end to end and a restarted or
repartitioned replica never emits an id below a watermark it announced (a watermark ahead of the
saved position would let a new generation re-emit ids the sink can no longer tell from another
partition's, see :mod:`streampipe.stages.seen`). A transform copies ``o`` and ``w`` from an input
batch onto every batch it cuts from it; a stage that defines ``on_origin(origin, watermark)``
(the consumer) is told them before each ``process``. This needs integer ids that increase per
source replica. A source whose ids stop increasing freezes its watermark where it was (the sink
then keeps that origin's ids exactly; ``ids_out_of_order`` in its stats) and dead-letters a record
whose id is below the watermark it already announced: a sink would take it for a duplicate.
Records without an integer id do not take part.

The package, one module per part (each owns its state; the loop wires them)::

    tunables.py    every timing and size limit, with why
    tokens.py      InToken, Taken, Mark: what the ack ledger counts
    loop.py        StageRuntime: the poller, the stop, the end of the stream, acks in, state saves
    control.py     ControlLink: the DEALER to the supervisor (tell up, read down)
    inputs.py      Inputs: the PULL socket, copies dropped, ``process`` per batch, the drain
    router.py      Router: which output edge each record goes to
    outputs.py     OutBatch, Link, Edge, id partitioning (split_by_id): what goes out, resent, acked
    producer.py    Producer: a source's one pull path (records or columns) and its cuts
    cursor.py      SourceCursor: a source's positions, what is committed, origin and watermark
    ledger.py      AckLedger: what is owed upstream, held acks of a stateful transform, end of stream
    ending.py      StreamEnd: a transform's or sink's end of stream (whose EOS is in, finish(), ended)
    acksocks.py    AckSockets: where acks may go, one PUSH per sender
    counters.py    Counters (the one ``reject``), the error log, the stage's stats for the heartbeat
    bootstrap.py   main(): signals, death signal, gc tuning, logging, restore
"""

from __future__ import annotations

from streampipe.stages.runtime.bootstrap import Host, die_with_parent, main, pid_alive, restore_point, setup_logging, tune_gc
from streampipe.stages.runtime.loop import StageRuntime
from streampipe.stages.runtime.outputs import ID_BLOCK, Edge, Link, OutBatch, replica_of_id, replica_of_ids, split_by_id
from streampipe.stages.runtime.tunables import EXIT_CRASH, EXIT_OK, EXIT_START_FAILED, LATENCY_BUCKETS_MS

__all__ = ["EXIT_CRASH", "EXIT_OK", "EXIT_START_FAILED", "ID_BLOCK", "LATENCY_BUCKETS_MS", "Edge", "Host", "Link", "OutBatch",
           "StageRuntime", "die_with_parent", "main", "pid_alive", "replica_of_id", "replica_of_ids", "restore_point",
           "setup_logging", "split_by_id", "tune_gc"]
