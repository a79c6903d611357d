"""``services.yaml`` -> a validated, typed :class:`PipelineConfig`.

Every error names the file, the line and the field (``services.yaml:12: stages.normalizer.replicas:
Input should be greater than or equal to 1``) and the CLI exits with status 2. Checks: YAML syntax,
unknown keys, wrong types and ranges, inputs naming a stage (or output) that does not exist,
cycles, and a ``type`` that is neither a built-in name nor ``module:name``; numbers that are
not finite (``.inf``, ``.nan``: every number of the config is a size, a count or a time), stage
names too long for their socket paths, and outputs that leave the run directory (below).

Outputs stay in the run directory: an option that names a file or folder a stage writes
(:data:`OUTPUT_OPTIONS`, e.g. the consumer's ``output``) resolves against the run directory,
and an absolute path or one whose ``..`` climbs out of it is refused unless the stage sets
``allow_outside_run_dir: true``.

Then, unless ``check_stages=False`` (commands that only need the run directory), what each
``type`` names is inspected in a short-lived child process (:mod:`streampipe.stages.introspect`; user
modules and scikit-learn are never imported here): a module that is not found, a name it does
not define, something that cannot be a stage (a class with neither ``process`` nor ``generate``,
a function that does not take one record), a source with inputs, a generator replaying a file or a ``label_join`` with ``replicas > 1``,
a ``join`` / ``enrich`` without exactly two inputs or whose roles (``left``, ``right``; ``stream``, ``table``) name
no input, a keyed built-in (``window``, ``join``, ``enrich``) with replicas not ``partition: key`` by its key, and ``options`` that the
stage's ``__init__`` would refuse (unknown key, with a "did you mean" hint; missing required
argument; a value of the wrong type where annotated), and a module that fails when imported (a
syntax error, a missing dependency, an exception at its top level: the error names the module's
file and line, with the traceback of the user's own frames), so ``up`` starts nothing then.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from streampipe.launcher.errors import ConfigError
from streampipe.stages.registry import BUILTINS

MAX_STAGE_NAME_BYTES = 64   # "i.<name>.<r>" in a fallback socket folder (/tmp/streampipe-xxxxxxxx) stays under
                            # the 107 bytes of a unix socket path (launcher/rundir.py picks the folder to fit)
# options of the built-in stages that name what they write (relative to the run directory); the
# evaluator's checkpoint_dir is read (a trainer's folder, a peer's volume on Kubernetes), not written
OUTPUT_OPTIONS: dict[str, tuple[str, ...]] = {"consumer": ("output",), "trainer": ("checkpoint_dir",), "evaluator": ("output",),
                                              "sqlite": ("path",), "compare": ("output",), "label_join": ("output",)}
# keyed built-ins: with replicas, partition: key by the first option's field (the others, other inputs' key fields, equal to it)
KEYED: dict[str, tuple[str, ...]] = {"window": ("key",), "join": ("key", "right_key"), "enrich": ("key", "table_key")}
JOINS: dict[str, tuple[str, str]] = {"join": ("left", "right"), "enrich": ("stream", "table")}   # their two inputs' roles
INSPECT_TIMEOUT_S = 60.0   # the child imports every stage module: sklearn alone ~2 s, far more on a loaded box
DEFAULT_CONFIG = "services.yaml"
DEFAULT_RUN_DIR = ".streampipe"

RestartMode = Literal["always", "on-failure", "never"]
SpawnMode = Literal["fork-server", "cold"]
Delivery = Literal["at-least-once", "at-most-once"]


class _Strict(BaseModel):
    # allow_inf_nan: every float here is a size or a time; `.inf` made int() overflow at `up`
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StageSettings(_Strict):
    """The supervisor's keys of a stage; every one may be set in ``defaults``."""

    replicas: int = Field(1, ge=1, le=64)
    restart: RestartMode = "always"
    spawn: SpawnMode = "fork-server"
    # data plane
    max_batch: int = Field(1000, ge=1, le=100_000)     # records per frame: per-batch costs (framing, acks, numpy calls) spread over 1000; linger_ms cuts partial ones
    linger_ms: float = Field(1.0, ge=0, le=60_000)     # flush a partial batch after this long: under load
                                                       # batches fill first; idle, latency stays ~1 ms
    hwm: int = Field(100, ge=1)                        # messages (= batches) queued per socket
    max_inflight: int = Field(32, ge=1)                # unacknowledged batches per edge (32 x 1000 records): more queues seconds of work downstream, and a batch acked later than ack_timeout is resent (to the same replica)
    ack_timeout: float = Field(2.0, gt=0)              # s before an unacked batch is resent (floor)
    # liveness
    heartbeat_timeout: float = Field(10.0, gt=0)       # s without loop progress -> hung
    ready_timeout: float = Field(60.0, gt=0)           # s to report READY (cold sklearn ~2 s)
    stop_grace: float = Field(5.0, gt=0)               # s between SIGTERM and SIGKILL
    # restart policy
    backoff_initial: float = Field(0.1, ge=0)
    backoff_max: float = Field(5.0, ge=0)
    backoff_factor: float = Field(2.0, ge=1)
    min_uptime: float = Field(10.0, ge=0)              # up this long -> backoff resets
    max_restarts: int = Field(5, ge=0)                 # at most this many restarts ...
    restart_window: float = Field(60.0, gt=0)          # ... in this many seconds, else FAILED
    # resource limits (None = no limit)
    max_rss_mb: float | None = Field(None, gt=0)
    max_cpu_percent: float | None = Field(None, gt=0)
    limit_for: float = Field(3.0, ge=0)                # s a limit must be exceeded before restart
    allow_outside_run_dir: bool = False                # outputs (OUTPUT_OPTIONS) may be absolute or climb out with ..


