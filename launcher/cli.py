"""The ``streampipe`` command line (typer).

    streampipe up [--config services.yaml] [--run-dir DIR] [--detach] [--watch] [--exit-when-done] [--dashboard] [--metrics-port PORT]
    streampipe status [--run-dir DIR] [--json] [--watch] [--wide]   a table that fits the terminal
    streampipe top [--interval S] [--iterations N]              the status, live
    streampipe down [--run-dir DIR]
    streampipe validate [--config PATH]
    streampipe restart STAGE / scale STAGE N
    streampipe apply [--config services.yaml] [--dry-run]        a changed config, live (also SIGHUP)
    streampipe events [-f] / logs [STAGE] [-f] / graph / report
    streampipe dashboard [--port P]   (or up --dashboard)           a live web page on 127.0.0.1, token in its URL
    streampipe deadletter list STAGE [--records] [--json] / deadletter replay STAGE [--timeout S]
    streampipe run-stage STAGE [--replica N] [--health-port P]   one replica, no supervisor
    streampipe keys generate DIR                                 CURVE keys for security: curve
    streampipe export kubernetes --image IMAGE [-o DIR] [--namespace NS] [--service-monitor]
    streampipe export systemd -o DIR [--health-port P] [--user U] [--env K=V]   one unit per replica and a target

The run directory defaults to ``.streampipe/`` beside the config, so commands run from the
config's folder find the pipeline with no flags. Exit status: 0 ok, 1 failure (no pipeline
running, a stage failed to start), 2 a bad ``services.yaml``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psutil
import typer

from streampipe.launcher.errors import ConfigError, NotRunning, StreampipeError

if TYPE_CHECKING:
    from rich.console import Console

    from streampipe.launcher.config import PipelineConfig

# A command imports what it needs when it runs: `status --json` answers in about the time of a bare
# typer app (benchmarks/cli_startup.py) only if this module imports no numpy, loguru, pydantic model,
# YAML parser or rich console up front (tests/test_layering.py checks that it does not).
DEFAULT_CONFIG = "services.yaml"    # = launcher.config.DEFAULT_CONFIG (tests/test_layering.py checks), without importing it

def _flags_take_no_value() -> None:
    """typer 0.2x prints ``<bool>`` beside every flag in ``--help`` (``--detach <bool>``, ``--help
    <bool>`` too), as if it took a value; a flag takes none, so its type column stays empty."""
    option: Any = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_take_no_value", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False) and self.metavar is None:
            return None
        return shown(self, ctx)  # type: ignore[no-any-return]

    display_type_rich.flags_take_no_value = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_flags_take_no_value()
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run a stream pipeline as supervised processes: one per stage, ZeroMQ between them.")


def _print_version(value: bool) -> None:
    if value:
        from streampipe import __version__

        print(f"streampipe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print streampipe's version and exit.")) -> None:
    """Run a stream pipeline as supervised processes: one per stage, ZeroMQ between them."""


@functools.cache
def _console() -> Console:
    """The console for a command's output (made on first use: rich costs ~20 ms to import)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


