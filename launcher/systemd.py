"""``services.yaml`` -> systemd units: ``streampipe export systemd -o DIR``.

As ``honcho export systemd`` (foreman's) does for a Procfile: one service unit per stage
replica, ``<pipeline>-<stage>-<N>.service``, running ``streampipe run-stage STAGE --replica N``
(the command :func:`streampipe.launcher.runstage.run_stage_args` builds for Kubernetes pods too),
and one ``<pipeline>.target`` that wants them all, so that ``systemctl start|stop|restart
demo.target`` acts on the whole pipeline and each unit is ``PartOf=`` it. systemd is then the
supervisor: it restarts a replica as ``restart:`` says (``always``, ``on-failure``; ``never`` is
``Restart=no``), gives up after ``max_restarts`` in ``restart_window`` (``StartLimitBurst``,
``StartLimitIntervalSec``), stops it with SIGTERM (run-stage drains, within ``stop_grace``) and
keeps its JSON-line logs in the journal.

Each unit runs the user's own ``services.yaml`` (absolute path), in its folder (so stage modules
and relative paths beside it resolve), with the ``streampipe`` of the virtualenv that exported it
(absolute path: systemd has no PATH of the user's shell) and one run directory for the pipeline.
The units are for one host: every replica of a stage with inputs binds the stage's ``port:``, so
on one host each needs an address of its own; a stage whose ``address:`` lists one IP address per
replica has replica N bind the N-th. For several hosts, export on each and leave the others'
stages out with ``--without``.

Refused (:class:`ConfigError`, exit 2): what ``run-stage`` refuses (``transport: ipc``, a stage
with inputs and no ``port:``), replicas of a stage with inputs that would bind one address and
port, a fixed ``ack_port`` on replicas sharing an address, and the log extractor (each replica
logs to the journal, not to the run directory's files it reads: ``journalctl -u 'demo-*'``).
"""

from __future__ import annotations

import ipaddress
import math
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from streampipe.launcher.config import PipelineConfig
from streampipe.launcher.errors import ConfigError
from streampipe.launcher.kubernetes import Source, kept_stages
from streampipe.launcher.runstage import run_stage_args, run_stage_spec

MARKER = "# Written by `streampipe export systemd`"   # the first line of every file written, so an earlier export's are known
STOP_MARGIN_S = 10      # TimeoutStopSec beyond stop_grace: run-stage's own drain deadline comes first, systemd's SIGKILL after
UNIT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")      # what a unit name may hold (systemd also allows ':' and '\\', kept out)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Replica:
    """One replica as a unit: its name and the command line it runs."""

    stage: str
    replica: int
    unit: str                      # demo-normalizer-1.service
    argv: list[str]                # ExecStart, before quoting
    health_port: int | None


@dataclass
class Units:
    """The files to write (name -> text), the replicas and notes for the user."""

    target: str                    # demo.target
    files: dict[str, str]
    replicas: list[Replica]
    notes: list[str]


def unit_word(text: str) -> str:
    """``text`` as one word of an ``ExecStart=`` line (systemd.service "Command lines"): ``%``
    and ``$`` escaped (specifiers, variables), double-quoted with C escapes if it needs quoting.

    >>> unit_word("/srv/p/services.yaml"), unit_word("my dir/x"), unit_word('50%$"')
    ('/srv/p/services.yaml', '"my dir/x"', '"50%%$$\\\\""')
    """
    if text and not re.search(r"[\s\"'\\;]", text):
        return text.replace("%", "%%").replace("$", "$$")
    return _quoted(text)


def streampipe_program() -> list[str]:
    """How a unit starts streampipe: this virtualenv's ``streampipe`` script, by absolute path
    (not resolved: a venv's ``python`` is a symlink out of it), else ``python -m streampipe``."""
    script = Path(sys.executable).parent / "streampipe"
    if script.is_file():
        return [str(script.absolute())]
    found = shutil.which("streampipe")
    return [str(Path(found).absolute())] if found else [str(Path(sys.executable).absolute()), "-m", "streampipe"]


def export(cfg: PipelineConfig, *, run_dir: Path | None = None, health_port: int | None = None, user: str | None = None,
           env: Mapping[str, str] | None = None, without: Iterable[str] = ()) -> Units:
    """The unit files of ``cfg``; raise :class:`ConfigError` for what cannot run as units on one host."""
    src = Source(cfg)
    notes: list[str] = []
    stages = kept_stages(cfg, src, set(without), notes)
    env = dict(env or {})
    for key in env:
        if not ENV_NAME.match(key):
            raise ConfigError(f"--env {key}=...: not an environment variable name")
    rd = (run_dir or cfg.default_run_dir()).resolve()
    config = cfg.path.resolve()
    pipeline = _name(cfg.pipeline)
    if not pipeline:
        raise src.fail(f"the pipeline's name begins every unit's name: {cfg.pipeline!r} has no letter or digit", "pipeline")
    program = streampipe_program()
    replicas: list[Replica] = []
    taken: dict[str, str] = {}
    for name in stages:
        stage = cfg.stages[name]
        if stage.type == "log_extractor":
            raise src.fail("the log extractor reads the log files of a run directory; under systemd each replica logs to "
                           f"the journal (journalctl -u '{pipeline}-*'), so it would see nothing: leave it out with "
                           f"--without {name}", "stages", name, "type")
        unit_stage = _name(name)
        if unit_stage in taken:
            raise src.fail(f"stages {taken[unit_stage]!r} and {name!r} both become units {pipeline}-{unit_stage}-N: rename one",
                           "stages", name)
        taken[unit_stage] = name
        for index in range(stage.replicas):
            bind = replica_bind_host(cfg, src, name, index)
            run_stage_spec(cfg, name, index, rd, bind_host=bind)   # what run-stage would refuse, refused now
            port = None if health_port is None else health_port + len(replicas)
            argv = [*program, *run_stage_args(name, config=config, run_dir=rd, replica=index, health_port=port, bind_host=bind)]
            replicas.append(Replica(name, index, f"{pipeline}-{unit_stage}-{index}.service", argv, port))
    target = f"{pipeline}.target"
    if health_port is not None and health_port + len(replicas) - 1 > 65535:
        raise ConfigError(f"--health-port {health_port}: {len(replicas)} replicas need ports up to {health_port + len(replicas) - 1}")
    files = {r.unit: _service(cfg, r, target, user, env) for r in replicas}
    files[target] = _target(cfg, target, replicas)
    return Units(target, files, replicas, notes)