class Defaults(StageSettings):
    pass


class StageConfig(StageSettings):
    """One stage of ``stages:``: its implementation, its inputs and its own ``options``."""

    name: str = ""
    type: str
    inputs: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    # across machines (transport: tcp; see streampipe.stages.network). Used by ``run-stage``: a
    # local ``up`` knows every endpoint itself and picks free ports on ``bind_host``.
    address: str | list[str] | None = None             # the name(s) producers resolve to reach its replicas
    port: int | None = Field(None, ge=1, le=65535)     # the input port every replica binds
    ack_port: int = Field(0, ge=0, le=65535)           # acknowledgements; 0 = any free port (it is advertised)
    bind_host: str | None = None                       # default: the pipeline's bind_host
    # how producers share batches among this stage's replicas: "load" (the least loaded replica
    # takes a new batch) or "id" (records go by blocks of their id, so an id always reaches the
    # same replica, whatever crashed upstream: what a deduplicating sink needs). Default: "id"
    # for the built-in consumer, "load" for every other stage. "key" (with ``key:``, the record
    # field): every record of one key reaches the same replica, by the key's group
    # (:func:`streampipe.stages.keys.replica_of_key`), stably across restarts: what per-key state needs.
    partition: Literal["load", "id", "key"] | None = None
    key: str | None = Field(None, min_length=1)

    @property
    def partitioned_by_id(self) -> bool:
        return self.partition == "id" or (self.partition is None and self.type == "consumer")

    @property
    def partition_key(self) -> str | None:
        """The record field producers split by (``partition: key``), or None."""
        return self.key if self.partition == "key" else None

    @property
    def addresses(self) -> list[str]:
        return [self.address] if isinstance(self.address, str) else list(self.address or [])


class LoggingConfig(_Strict):
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    rotation: str = "10 MB"          # anything loguru's rotation takes: "10 MB", "1 day", "00:00"
    retention: int = Field(5, ge=1)
    # dead letters, events.jsonl, status-history.jsonl and .stderr files: several writers, or a
    # raw file descriptor, so they rotate by size only; ``retention`` rotated files are kept
    file_max_mb: float = Field(10.0, gt=0)

    @property
    def file_max_bytes(self) -> int:
        return max(1, int(self.file_max_mb * 2**20))

    @field_validator("rotation")
    @classmethod
    def _loguru_parses(cls, value: str) -> str:
        from loguru import logger

        try:   # loguru parses the value when a sink is added; delay=True creates no file
            logger.remove(logger.add(os.devnull + ".rotation-check", rotation=value, delay=True))
        except (ValueError, TypeError) as exc:
            raise ValueError(str(exc)) from None
        return value