@functools.cache
def _err() -> Console:
    """The console for errors and warnings (stderr)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


DETACH_TIMEOUT_S = 180.0    # `up --detach` waits this long for every stage to be READY
DETACH_SETTLE_S = 1.0       # every stage READY and no restart for this long: a crash loop is not "up"
DOWN_MARGIN_S = 30.0        # beyond the stages' grace periods, for `down` to wait

ConfigOpt = typer.Option(Path(DEFAULT_CONFIG), "--config", "-c", help="The pipeline file.")
RunDirOpt = typer.Option(None, "--run-dir", "-r", help="Run directory (default: .streampipe beside the config).")


def _fail(exc: StreampipeError) -> typer.Exit:
    from rich.markup import escape

    _err().print(f"[red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def _config(path: Path, check_stages: bool = True) -> PipelineConfig:
    from streampipe.launcher.config import load_config

    try:
        return load_config(path, check_stages=check_stages)
    except ConfigError as exc:
        raise _fail(exc) from None


def resolve_run_dir(run_dir: Path | None, config: Path = Path(DEFAULT_CONFIG)) -> Path:
    """``--run-dir``, else ``run_dir:`` of the config, else ``.streampipe`` beside the config."""
    if run_dir is not None:
        return run_dir.resolve()
    if config.exists() and _may_name_run_dir(config):
        from streampipe.launcher.config import load_config

        try:
            return load_config(config, check_stages=False).default_run_dir()
        except ConfigError:
            pass
    return (config.resolve().parent / ".streampipe").resolve()


def _may_name_run_dir(config: Path) -> bool:
    """Whether the config's text could set ``run_dir:``; when it cannot, the run directory is
    ``.streampipe`` beside it whether the file is valid or not, and the config need not be loaded
    (the models and the YAML parser cost ``status`` ~150 ms). A YAML key reads ``run_dir`` only if
    the text holds those letters, or escapes in a quoted key (a backslash): both go the long way."""
    try:
        text = config.read_text()
    except (OSError, UnicodeDecodeError):
        return True     # load_config says what is wrong, as before
    return "run_dir" in text or "\\" in text


@app.command()
def up(config: Path = ConfigOpt, run_dir: Path | None = RunDirOpt,
       detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background; return once every stage is READY."),
       metrics_port: int | None = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on 127.0.0.1:PORT."),
       watch: bool = typer.Option(False, "--watch", "-w", help="Apply edits of the config; restart a stage whose module is edited."),
       exit_when_done: bool = typer.Option(False, "--exit-when-done",
                                           help="A batch job: stop once every source completed and what it sent is done "
                                                "(exit 0), or once a stage failed for good (exit 1)."),
       dashboard: bool = typer.Option(False, "--dashboard", help="Also serve the web dashboard on 127.0.0.1 (the URL is printed)."),
       ) -> None:
    """Start the pipeline: one process per stage replica, supervised. Ctrl-C stops it cleanly."""
    cfg = _config(config)
    rd = run_dir.resolve() if run_dir else cfg.default_run_dir()
    if detach:
        raise typer.Exit(_detach(cfg, rd, metrics_port, watch, dashboard, exit_when_done))
    from loguru import logger

    from streampipe.launcher.errors import AlreadyRunning
    from streampipe.launcher.supervisor import run_supervisor

    logger.remove()
    logger.add(sys.stderr, level=cfg.logging.level, colorize=None, diagnose=False,
               format="<green>{time:HH:mm:ss.SSS}</> <level>{level:<7}</> {message}")
    _console().print(f"[bold]streampipe[/] pipeline [cyan]{cfg.pipeline}[/] from {cfg.path} "
                  f"({len(cfg.stages)} stages, run dir {rd}); Ctrl-C to stop", highlight=False)
    dash, serving = None, None
    if dashboard:
        from streampipe.launcher.dashboard import Dashboard

        dash = Dashboard(rd, url_file=rd / DASHBOARD_URL_FILE)
        serving = dash.in_thread()
        _console().print(f"dashboard: {dash.url}", highlight=False, soft_wrap=True)
    try:
        code = run_supervisor(cfg, rd, metrics_port, watch, exit_when_done)
    except AlreadyRunning as exc:
        raise _fail(exc) from None
    finally:
        if dash is not None:
            dash.stop(wait=serving)
    raise typer.Exit(code)


DASHBOARD_URL_FILE = "dashboard.url"   # in the run dir (0700), while `up --dashboard` serves it


def _detach(cfg: PipelineConfig, rd: Path, metrics_port: int | None, watch: bool = False, dashboard: bool = False,
            exit_when_done: bool = False) -> int:
    from streampipe.launcher.control import request
    from streampipe.launcher.rundir import RunDir
    from streampipe.launcher.spawn import child_env, spawn_cold

    run = RunDir(rd)
    if (pid := run.supervisor_pid()) is not None:
        _err().print(f"[red]error:[/] a pipeline is already running in {rd} (supervisor pid {pid})")
        return 1
    rd.mkdir(parents=True, exist_ok=True)
    os.chmod(rd, 0o700)
    argv = ["-m", "streampipe", "up", "--config", str(cfg.path.resolve()), "--run-dir", str(rd)]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    if watch:
        argv.append("--watch")
    if exit_when_done:
        argv.append("--exit-when-done")
    if dashboard:
        argv.append("--dashboard")
    log = rd / "supervisor.out"
    sup_pid = spawn_cold(argv, log, child_env())
    deadline = time.monotonic() + DETACH_TIMEOUT_S
    expected = sum(s.replicas for s in cfg.stages.values())
    stable_picture: list[Any] = []
    stable_since = 0.0
    with _console().status("starting stages ...") as spinner:
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                done_pid, _ = os.waitpid(sup_pid, os.WNOHANG)
            except ChildProcessError:
                done_pid = sup_pid
            if done_pid == sup_pid:
                tail = log.read_text(errors="replace").strip().splitlines()[-15:] if log.exists() else []
                _err().print("[red]error:[/] the supervisor exited during start-up:\n" + "\n".join(tail))
                return 1
            try:
                st = request(rd, "status", timeout=2.0)
            except StreampipeError:
                continue
            rows = st["stages"]
            failed = [r for r in rows if r["state"] == "failed"]
            if failed:
                for r in failed:
                    _err().print(f"[red]failed:[/] {r['name']}.{r['replica']}: {r['last_error'] or r['last_exit']}", highlight=False)
                _err().print(f"the other stages keep running; `streampipe status --run-dir {rd}` and `streampipe logs` show more")
                return 1
            ready = [r for r in rows if r["state"] in ("running", "blocked", "completed", "stopped")]
            spinner.update(f"starting stages ... {len(ready)}/{expected} ready")
            picture = sorted((r["name"], r["replica"], r["pid"], r["restarts"]) for r in rows)
            if len(ready) < expected or picture != stable_picture:
                stable_picture, stable_since = picture, time.monotonic()
            elif time.monotonic() - stable_since >= DETACH_SETTLE_S:   # up, and staying up
                _console().print(f"pipeline [cyan]{cfg.pipeline}[/] up: {len(ready)} stage processes, supervisor pid {sup_pid}, run dir {rd}",
                              highlight=False)
                if dashboard and (rd / DASHBOARD_URL_FILE).exists():
                    _console().print(f"dashboard: {(rd / DASHBOARD_URL_FILE).read_text().strip()}", highlight=False, soft_wrap=True)
                return 0
    _err().print(f"[red]error:[/] not every stage was READY after {DETACH_TIMEOUT_S:g}s; see `streampipe status`")
    return 1


@app.command()
def status(run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
           as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every second until Ctrl-C (as `top`; fitted, not --wide)."),
           wide: bool = typer.Option(False, "--wide", help="Every column, whatever the terminal's width."),
           ) -> None:
    """Show every stage replica: pid, state, uptime, restarts, CPU, RSS, records, rate, errors.

    The table fits the terminal: at 80 columns stage, replica, pid, state, restarts, rate and
    errors; more columns as the width allows (the info column holds a stage's own ``stats()``);
    ``--wide`` shows them all."""
    rd = resolve_run_dir(run_dir, config)
    if watch:
        raise typer.Exit(_top(rd, TOP_INTERVAL_S, None))
    st = _ask_status(rd)
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return
    from streampipe.launcher.statusview import print_status

    print_status(_console(), st, wide)


def _ask_status(rd: Path) -> dict[str, Any]:
    from streampipe.launcher.control import request

    try:
        st = request(rd, "status")
    except NotRunning as exc:
        _err().print(f"no pipeline running: {exc}", highlight=False)
        raise typer.Exit(1) from None
    except StreampipeError as exc:
        raise _fail(exc) from None
    st.pop("ok", None)
    return st


TOP_INTERVAL_S = 1.0    # `top` and `status --watch`: a person reads a table a second


@app.command()
def top(run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
        interval: float = typer.Option(TOP_INTERVAL_S, "--interval", "-i", min=0.1, help="Seconds between refreshes."),
        iterations: int | None = typer.Option(None, "--iterations", "-n", min=1, help="Stop after N refreshes (default: until Ctrl-C)."),
        ) -> None:
    """A live view of the status in the terminal (the table of ``status``, refreshed in place); Ctrl-C exits."""
    raise typer.Exit(_top(resolve_run_dir(run_dir, config), interval, iterations))


def _top(rd: Path, interval: float, iterations: int | None) -> int:
    """Refresh the status table in place (rich Live) until Ctrl-C, ``iterations`` or the pipeline stops.
    The table is fitted to the terminal's width at each refresh (a resized window is followed)."""
    from rich.live import Live

    from streampipe.launcher.control import request
    from streampipe.launcher.statusview import status_table

    console = _console()
    st = _ask_status(rd)
    shown = 0
    code = 0
    with Live(status_table(st, console.width), console=console, auto_refresh=False, screen=False,
              vertical_overflow="visible") as live:
        try:
            while iterations is None or shown < iterations:
                shown += 1
                live.update(status_table(st, console.width), refresh=True)
                if iterations is not None and shown >= iterations:
                    break
                time.sleep(interval)
                st = request(rd, "status")
                st.pop("ok", None)
        except KeyboardInterrupt:
            pass
        except StreampipeError as exc:   # the pipeline stopped under us: say so, below the last picture
            live.stop()
            _err().print(f"no pipeline running any more: {exc}", highlight=False)
            code = 1
    return code


@app.command()
def down(run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt) -> None:
    """Stop the pipeline gracefully (SIGTERM, grace period, SIGKILL); exit 0 once no stage is left."""
    from streampipe.launcher.control import request
    from streampipe.launcher.errors import ControlError
    from streampipe.launcher.rundir import RunDir

    rd = resolve_run_dir(run_dir, config)
    stages: list[psutil.Process] = []
    supervisor = RunDir(rd).supervisor()    # by pid, start time and run dir: never a reused pid
    try:
        st = request(rd, "status")
        stages = _processes([r["pid"] for r in st["stages"] if r["pid"]] + ([st["forkserver_pid"]] if st.get("forkserver_pid") else []))
        grace = DOWN_MARGIN_S + 10.0 * len(st["stages"])
        request(rd, "down")
    except NotRunning as exc:     # as `docker compose down`: stopping what is stopped is done, exit 0
        _err().print(f"nothing to stop: {exc}", highlight=False)
        return
    except ControlError as exc:
        # a wedged supervisor: SIGTERM does the same graceful stop; its stages die with it anyway
        if supervisor is None or not supervisor.is_running():
            raise _fail(exc) from None
        _err().print(f"[yellow]warning:[/] {exc}; sending SIGTERM to the supervisor (pid {supervisor.pid})")
        grace = DOWN_MARGIN_S
        _signal(supervisor, signal.SIGTERM)
    deadline = time.monotonic() + grace
    with _console().status(f"stopping {len(stages) or 'the'} processes ..."):
        while time.monotonic() < deadline and supervisor is not None and _running(supervisor):
            time.sleep(0.1)
    if supervisor is not None and _running(supervisor):
        _err().print(f"[yellow]warning:[/] the supervisor (pid {supervisor.pid}) did not stop in {grace:g}s: SIGKILL")
        _signal(supervisor, signal.SIGKILL)   # its stages die with it (PR_SET_PDEATHSIG)
        time.sleep(0.5)
    left = [p for p in stages if _running(p)]
    for proc in left:   # the supervisor is gone or wedged: make sure nothing of ours survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # a stage leads its own process group
        except OSError:
            _signal(proc, signal.SIGKILL)
    if left:
        _err().print(f"[yellow]warning:[/] killed {len(left)} processes that outlived the supervisor: {[p.pid for p in left]}")
    _console().print(f"pipeline stopped; no stage process left (run dir {rd})", highlight=False)


def _processes(pids: list[int]) -> list[psutil.Process]:
    """Handles on live processes; each keeps its start time, so psutil never signals a reused pid."""
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return out


def _running(proc: psutil.Process) -> bool:
    """Whether this very process (pid and start time) is alive and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)   # psutil checks the start time first: a reused pid raises, unsignalled
    except psutil.Error:
        pass


@app.command()
def validate(config: Path = ConfigOpt) -> None:
    """Check services.yaml without starting anything (exit 2 and the line on an error)."""
    cfg = _config(config)
    n = sum(s.replicas for s in cfg.stages.values())
    _console().print(f"[green]ok[/] {cfg.path}: pipeline {cfg.pipeline!r}, {len(cfg.stages)} stages, {n} processes, "
                  f"{len(cfg.edges())} edges, delivery {cfg.delivery}", highlight=False)


@app.command()
def restart(stage: str = typer.Argument(..., help="The stage to restart, replica by replica."),
            run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt) -> None:
    """Rolling restart of a stage (also brings a failed stage back)."""
    from streampipe.launcher.control import restart_stage

    try:
        reply = restart_stage(resolve_run_dir(run_dir, config), stage)
    except StreampipeError as exc:
        raise _fail(exc) from None
    n = reply["replicas"]
    _console().print(f"restarted {stage}: {n} replica{'' if n == 1 else 's'}")


@app.command()
def scale(stage: str = typer.Argument(...), replicas: int = typer.Argument(..., min=1, max=64),   # = control.MAX_REPLICAS
          run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt) -> None:
    """Change a stage's number of replicas while data flows."""
    from streampipe.launcher.control import scale_stage

    try:
        reply = scale_stage(resolve_run_dir(run_dir, config), stage, replicas)
    except StreampipeError as exc:
        raise _fail(exc) from None
    _console().print(f"scaled {stage}: {reply['before']} -> {reply['after']} replicas")


APPLY_TIMEOUT_S = 900.0     # rolling restarts wait for READY replica by replica (ready_timeout each)


@app.command()
def apply(config: Path = ConfigOpt, run_dir: Path | None = RunDirOpt,
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing.")) -> None:
    """Apply a changed services.yaml to the running pipeline: added, removed and changed stages,
    in an order that loses nothing (README, "Changing a running pipeline"). Exit 2 for a bad file
    or a change that cannot be made live; nothing is changed then."""
    from streampipe.launcher.control import request

    cfg = _config(config)
    rd = run_dir.resolve() if run_dir else cfg.default_run_dir()
    path = str(cfg.path.resolve())
    try:
        plan = request(rd, "apply", config=path, dry_run=True)
        show_plan(plan, path)
        if plan["refused"]:
            raise typer.Exit(2)
        if dry_run or not plan["plan"]["steps"]:
            return
        reply = request(rd, "apply", timeout=APPLY_TIMEOUT_S, config=path, dry_run=False)
    except StreampipeError as exc:
        raise _fail(exc) from None
    if reply["refused"]:
        show_plan(reply, path)
        raise typer.Exit(2)
    _console().print(f"[green]applied[/] {path}: {len(reply['plan']['steps'])} steps; `streampipe events` shows each", highlight=False)


def show_plan(reply: dict[str, Any], path: str) -> None:
    """The plan of an ``apply`` reply as a table (refusals on stderr)."""
    from rich.markup import escape
    from rich.table import Table

    steps = reply["plan"]["steps"]
    for refusal in reply["refused"]:
        _err().print(f"[red]refused:[/] {escape(refusal)}", highlight=False)
    if reply["refused"]:
        _err().print(f"nothing changed; {path} cannot be applied to the running pipeline")
        return
    if not steps:
        _console().print(f"nothing to change: the pipeline already runs {path}", highlight=False)
        return
    table = Table(title=f"plan for {path}", title_justify="left", header_style="bold")
    for col in ("#", "step", "stage", "what"):
        table.add_column(col, overflow="fold")
    for i, (kind, stage, what) in enumerate(steps, 1):
        table.add_row(str(i), kind, stage or "-", escape(what))
    _console().print(table)


@app.command()
def events(run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
           follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the supervisor's events: starts, exits, restarts, backoffs, kills, failures."""
    path = resolve_run_dir(run_dir, config) / "events.jsonl"
    if not path.exists() and not follow:
        _err().print(f"no events in {path.parent}")
        raise typer.Exit(1)
    from streampipe._logtail import follow_file

    tail = follow_file(path)
    try:
        while True:
            for line in (entry.text for entry in tail.poll()):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if as_json:
                    print(json.dumps(ev), flush=True)
                    continue
                who = f"{ev.get('stage') or 'supervisor'}" + (f".{ev['replica']}" if ev.get("replica") is not None else "")
                stamp = time.strftime("%H:%M:%S", time.localtime(ev["time"])) + f".{int(ev['time'] * 1000) % 1000:03d}"
                _console().print(f"{stamp} [bold]{ev['event']:<10}[/] {who:<18} pid={ev.get('pid') or '-':<7} {ev.get('reason', '')}",
                              highlight=False, soft_wrap=True)
            if not follow:
                return
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        tail.close()


@app.command()
def logs(stage: str | None = typer.Argument(None, help="Only this stage (all replicas)."),
         run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new entries until Ctrl-C."),
         level: str | None = typer.Option(None, "--level", "-l", help="Minimum level, e.g. WARNING."),
         since: str | None = typer.Option(None, "--since", help="e.g. 30s, 5m, 2h or an ISO time."),
         tail_n: int | None = typer.Option(None, "--tail", "-n", help="Only the last N entries so far (then new ones with -f)."),
         grep: str | None = typer.Option(None, "--grep", "-g", help="Only entries whose message matches this regular expression."),
         as_json: bool = typer.Option(False, "--json", help="One JSON object per entry."),
         summary: bool = typer.Option(False, "--summary", help="The log extractor's facts as a table.")) -> None:
    """Merged, time-ordered logs of every stage, colored by stage (like docker compose logs)."""
    from streampipe.launcher.logs import show_logs, show_summary

    rd = resolve_run_dir(run_dir, config)
    if summary:
        raise typer.Exit(show_summary(rd, console=_console(), as_json=as_json))
    raise typer.Exit(show_logs(rd, stage=stage, follow=follow, level=level, since=since, as_json=as_json, console=_console(),
                               tail_n=tail_n, grep=grep, err=_err()))


@app.command()
def graph(config: Path = ConfigOpt,
          fmt: str = typer.Option("mermaid", "--format", help="mermaid or dot"),
          png: Path | None = typer.Option(None, "--png", help="Draw the diagram to this PNG file instead (prints only where).")) -> None:
    """Print the pipeline's topology (stages, replicas, edges) as Mermaid or Graphviz dot, or draw it (--png)."""
    from streampipe.launcher.graph import render_png, to_dot, to_mermaid

    cfg = _config(config, check_stages=False)   # the topology needs no stage code
    if fmt not in ("mermaid", "dot"):
        _err().print("error: --format is mermaid or dot")
        raise typer.Exit(2)
    if png is None:
        print(to_mermaid(cfg) if fmt == "mermaid" else to_dot(cfg))
        return
    render_png(cfg, png)
    _console().print(f"wrote {png}", highlight=False, soft_wrap=True)


@app.command()
def dashboard(run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
              port: int = typer.Option(0, "--port", "-p", min=0, max=65535, help="Port on 127.0.0.1 (default: a free one)."),
              ) -> None:
    """A live web page of the running pipeline on 127.0.0.1: graph with rates, replicas, dead letters,
    model accuracy, events, restart and scale. Open the URL it prints (it holds the access token);
    it stops with Ctrl-C or when the pipeline stops."""
    rd = resolve_run_dir(run_dir, config)
    _ask_status(rd)                          # no pipeline: say so now, exit 1
    from loguru import logger

    from streampipe.launcher.dashboard import Dashboard

    logger.remove()
    logger.add(sys.stderr, level="INFO", diagnose=False, format="<green>{time:HH:mm:ss.SSS}</> <level>{level:<7}</> {message}")

    try:
        dash = Dashboard(rd, port=port)
    except OSError as exc:
        _err().print(f"[red]error:[/] cannot serve on 127.0.0.1:{port}: {exc.strerror}")
        raise typer.Exit(1) from None
    _console().print(f"dashboard of {rd}: {dash.url}\n(Ctrl-C to stop)", highlight=False, soft_wrap=True)
    code = dash.serve()
    if code:
        _err().print("the pipeline stopped; dashboard closed", highlight=False)
    raise typer.Exit(code)


@app.command()
def report(run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
           out: Path = typer.Option(Path("report.png"), "--out", "-o", help="Where to write the figure.")) -> None:
    """Plot model metrics over time (versions, drift points) and throughput; print a summary."""
    from streampipe.launcher.report import make_report

    rd = resolve_run_dir(run_dir, config)
    # the config tells which sink holds a window's results: the one named, or the default when this is its run
    named = run_dir is None or config != Path(DEFAULT_CONFIG) or resolve_run_dir(None, config) == rd
    try:
        summary = make_report(rd, out, config if named else None)
    except FileNotFoundError as exc:
        _err().print(f"error: {exc}")
        raise typer.Exit(1) from None
    _console().print(summary, highlight=False, markup=False)     # a key or a value may hold brackets
    _console().print(f"wrote {out}")


@app.command("run-stage")
def run_stage(stage: str = typer.Argument(..., help="The stage to run."),
              replica: int | None = typer.Option(None, "--replica", help="Replica index (default: the ordinal "
                                                 "ending the host name, as in consumer-3, else 0)."),
              config: Path = ConfigOpt, run_dir: Path | None = RunDirOpt,
              health_port: int | None = typer.Option(None, "--health-port", help="Serve /healthz, /readyz, /metrics here."),
              health_host: str = typer.Option("0.0.0.0", "--health-host", help="Address the health server binds."),
              bind_host: str | None = typer.Option(None, "--bind-host", help="Address its sockets bind (default: bind_host)."),
              advertise_host: str | None = typer.Option(None, "--advertise-host", help="Host receivers send acks to "
                                                        "(default: $STREAMPIPE_ADVERTISE_HOST, advertise_host:, the bind host "
                                                        "or the interface towards them)."),
              keys: Path | None = typer.Option(None, "--keys", help="CURVE key folder (default: keys: of the config)."),
              ) -> None:
    """Run one stage replica in the foreground with no supervisor (a container's or a systemd unit's
    entrypoint): endpoints from the config and name resolution, JSON logs on stdout, SIGTERM drains."""
    from streampipe.launcher.runstage import run_stage as run
    from streampipe.launcher.runstage import run_stage_spec

    cfg = _config(config)
    rd = run_dir.resolve() if run_dir else cfg.default_run_dir()
    spec = run_stage_spec(cfg, stage, replica, rd, bind_host=bind_host, advertise_host=advertise_host,
                          keys=keys.resolve() if keys else None)
    raise typer.Exit(run(spec, health_port, health_host))


deadletter_app = typer.Typer(no_args_is_help=True, help="A stage's dead letters: list them, replay them once the code is fixed.")
app.add_typer(deadletter_app, name="deadletter")


@deadletter_app.command("list")
def deadletter_list(stage: str = typer.Argument(..., help="The stage whose dead letters to list."),
                    run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
                    records: bool = typer.Option(False, "--records", help="Show each record too (user data: off by default)."),
                    as_json: bool = typer.Option(False, "--json", help="One JSON object per dead letter, its record included.")) -> None:
    """Each dead letter of STAGE: its key, when, the replica that rejected it, the input it came
    from, its state (pending, replayed, failed again) and its reason."""
    from streampipe.launcher.deadletters import show

    rd = resolve_run_dir(run_dir, config)
    _check_stage(stage, config)
    raise typer.Exit(show(rd, stage, _console(), records=records, as_json=as_json))


@deadletter_app.command("replay")
def deadletter_replay(stage: str = typer.Argument(..., help="The stage to replay the dead letters into."),
                      run_dir: Path | None = RunDirOpt, config: Path = ConfigOpt,
                      timeout: float = typer.Option(300.0, "--timeout", min=0, help="Seconds to wait for the replayed records to settle."),
                      wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until every replayed record is settled.")) -> None:
    """Put STAGE's pending dead letters through the running stage again (after a fix: apply or
    restart), each once: its outputs held once by the sink; one that fails again is dead-lettered
    again with its new reason. Exit 0 once all settled, 1 if some did not within --timeout."""
    from streampipe.launcher.deadletters import replay

    rd = resolve_run_dir(run_dir, config)
    _check_stage(stage, config)
    try:
        code = replay(rd, stage, _console(), timeout=timeout, wait=wait)
    except StreampipeError as exc:
        raise _fail(exc) from None
    raise typer.Exit(code)


def _check_stage(stage: str, config: Path) -> None:
    """A stage the config names (when there is a config to ask): else exit 2 with the stages."""
    if not config.exists():
        return
    cfg = _config(config, check_stages=False)
    if stage not in cfg.stages:
        raise _fail(ConfigError(f"no stage {stage!r} (stages: {', '.join(cfg.stages)})", file=cfg.path, field="stages"))


keys_app = typer.Typer(help="CURVE keys for security: curve.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(folder: Path = typer.Argument(..., help="Where to write the key pairs (a Secret's contents).")) -> None:
    """Write the pipeline's server and client key pairs: every stage loads the folder; the
    ``*.key`` public keys in it are the clients admitted."""
    from streampipe.stages.network import generate_keys

    if (folder / "server.key_secret").exists():
        _err().print(f"error: {folder} already holds keys; remove them first to make new ones")
        raise typer.Exit(1)
    for path in generate_keys(folder):
        _console().print(f"wrote {path}", highlight=False)


export_app = typer.Typer(no_args_is_help=True, help="Write what runs the pipeline somewhere else (Kubernetes manifests, systemd units).")
app.add_typer(export_app, name="export")


class _Exported(Protocol):
    notes: list[str]


E = TypeVar("E", bound=_Exported)


def _export(config: Path, make: Callable[[PipelineConfig], E]) -> E:
    """An export of the config at ``config``: a bad config or what cannot map exits 2; its notes on stderr."""
    try:
        result = make(_config(config))
    except ConfigError as exc:
        raise _fail(exc) from None
    for note in result.notes:
        _err().print(f"note: {note}", markup=False, highlight=False)
    return result


@export_app.command("kubernetes")
def export_kubernetes(config: Path = ConfigOpt,
                      image: str = typer.Option(..., "--image", help="The image the pods run: the repository's Dockerfile built with your pipeline folder."),
                      output: Path | None = typer.Option(None, "--output", "-o", help="Write one file per object here (default: one YAML stream on stdout)."),
                      namespace: str | None = typer.Option(None, "--namespace", "-n", help="Put every object in this namespace (default: kubectl's current one)."),
                      service_monitor: bool = typer.Option(False, "--service-monitor", help="Also write a ServiceMonitor (Prometheus Operator)."),
                      without: list[str] = typer.Option([], "--without", help="Leave this stage out (repeatable), e.g. the log extractor."),
                      storage: str = typer.Option("1Gi", "--storage", help="Size of each pod's volume claim (its run directory), e.g. 10Gi."),
                      ) -> None:
    """Kubernetes manifests for the pipeline: a StatefulSet, headless Service and NetworkPolicy per stage.

    Exit 2, naming the file, line and field, for a bad config or a setting that cannot hold on
    Kubernetes (README, "Running on Kubernetes").
    """
    from streampipe.launcher.kubernetes import STORAGE_SIZE, dns_label, export, manifest_stream, write_manifests

    if namespace is not None and (dns_label(namespace) != namespace or len(namespace) > 63):
        raise typer.BadParameter(f"{namespace!r} is not a Kubernetes namespace name (lower-case letters, digits, '-')",
                                 param_hint="--namespace")
    if not image.strip() or any(c.isspace() for c in image):
        raise typer.BadParameter("an image reference such as registry.example/team/pipeline:1.0", param_hint="--image")
    if not STORAGE_SIZE.match(storage):
        raise typer.BadParameter(f"{storage!r} is not a size such as 500Mi, 10Gi or 1T", param_hint="--storage")
    result = _export(config, lambda cfg: export(cfg, image=image, namespace=namespace, service_monitor=service_monitor,
                                                without=without, storage=storage))
    if output is None:
        sys.stdout.write(manifest_stream(result.objects))
        return
    paths, stale = write_manifests(result.objects, output)
    if stale:
        _err().print(f"removed {len(stale)} files of an earlier export: {', '.join(p.name for p in stale)}", markup=False, highlight=False)
    _err().print(f"wrote {len(paths)} manifests to {output}; apply them with: kubectl apply -f {output}", markup=False, highlight=False)


@export_app.command("systemd")
def export_systemd(output: Path = typer.Option(..., "--output", "-o", help="The folder to write the units in (created)."),
                   config: Path = ConfigOpt, run_dir: Path | None = RunDirOpt,
                   health_port: int | None = typer.Option(None, "--health-port", min=1, max=65535,
                                                          help="Give each replica a health port from this one up (/healthz, /readyz, /metrics)."),
                   user: str | None = typer.Option(None, "--user", help="The user the units run as (User=; default: systemd's, root)."),
                   env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE set in every unit's environment (repeatable)."),
                   without: list[str] = typer.Option([], "--without", help="Leave this stage out (repeatable): the log extractor, or a stage another host runs."),
                   ) -> None:
    """systemd units for the pipeline: one service per stage replica running `run-stage STAGE
    --replica N` with this virtualenv's streampipe, and a target that wants them all.

    Exit 2, naming the file, line and field, for a bad config or a setting that cannot run as
    units on one host (README, "Running under systemd").
    """
    from streampipe.launcher.exportdir import write_export
    from streampipe.launcher.systemd import MARKER, export

    pairs = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        pairs[key] = value
    units = _export(config, lambda cfg: export(cfg, run_dir=run_dir, health_port=health_port, user=user, env=pairs,
                                               without=without))
    paths, stale = write_export(output, units.files, "*", MARKER)
    if stale:
        _err().print(f"removed {len(stale)} units of an earlier export: {', '.join(p.name for p in stale)}", markup=False, highlight=False)
    folder = output.resolve()
    _err().print(f"wrote {len(paths) - 1} units and {units.target} to {folder}; install them with:\n"
                 f"  sudo cp {folder}/*.service {folder}/{units.target} /etc/systemd/system/ && sudo systemctl daemon-reload\n"
                 f"  sudo systemctl enable --now {units.target}", markup=False, highlight=False)


def main() -> None:
    try:
        app()
    except StreampipeError as exc:
        _err().print(f"error: {exc}", markup=False, highlight=False)   # `[plot]` in a message is not markup
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
