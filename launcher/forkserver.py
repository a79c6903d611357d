"""The fork server: a process that has imported what stages need, and forks stage processes.

A cold Python start that imports scikit-learn costs ~1.7 s; a fork of a process that already
has it costs a few milliseconds. The supervisor starts this server once (``python -m
streampipe.launcher.forkserver``), which imports the stage runtime, pyzmq, msgpack, numpy, scikit-learn and
every module named by a ``type:`` in ``services.yaml``, then serves spawn requests.

Why not ``multiprocessing``'s forkserver: it pickles the process object over its socket (we
keep pickle off every socket), and its children stay the server's, so the supervisor could not
``waitpid`` them or see their exit status if the server died. Here each stage is a
*grandchild* that is reparented at once to the supervisor (a child subreaper, ``prctl
PR_SET_CHILD_SUBREAPER``): the supervisor reaps it, gets SIGCHLD and its exit status exactly as
for a cold-started stage, and a stage outlives the fork server. No ZeroMQ context, socket or
thread exists in the server, so none crosses the fork: each stage creates its own.

Protocol over the inherited socket (fd 3), JSON lines, no pickle::

    server -> supervisor  {"ready": true, "pid": n, "modules": {"mod": [path, mtime], ...},
                           "failed": {"mod": "ImportError: ..."}}
    supervisor -> server  {"id": k, "spec": "<StageSpec json>", "stderr": "/path/to/stage.stderr"}
    server -> supervisor  {"id": k, "pid": stage pid} | {"id": k, "error": "..."}
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import traceback

from streampipe.stages.proctitle import set_title, starting

FD = 3
ENV_VAR = "STREAMPIPE_FORKSERVER"

BASE_PRELOAD = ["zmq", "msgpack", "numpy", "loguru", "streampipe.stages.runtime", "streampipe.stages.builtins.generator",
                "streampipe.stages.builtins.normalizer", "streampipe.stages.builtins.consumer"]
HEAVY_PRELOAD = ["sklearn", "sklearn.linear_model", "sklearn.metrics", "joblib", "scipy.stats"]
LEARNING_TYPES = ("trainer", "evaluator", "predictor", "serve")   # built-ins that load scikit-learn models


def preload(types: list[str], config_dir: str) -> tuple[dict[str, list], dict[str, str]]:
    """Import the runtime and every stage type; return (module file -> mtime, failures)."""
    from streampipe.stages.registry import BUILTINS, target_of

    if config_dir not in sys.path:
        sys.path.insert(0, config_dir)
    wanted = list(BASE_PRELOAD)
    if any(t in LEARNING_TYPES for t in types):
        wanted += HEAVY_PRELOAD
    wanted += [target_of(t).partition(":")[0] for t in types]
    mtimes: dict[str, list] = {}
    failed: dict[str, str] = {}
    for name in dict.fromkeys(wanted):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a broken user module: its stages start cold and show the error
            failed[name] = f"{type(exc).__name__}: {exc}"
            sys.modules.pop(name, None)
            continue
        path = getattr(module, "__file__", None)
        if path and (name.startswith("streampipe.stages.") or name not in BUILTINS):
            try:
                mtimes[name] = [path, os.stat(path).st_mtime]
            except OSError:
                pass
    return mtimes, failed


def _read_line(fd: int) -> bytes:
    """Read up to a newline (not to EOF: the writer may live on)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


class Middle:
    """A child of the server, forked ahead of time, that forks one stage and exits.

    The stage is its child, so it is adopted by the supervisor (a child subreaper) as soon as
    the middle process exits. Forking the middle process *before* the request arrives takes one
    of the two forks (~3.5 ms each for a 130 MB image) off the respawn path.
    """

    def __init__(self, supervisor_pid: int, server_sock: socket.socket, pipeline: str) -> None:
        req_r, self.req_w = os.pipe()
        self.pid_r, pid_w = os.pipe()
        if os.fork() == 0:
            try:
                # the server ignores SIGCHLD (the kernel reaps its middles); a middle must not: a stage
                # that dies before its middle has exited (a setup that fails in ms, a middle descheduled
                # on a starved machine) would be reaped by the kernel at once, and the supervisor would
                # never hear of its exit. As a zombie it is reparented to the supervisor, which reaps it.
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                set_title("fork-server (next stage)", pipeline)
                server_sock.close()
                os.close(self.req_w)
                os.close(self.pid_r)
                line = _read_line(req_r)
                if line:                              # EOF: the server is gone or retired us
                    request = json.loads(line)
                    pid = os.fork()
                    if pid == 0:                      # the stage
                        os.close(req_r)
                        os.close(pid_w)
                        _become_stage(request, supervisor_pid)
                    _answer(pid_w, pid, request)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(pid_w)

    def spawn(self, request: dict) -> int:
        """Hand the request over; return the stage's pid (not waiting for this process to exit)."""
        try:
            data = (json.dumps(request) + "\n").encode()
            while data:
                data = data[os.write(self.req_w, data):]
            pid = _read_line(self.pid_r)
        finally:
            os.close(self.req_w)
            os.close(self.pid_r)
        if not pid:
            raise RuntimeError("the middle process died before forking the stage")
        return int(pid)   # reaped by the kernel (SIGCHLD ignored in the server)


def _answer(pid_w: int, pid: int, request: dict) -> None:
    """The middle process tells the server the stage's pid (then exits: the stage is adopted)."""
    os.write(pid_w, b"%d\n" % pid)


def _become_stage(request: dict, supervisor_pid: int) -> None:
    code = 1
    try:
        os.setsid()                                  # own session and process group
        # adoption by the supervisor completes while the middle process exits; the runtime
        # waits for it (die_with_parent) only after its own set-up, so the two overlap
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        from streampipe.stages.runtime import main
        from streampipe.stages.spec import StageSpec

        spec = StageSpec.from_json(request["spec"])
        set_title(starting(spec.ident), spec.pipeline)
        code = main(spec)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> int:
    config = json.loads(os.environ.get(ENV_VAR, "{}"))
    supervisor_pid = int(config.get("supervisor_pid", os.getppid()))
    pipeline = str(config.get("pipeline", "pipeline"))
    set_title("fork-server", pipeline)
    from streampipe.stages.runtime import die_with_parent

    die_with_parent(supervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps the short-lived middle processes
    sock = socket.socket(fileno=FD)
    sock.setblocking(True)
    mtimes, failed = preload(config.get("types", []), config.get("config_dir", os.getcwd()))
    sock.sendall((json.dumps({"ready": True, "pid": os.getpid(), "modules": mtimes, "failed": failed}) + "\n").encode())
    reader = sock.makefile("rb")
    middle = Middle(supervisor_pid, sock, pipeline)
    for line in reader:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        try:
            reply = {"id": request.get("id"), "pid": middle.spawn(request)}
        except Exception as exc:
            reply = {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        sock.sendall((json.dumps(reply) + "\n").encode())
        middle = Middle(supervisor_pid, sock, pipeline)         # the next one, while nobody is waiting
    return 0


if __name__ == "__main__":
    # run under its own name, not as __main__: what imports it by name (a test's fault injection,
    # tests/faults/sitecustomize.py) sees the code that runs
    from streampipe.launcher.forkserver import serve as _serve

    sys.exit(_serve())