class Edge(BaseModel):
    """``src.output -> dest``: one PUSH (in every replica of src) -> PULL (in each replica of dest)."""

    model_config = ConfigDict(frozen=True)
    src: str
    output: str
    dest: str

    @property
    def name(self) -> str:
        return f"{self.output}>{self.dest}"


class PipelineConfig(_Strict):
    pipeline: str = "pipeline"
    delivery: Delivery = "at-least-once"
    run_dir: str | None = None
    transport: Literal["ipc", "tcp"] = "ipc"           # tcp: for stages reached over the network
    bind_host: str = "127.0.0.1"                       # tcp only: the address stages bind (0.0.0.0 allowed)
    advertise_host: str | None = None                  # tcp: the host receivers send acks to ($VARS expanded;
                                                       # default: the bind host, or the interface towards them)
    resolve_interval: float = Field(5.0, gt=0)         # s between re-resolutions of a stage's address
    security: Literal["none", "curve"] = "none"        # curve: CURVE on every tcp data and ack socket
    keys: str | None = None                            # the key folder (streampipe keys generate), beside the config
    poll_interval: float = Field(0.5, gt=0)            # psutil readings
    max_message_mb: float = Field(64.0, gt=0, le=2048)   # a data frame over this is refused by its receiver
                                                       # (libzmq MAXMSGSIZE, before allocating it); senders split batches under it
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())
    defaults: Defaults = Field(default_factory=lambda: Defaults())
    stages: dict[str, StageConfig]
    path: Path = Path(DEFAULT_CONFIG)
    # each user stage's code digest as the check of this file found it, before any stage of it
    # started (stages.introspect's "code"; empty unless checked): `up --watch` compares with it
    _code: dict[str, str | None] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = data.get("defaults") or {}
        stages = data.get("stages")
        if isinstance(defaults, dict) and isinstance(stages, dict):
            data = dict(data)
            data["stages"] = {
                name: ({**defaults, **spec, "name": name} if isinstance(spec, dict) else spec)
                for name, spec in stages.items()
            }
        return data

    # -- derived views -------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.path.resolve().parent

    @property
    def code(self) -> dict[str, str | None]:
        """Each user stage's code digest when this file was checked (see ``_code``)."""
        return dict(self._code)

    @property
    def keys_dir(self) -> Path | None:
        return (self.config_dir / os.path.expandvars(self.keys)).resolve() if self.keys else None

    def default_run_dir(self) -> Path:
        return (self.config_dir / (self.run_dir or DEFAULT_RUN_DIR)).resolve()

    def edges(self) -> list[Edge]:
        out = []
        for dest, stage in self.stages.items():
            for ref in stage.inputs:
                src, _, output = ref.partition(".")
                out.append(Edge(src=src, output=output or "default", dest=dest))
        return out

    def downstream_first(self) -> list[str]:
        """Stage names, sinks first and sources last: the start order (reverse to stop)."""
        order: list[str] = []
        seen: set[str] = set()
        consumers: dict[str, list[str]] = {n: [] for n in self.stages}
        for e in self.edges():
            consumers[e.src].append(e.dest)

        def visit(n: str) -> None:
            if n in seen:
                return
            seen.add(n)
            for c in consumers[n]:
                visit(c)
            order.append(n)

        for n in self.stages:
            visit(n)
        return order

    def is_source(self, name: str) -> bool:
        return not self.stages[name].inputs


# -- loading ---------------------------------------------------------------------------------