def replica_bind_host(cfg: PipelineConfig, src: Source, stage: str, replica: int) -> str | None:
    """The address replica ``replica`` binds on a host it shares with the others (None: the config's).

    When ``address:`` lists one IP address per replica, replica N binds the N-th: producers connect to
    them all. Otherwise every replica of a stage with inputs would bind its ``port:`` on one address.
    """
    sc = cfg.stages[stage]
    addresses = sc.addresses
    if len(addresses) == sc.replicas and all(_is_ip(a) for a in addresses):
        return addresses[replica]    # what producers connect to, so what it listens on (not bind_host's 127.0.0.1)
    if sc.replicas == 1:
        return None
    if sc.inputs:
        raise src.fail(f"the {sc.replicas} replicas of {stage!r} would all bind port {sc.port} on one host: give address: "
                       f"one local IP address per replica (e.g. [127.0.0.2, 127.0.0.3]: replica N binds the N-th), "
                       f"or run them on several hosts (export on each, --without the stages another runs)",
                       *src.stage_key(stage, "address" if sc.address is not None else "replicas"))
    if sc.ack_port:
        raise src.fail(f"the {sc.replicas} replicas of {stage!r} would all bind ack_port {sc.ack_port} on one host: "
                       "leave ack_port at 0 (any free port, advertised)", *src.stage_key(stage, "ack_port"))
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _name(text: str) -> str:
    """A name as a piece of a unit name: each run of other characters one '-', trimmed.

    >>> _name("log_extractor"), _name("My Pipeline!")
    ('log_extractor', 'My-Pipeline')
    """
    return UNIT_NAME.sub("-", text).strip("-.")


def _quoted(text: str) -> str:
    """``text`` double-quoted as systemd reads a word: C escapes, ``%`` and ``$`` doubled
    (``Environment=`` takes ``"KEY=VALUE"`` words)."""
    text = text.replace("%", "%%").replace("$", "$$")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def _service(cfg: PipelineConfig, r: Replica, target: str, user: str | None, env: dict[str, str]) -> str:
    sc = cfg.stages[r.stage]
    restart = {"always": "always", "on-failure": "on-failure", "never": "no"}[sc.restart]
    environment = {"PYTHONUNBUFFERED": "1"}
    if sys.prefix != sys.base_prefix:    # a virtualenv: what `activate` would set, for a stage that starts tools from it
        bin_dir = str(Path(sys.executable).parent.absolute())
        environment.update(VIRTUAL_ENV=sys.prefix, PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin")
    environment.update(env)
    health = f", health on port {r.health_port}" if r.health_port is not None else ""
    lines = [
        MARKER, f"# from {cfg.path.resolve()}; edit that file and export again rather than this one.",
        "[Unit]",
        f"Description=streampipe {cfg.pipeline}: stage {r.stage}, replica {r.replica}{health}",
        f"PartOf={target}",
        "Wants=network-online.target",
        "After=network-online.target",
        # the supervisor's restart intensity: more than max_restarts restarts in restart_window and it stays failed
        f"StartLimitIntervalSec={_seconds(sc.restart_window)}",
        f"StartLimitBurst={sc.max_restarts + 1}",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={cfg.config_dir}",
        *[f"Environment={_quoted(f'{k}={v}')}" for k, v in environment.items()],
        *([f"User={user}"] if user else []),
        f"ExecStart={' '.join(unit_word(a) for a in r.argv)}",
        f"Restart={restart}",
        f"RestartSec={_seconds(max(sc.backoff_initial, 0.1))}",
        # SIGTERM to run-stage alone (it drains within stop_grace and exits 0), SIGKILL to what is left after
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={math.ceil(sc.stop_grace) + STOP_MARGIN_S}s",
        f"SyslogIdentifier={r.unit.removesuffix('.service')}",
        "",
        "[Install]",
        f"WantedBy={target}",
        "",
    ]
    return "\n".join(lines)


def _target(cfg: PipelineConfig, target: str, replicas: list[Replica]) -> str:
    return "\n".join([
        MARKER, f"# from {cfg.path.resolve()}: every replica of pipeline {cfg.pipeline!r}.",
        "[Unit]",
        f"Description=streampipe pipeline {cfg.pipeline} ({len(replicas)} replicas)",
        f"Wants={' '.join(r.unit for r in replicas)}",
        "After=network-online.target",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def _seconds(value: float) -> str:
    """A time span as systemd reads one: seconds, with up to three decimals (``0.1`` -> ``100ms``)."""
    ms = round(value * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
