"""Process bootstrap: signals, the death signal, gc tuning, logging, restoring, and :func:`main`."""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from streampipe._rotating import watch_stdio
from streampipe.stages import fence, wire
from streampipe.stages.api import StageContext
from streampipe.stages.proctitle import set_title
from streampipe.stages.registry import load_stage
from streampipe.stages.runtime.loop import StageRuntime
from streampipe.stages.runtime.tunables import ADOPT_WAIT_S, EXIT_CRASH, EXIT_OK, EXIT_START_FAILED, GC_GEN0
from streampipe.stages.spec import DUMP_STACK_SIGNAL, StageSpec
from streampipe.stages.state import load_replica_state, read_layout

_PR_SET_PDEATHSIG = 1


def tune_gc() -> None:
    """Keep the garbage collector off the per-record path: what exists once the stage is set up
    (imported modules, a model, the fork server's preloads) is frozen out of every collection, and
    young collections run every ``GC_GEN0`` allocations. Records that only pass through are freed
    by reference counting; the collector still runs, for cycles a stage's own code makes."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)


def die_with_parent(supervisor_pid: int, adopt_wait: float = ADOPT_WAIT_S) -> None:
    """Make the kernel SIGKILL this process when the supervisor dies, even by SIGKILL.

    A fork-server stage is a grandchild that the supervisor (a child subreaper) adopts when the
    middle process exits, a few ms after the fork: wait for that first. If the parent is still
    not the supervisor (no subreaper support), a watcher thread polls the supervisor's pid.
    """
    if supervisor_pid <= 0:
        return
    deadline = time.monotonic() + adopt_wait
    while os.getppid() != supervisor_pid and time.monotonic() < deadline:
        time.sleep(0.0002)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == supervisor_pid:
        return
    if not pid_alive(supervisor_pid):
        os._exit(EXIT_CRASH)

    def watch() -> None:
        while pid_alive(supervisor_pid):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether a process exists (a zombie counts: use psutil where that matters)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setup_logging(spec: StageSpec, stdout: bool = False) -> None:
    """JSON lines into ``logs/<stage>.<r>.jsonl`` (rotated), or to stdout (run-stage: a container's log)."""
    logger.remove()
    logger.configure(extra={"stage": spec.name, "replica": spec.replica})
    if stdout:
        logger.add(sys.stdout, serialize=True, level=spec.log_level, enqueue=False, backtrace=False, diagnose=False)
        return
    logs = Path(spec.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logger.add(logs / f"{spec.ident}.jsonl", serialize=True, level=spec.log_level,
               rotation=spec.log_rotation, retention=spec.log_retention, enqueue=False, backtrace=False,
               diagnose=False)    # a traceback shows no variable values: no dumps of user data


class Host:
    """What runs a replica without a supervisor (``streampipe run-stage``) hooks into: it hears
    everything the replica would tell a supervisor, and keeps a finished source up until stopped
    (a container that exits after its stream would be restarted for ever)."""

    def on_tell(self, op: str, fields: dict[str, Any]) -> None:
        pass

    def idle(self, stop: threading.Event) -> None:
        logger.info("stream completed; idle until stopped")
        stop.wait()


def restore_point(spec: StageSpec) -> dict[str, Any] | None:
    """A source replica's saved position, refused if it belongs to another replica count.

    The supervisor repartitions the positions before it starts a source whose ``replicas``
    changed; a replica started another way must not guess (its share of the ids depends on it).
    """
    state_dir = Path(spec.run_dir) / "state"
    layout = read_layout(state_dir, spec.name)
    if layout is not None and layout.differs(spec.replicas) and not layout.completed:
        raise RuntimeError(f"the saved positions of {spec.name} are for {layout.replicas} replicas, not {spec.replicas}: "
                           f"start it with `streampipe up`, which repartitions them, or set replicas: {layout.replicas}")
    return load_replica_state(state_dir, spec.name, spec.replica)


def transform_restore_point(spec: StageSpec) -> dict[str, Any] | None:
    """A transform replica's saved state; refused when the stage is partitioned by key and the
    state belongs to another replica count (its keys are another replica's now: the supervisor
    re-deals them before it starts the stage, see stages/repartition.py)."""
    saved = load_replica_state(Path(spec.run_dir) / "state", spec.name, spec.replica)
    saved_ = saved or {}
    was = saved_.get("replicas")
    if spec.keyed and isinstance(was, int) and was != spec.replicas and (saved_.get("state") or saved_.get("keyed")):
        raise RuntimeError(f"the saved keyed state of {spec.name} is for {was} replicas, not {spec.replicas}: start it "
                           f"with `streampipe up`, which re-deals it by key, or set replicas: {was}")
    return saved


def announce_completed(rt: StageRuntime) -> None:
    """A source replica that completed in an earlier run sends its end of stream again, and nothing
    else (it saves nothing either): a receiver that has it saved confirms it at once, and one that
    never heard it (a replica more of this stage since a repartition, a stage added downstream)
    learns that this sender has ended."""
    try:
        rt.finished = True
        rt.bind()
        rt.tell("ready")
        die_with_parent(rt.spec.supervisor_pid)
        rt.run()
    except Exception as exc:     # it is completed whatever its receivers heard: a bind that fails costs them only this
        logger.opt(exception=True).warning(f"could not send the end of stream again: {type(exc).__name__}: {exc}")


def main(spec: StageSpec, host: Host | None = None) -> int:
    """Run one stage replica; returns the process exit status. ``host``: run without a supervisor."""
    stop_requested = threading.Event()
    rt: StageRuntime | None = None

    def on_term(signum: int, frame: Any) -> None:
        stop_requested.set()
        if rt is not None:
            rt.stop_asked = True

    signal.signal(signal.SIGTERM, on_term)
    faulthandler.enable()                                  # a crash in C code: its stack to .stderr
    faulthandler.register(DUMP_STACK_SIGNAL, all_threads=True)   # the supervisor's word before it kills a hung replica
    # Ctrl-C is the supervisor's to handle; a replica in the foreground drains on it
    signal.signal(signal.SIGINT, on_term if host is not None else signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getppid() == spec.supervisor_pid:      # a cold start: arm the death signal at once
        die_with_parent(spec.supervisor_pid)
    if not fence.claim(spec.run_dir, spec.ident):   # another process is this replica: bind nothing, write nothing
        return fence.FENCED_EXIT
    set_title(spec.ident, spec.pipeline)         # the replica now: named after it (stages/proctitle.starting)
    setup_logging(spec, stdout=host is not None)
    if host is None:
        watch_stdio(Path(spec.run_dir) / "logs" / f"{spec.ident}.stderr", spec.file_max_bytes, spec.log_retention)
    try:
        stage = load_stage(spec.type, spec.options, Path(spec.config_dir))
        stage.context = StageContext(name=spec.name, replica=spec.replica, replicas=spec.replicas,
                                     run_dir=Path(spec.run_dir), config_dir=Path(spec.config_dir),
                                     outputs=tuple(sorted({e.output for e in spec.edges})), max_batch=spec.max_batch,
                                     inputs=tuple(spec.inputs))
        rt = StageRuntime(spec, stage)
        stage.context.beat = rt.keepalive
        if host is not None:
            rt.control.on_tell = host.on_tell
        rt.tell("hello")
        saved = restore_point(spec) if rt.source else transform_restore_point(spec)
        if saved is not None:
            if saved.get("completed") and rt.source:
                logger.info("stream already completed in an earlier run; nothing to do but say so downstream")
                if host is None:
                    announce_completed(rt)
                rt.tell("completed")
                if host is not None:
                    host.idle(stop_requested)
                rt.close()
                return EXIT_OK
            rt.restore(saved)
        rt.bind()
        stage.setup()
        tune_gc()
    except Exception as exc:
        tb = traceback.format_exc()
        logger.opt(exception=True).error(f"stage failed to start: {type(exc).__name__}: {exc}")
        print(tb, file=sys.stderr, flush=True)
        if rt is None and spec.control:   # failed before the runtime existed: tell the supervisor on a socket of our own
            ctl: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
            ctl.setsockopt(zmq.IDENTITY, spec.ident.encode())
            ctl.connect(spec.control)
            ctl.send(wire.control("error", pid=os.getpid(), error=f"{type(exc).__name__}: {exc}"[-wire.TEXT_MAX_CHARS:],
                                  traceback=tb[-wire.TEXT_MAX_CHARS:]))
            ctl.close(linger=500)
        elif rt is not None:
            rt.tell("error", error=f"{type(exc).__name__}: {exc}", traceback=tb)
            rt.close()
        return EXIT_START_FAILED
    if stop_requested.is_set():
        rt.stop_asked = True
    rt.tell("ready")
    # a forked stage is adopted by the supervisor once the fork server's middle process has
    # exited (set-up overlapped that). READY may go first: if the supervisor died meanwhile,
    # adoption never comes and die_with_parent exits, so nothing is orphaned.
    die_with_parent(spec.supervisor_pid)
    logger.info(f"ready: pid {os.getpid()}, input {spec.input}, outputs {[e.name for e in spec.edges]}")
    code = EXIT_OK
    profile_dir = os.environ.get("STREAMPIPE_PROFILE")   # a folder: each stage writes <stage>.<r>.prof there
    profiler = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        rt.run()
        if rt.finished:
            logger.info(f"stream completed: {rt.counters.records_out} records sent")
            if host is not None and not stop_requested.is_set():
                rt.save_state()
                host.idle(stop_requested)
    except Exception as exc:
        tb = traceback.format_exc()
        logger.opt(exception=True).error(f"stage crashed: {type(exc).__name__}: {exc}")
        print(tb, file=sys.stderr, flush=True)
        rt.tell("error", error=f"{type(exc).__name__}: {exc}", traceback=tb)
        code = EXIT_CRASH
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir or ".") / f"{spec.ident}.prof"))
        try:
            if code == EXIT_OK:
                stage.teardown()
                rt.save_state()
        except Exception as exc:
            logger.opt(exception=True).error(f"teardown failed: {exc}")
            code = EXIT_CRASH
        if rt.finished and rt.eos_confirmed():
            rt.tell("completed", records_out=rt.counters.records_out)
        rt.heartbeat()
        rt.tell("bye", code=code)
        rt.close()
    return code