def _line_index(node: yaml.Node, path: tuple[Any, ...] = (), index: dict[tuple[Any, ...], int] | None = None) -> dict[tuple[Any, ...], int]:
    """Map every key path of a composed YAML document to its 1-based line."""
    index = {} if index is None else index
    index.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            index[sub] = key.start_mark.line + 1
            _line_index(value, sub, index)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index[path + (i,)] = item.start_mark.line + 1
            _line_index(item, path + (i,), index)
    return index


def _refuse_duplicate_keys(node: yaml.Node, path: Path, where: tuple[str, ...] = ()) -> None:
    """A key twice in one mapping (two stages named ``b``): YAML keeps the last one silently; we refuse."""
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            line = key.start_mark.line + 1
            if name is not None and name in first:
                field = ".".join((*where, str(name)))
                raise ConfigError(f"duplicate key {name!r}: first at line {first[name]}, again at line {line} "
                                  "(YAML would keep only the last)", file=path, line=line, field=field)
            if name is not None:
                first[name] = line
            _refuse_duplicate_keys(value, path, (*where, str(name)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, (*where[:-1], f"{where[-1]}[{i}]") if where else (f"[{i}]",))


def _line_of(index: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in index:
            return index[loc[:n]]
    return None


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def load_config(path: str | Path = DEFAULT_CONFIG, *, check_stages: bool = True) -> PipelineConfig:
    """Read, parse and validate a ``services.yaml``; raise :class:`ConfigError` on any problem.

    ``check_stages=False`` skips inspecting the stage code (a child process): for commands that
    only need the run directory or the graph.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        context = f" ({exc.context} at line {exc.context_mark.line + 1})" if exc.context and exc.context_mark else ""
        raise ConfigError(f"invalid YAML: {exc.problem}{context}", file=path, line=line) from None
    if not isinstance(data, dict) or node is None:
        raise ConfigError("the file must be a mapping with a 'stages:' key", file=path, line=1)
    _refuse_duplicate_keys(node, path)
    index = _line_index(node)
    if "path" in data:
        raise ConfigError("unknown key", file=path, line=index.get(("path",)), field="path")
    try:
        cfg = PipelineConfig.model_validate({**data, "path": path})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = f"unknown key{_did_you_mean(str(loc[-1]), _keys_at(loc[:-1]))}" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "missing":
            msg = "this key is required"
        raise ConfigError(msg, file=path, line=_line_of(index, loc), field=_field(loc)) from None
    _check_graph(cfg, index)
    _check_types(cfg, index)
    _check_replay(cfg, index)
    _check_partition(cfg, index)
    _check_joins(cfg, index)
    _check_network(cfg, index)
    _check_outputs(cfg, index)
    if check_stages:
        _check_stages(cfg, index)
    return cfg


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to a misspelt ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model allows at ``loc`` (a pydantic error location below PipelineConfig)."""
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        if part not in model.model_fields:        # a dict key (a stage's name): the dict's value type
            continue
        model = model.model_fields[part].annotation
        while typing.get_origin(model) is not None:   # dict[str, M], M | None, ...
            args = [a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not args:
                return []
            model = args[-1]
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [name for name in model.model_fields if name != "path"]
    return []


def _check_replay(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    """Stages that are one stream by nature: N replicas would each do all of it, or split what must meet."""
    for name, stage in cfg.stages.items():
        if stage.replicas <= 1:
            continue
        if stage.type == "generator" and stage.options.get("file"):
            why = f"a generator replaying a file runs as one replica (it would replay {stage.options['file']!r} {stage.replicas} times)"
        elif stage.type == "label_join":
            why = "label_join runs as one replica (a prediction and its label, split by load, would miss each other)"
        else:
            continue
        line = index.get(("stages", name, "replicas")) or index.get(("defaults", "replicas")) or index.get(("stages", name))
        raise ConfigError(f"{why}: set replicas: 1", file=cfg.path, line=line, field=f"stages.{name}.replicas")


def _check_partition(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    """``partition: key`` names its field; a ``key:`` is for ``partition: key``; a keyed built-in
    (:data:`KEYED`: ``window``, ``join``, ``enrich``) with replicas is partitioned by its own key."""
    for name, stage in cfg.stages.items():
        def line(*path: str, name: str = name) -> int | None:
            return index.get(("stages", name, *path)) or index.get(("stages", name))

        if stage.partition == "key" and stage.key is None:
            raise ConfigError("partition: key needs the record field to split by: add key: <field>",
                              file=cfg.path, line=line("partition"), field=f"stages.{name}.key")
        if stage.key is not None and stage.partition != "key":
            raise ConfigError("key: is the field of partition: key: add partition: key (or remove key:)",
                              file=cfg.path, line=line("key"), field=f"stages.{name}.partition")
        if stage.type not in KEYED or stage.replicas <= 1:
            continue
        own, *others = (stage.options.get(option) for option in KEYED[stage.type])
        if stage.partition != "key" or stage.key != own:
            article = "an" if stage.type[0] in "aeiou" else "a"
            raise ConfigError(f"{article} {stage.type} with replicas must get each key's records in one replica: add "
                              f"partition: key and key: {own or '<its key option>'}", file=cfg.path,
                              line=line("replicas"), field=f"stages.{name}.partition")
        for option, value in zip(KEYED[stage.type][1:], others, strict=True):
            if value is not None and value != own:
                loc = ("stages", name, "options", option)
                raise ConfigError(f"with replicas both inputs are split by one field (key: {own}): {option} must be "
                                  f"{own!r} too, or left out", file=cfg.path, line=_line_of(index, loc), field=_field(loc))


def _check_joins(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    """A join (``join``, ``enrich``) has exactly two inputs, and the roles its options name are two of them."""
    for name, stage in cfg.stages.items():
        roles = JOINS.get(stage.type)
        if roles is None:
            continue
        if len(stage.inputs) != 2:
            article = "an" if stage.type[0] in "aeiou" else "a"
            raise ConfigError(f"{article} {stage.type} takes two inputs, its {roles[0]} and its {roles[1]}: inputs names "
                              f"{len(stage.inputs)}",
                              file=cfg.path, line=index.get(("stages", name, "inputs")) or index.get(("stages", name)),
                              field=f"stages.{name}.inputs")
        named = [stage.options.get(role) for role in roles]
        for role, value in zip(roles, named, strict=True):
            if value is not None and value not in stage.inputs:
                loc = ("stages", name, "options", role)
                raise ConfigError(f"{value!r} is not an input of {name!r} (inputs: {', '.join(stage.inputs)})",
                                  file=cfg.path, line=_line_of(index, loc), field=_field(loc))
        if named[0] is not None and named[0] == named[1]:
            loc = ("stages", name, "options", roles[1])
            raise ConfigError(f"{roles[0]} and {roles[1]} name one input, {named[0]!r}: name the other one",
                              file=cfg.path, line=_line_of(index, loc), field=_field(loc))


def _check_outputs(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    """What a stage writes stays in the run directory unless it opts out (``allow_outside_run_dir``)."""
    for name, stage in cfg.stages.items():
        if stage.allow_outside_run_dir:
            continue
        for key in OUTPUT_OPTIONS.get(stage.type, ()):
            value = stage.options.get(key)
            if not isinstance(value, str):
                continue
            if (why := outside_run_dir(value)) is not None:
                loc = ("stages", name, "options", key)
                raise ConfigError(f"{value!r} {why}; outputs resolve inside the run directory "
                                  f"(set allow_outside_run_dir: true on the stage to write there anyway)",
                                  file=cfg.path, line=_line_of(index, loc), field=_field(loc))


def outside_run_dir(path: str) -> str | None:
    """Why ``path`` (relative to the run directory) would be written outside it, or None.

    >>> outside_run_dir("output/records.jsonl") is None, outside_run_dir("a/../b") is None
    (True, True)
    >>> outside_run_dir("../elsewhere/notes.txt"), outside_run_dir("/etc/passwd")
    ('climbs out of the run directory', 'is an absolute path')
    """
    if os.path.isabs(path):
        return "is an absolute path"
    if os.path.normpath(path).split(os.sep)[0] == os.pardir:
        return "climbs out of the run directory"
    return None


def _check_network(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    def fail(message: str, *loc: Any) -> None:
        raise ConfigError(message, file=cfg.path, line=_line_of(index, loc), field=_field(loc))

    if cfg.security == "curve" and cfg.transport != "tcp":
        fail("curve secures tcp sockets: set transport: tcp (ipc sockets stay in the 0700 run directory)", "security")
    if cfg.security == "curve" and not cfg.keys:
        fail("security: curve needs keys: a folder made by `streampipe keys generate DIR`", "security")
    for name, stage in cfg.stages.items():
        if stage.address is not None and stage.port is None and stage.inputs:
            fail("a stage reached by address also needs the port its replicas bind (port: N)", "stages", name, "address")
        if stage.address is not None and not stage.inputs:
            fail("a source has no input: nothing reaches it by address", "stages", name, "address")


def _check_graph(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    path = cfg.path
    if not cfg.stages:
        raise ConfigError("a pipeline needs at least one stage", file=path, line=index.get(("stages",)), field="stages")
    for name, stage in cfg.stages.items():
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("stage names use letters, digits, '_' and '-'", file=path, line=index.get(("stages", name)), field=f"stages.{name}")
        if len(name.encode()) > MAX_STAGE_NAME_BYTES:
            raise ConfigError(f"a stage name of {len(name.encode())} bytes: at most {MAX_STAGE_NAME_BYTES}, so that its socket "
                              f"paths fit the 107 bytes of a unix socket path", file=path, line=index.get(("stages", name)),
                              field=f"stages.{name}")
        wired: set[tuple[str, str]] = set()
        for i, ref in enumerate(stage.inputs):
            src, _, output = ref.partition(".")
            where = dict(file=path, line=index.get(("stages", name, "inputs", i)), field=f"stages.{name}.inputs[{i}]")
            if (src, output or "default") in wired:
                raise ConfigError(f"{ref!r} is already an input of {name!r}", **where)  # type: ignore[arg-type]
            wired.add((src, output or "default"))
            if src not in cfg.stages:
                known = ", ".join(sorted(cfg.stages))
                raise ConfigError(f"unknown stage {src!r}{_did_you_mean(src, cfg.stages)} (stages: {known})", **where)  # type: ignore[arg-type]
            if src == name:
                raise ConfigError("a stage cannot read its own output", **where)  # type: ignore[arg-type]
            builtin = BUILTINS.get(cfg.stages[src].type)
            if output and builtin and output not in builtin.outputs:
                raise ConfigError(f"stage {src!r} ({cfg.stages[src].type}) has no output {output!r} (outputs: {', '.join(builtin.outputs)})", **where)  # type: ignore[arg-type]
        builtin = BUILTINS.get(stage.type)
        if builtin and builtin.source and stage.inputs:
            _source_with_inputs(cfg, name, index)
    # cycles: depth-first search with colours
    colour: dict[str, int] = {}
    graph: dict[str, list[str]] = {n: [ref.partition(".")[0] for ref in s.inputs] for n, s in cfg.stages.items()}

    def visit(n: str, trail: list[str]) -> None:
        colour[n] = 1
        for m in graph[n]:
            if colour.get(m) == 1:
                cycle = " -> ".join(trail[trail.index(m):] + [n, m]) if m in trail else f"{m} -> {n} -> {m}"
                raise ConfigError(f"cycle in inputs: {cycle}", file=path, line=index.get(("stages", n, "inputs")), field=f"stages.{n}.inputs")
            if colour.get(m) is None:
                visit(m, trail + [n])
        colour[n] = 2

    for n in cfg.stages:
        if n not in colour:
            visit(n, [])


def _source_with_inputs(cfg: PipelineConfig, name: str, index: dict[tuple[Any, ...], int]) -> None:
    raise ConfigError(f"{cfg.stages[name].type} is a source and takes no inputs", file=cfg.path,
                      line=index.get(("stages", name, "inputs")), field=f"stages.{name}.inputs")


def _check_types(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    """Each ``type`` is a built-in name or ``module:name`` (no import: that is the child's job)."""
    for name, stage in cfg.stages.items():
        module_name, sep, attr = stage.type.partition(":")
        if stage.type not in BUILTINS and (not sep or not module_name or not attr.isidentifier()):
            raise ConfigError(f"unknown stage type {stage.type!r}{_did_you_mean(stage.type, BUILTINS)}: use a built-in ({', '.join(BUILTINS)}), "
                              "'module:Class' or 'module:function'",
                              file=cfg.path, line=index.get(("stages", name, "type")), field=f"stages.{name}.type")


def _check_stages(cfg: PipelineConfig, index: dict[tuple[Any, ...], int]) -> None:
    """Raise the first problem :mod:`streampipe.stages.introspect` finds in the stages' code and options."""
    report = inspect_stages(cfg)
    for name in cfg.stages:
        if (found := stage_problem(cfg, name, report)) is not None:
            loc, field, message = found
            raise ConfigError(message, file=cfg.path, line=_line_of(index, loc), field=field)
    cfg._code = code_of(report)


def code_of(report: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """Each stage's code digest in an :func:`inspect_stages` report (None: not known, e.g. a built-in)."""
    return {name: found.get("code") for name, found in report.items()}


def stage_problem(cfg: PipelineConfig, name: str, report: dict[str, dict[str, Any]]) -> tuple[tuple[Any, ...], str, str] | None:
    """What keeps stage ``name`` from running as configured, by :func:`inspect_stages`'s ``report``:
    ``(its place in the config, that place as a field, the message)``, or None. ``validate`` and
    ``up`` refuse the config for it; ``up --watch`` restarts no stage for it (it keeps its code)."""
    stage, found = cfg.stages[name], report.get(name, {})
    if found.get("problem"):
        return ("stages", name, "type"), f"stages.{name}.type", found["problem"]
    if found.get("kind") == "source" and stage.inputs:
        return ("stages", name, "inputs"), f"stages.{name}.inputs", f"{stage.type} is a source and takes no inputs"
    for i, ref in enumerate(stage.inputs):    # an output nobody sends to would read nothing, silently
        src, _, output = ref.partition(".")
        outputs = report.get(src, {}).get("outputs")
        if output and outputs is not None and output not in outputs:
            close = difflib.get_close_matches(output, outputs, n=1)
            hint = f" (did you mean {src}.{close[0]}?)" if close else ""
            declare = ("a function has only the default output" if report[src].get("kind") == "function"
                       else f"a class declares its named outputs: outputs = ({output!r},)")
            return (("stages", name, "inputs", i), f"stages.{name}.inputs[{i}]",
                    f"stage {src!r} has no output {output!r}{hint}: its outputs are {', '.join(outputs)}; {declare}")
    for key, message in found.get("options", []):
        loc = ("stages", name, "options") + ((key,) if key is not None else ())
        return loc, _field(loc), message
    return None


def inspect_stages(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Run :mod:`streampipe.stages.introspect` in a child process; its report, or {} if it could not answer.

    A child that times out or dies (a user module that hangs or kills its interpreter when
    imported) costs the checks, not the run: the stages then show their problem at start.
    """
    from loguru import logger

    request = {"config_dir": str(cfg.config_dir),
               "stages": {name: {"type": s.type, "options": s.options} for name, s in cfg.stages.items()}}
    try:
        proc = subprocess.run([sys.executable, "-m", "streampipe.stages.introspect"], cwd=cfg.config_dir,
                              input=json.dumps(request, default=str), capture_output=True, text=True,
                              timeout=INSPECT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning(f"stage code not checked: importing it took more than {INSPECT_TIMEOUT_S:g} s")
        return {}
    try:
        report: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    except ValueError:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        logger.warning(f"stage code not checked: the inspecting process exited {proc.returncode}\n{tail}")
        return {}
    return report
