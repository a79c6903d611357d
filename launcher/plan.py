"""What ``streampipe apply`` would change: the diff of two validated :class:`PipelineConfig`.

Pure data, no processes: :func:`make_plan` compares the running config with a changed one and
sorts every difference by what it takes to carry it out live (``kubectl apply``'s dry run,
supervisord's ``reread``):

====================================  =====================================================
change                                how it is applied (launcher/apply.py)
====================================  =====================================================
a stage added                         started downstream-first, like ``up``
a stage removed                       its producers stop sending to it, it drains, it stops
``type``, ``options``, data-plane     rolling restart, replica by replica, each READY
settings (max_batch, linger_ms, hwm,  before the next goes down
max_inflight, ack_timeout)
a stage's outputs (another stage's    rolling restart of the producer with its new edges,
``inputs`` changed)                   after the new consumers run (new edges before old)
``replicas``                          scale (not for a source: its positions are split by
                                      the replica count; down and up repartitions them)
supervisor settings (restart policy,  in place, no restart
backoff, limits, heartbeat / ready
timeouts, stop_grace, spawn, network
names), ``poll_interval``
``delivery``, ``transport``, ...      refused: down and up
====================================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streampipe.launcher.config import PipelineConfig, StageConfig

# a running stage process has these in its spec: it must restart to take them
RESTART_FIELDS = ("type", "options", "max_batch", "linger_ms", "hwm", "max_inflight", "ack_timeout")
# the supervisor's own view of a stage (the stage's copy of heartbeat_timeout and stop_grace,
# used for its edge reachability and its drain, follows at its next restart)
SETTING_FIELDS = ("restart", "spawn", "heartbeat_timeout", "ready_timeout", "stop_grace", "backoff_initial",
                  "backoff_max", "backoff_factor", "min_uptime", "max_restarts", "restart_window", "max_rss_mb",
                  "max_cpu_percent", "limit_for", "address", "port", "ack_port", "bind_host")
# pipeline-wide keys every process was started with, or that name where things live
FIXED_FIELDS = ("pipeline", "delivery", "run_dir", "transport", "bind_host", "advertise_host", "resolve_interval",
                "security", "keys", "max_message_mb", "logging")
LIVE_FIELDS = ("poll_interval",)


Diff = dict[str, tuple[Any, Any]]


@dataclass
class StageChange:
    """What changes on a stage present in both configs."""

    name: str
    restart: Diff = field(default_factory=dict)     # fields that need a rolling restart
    settings: Diff = field(default_factory=dict)    # supervisor settings, applied in place
    replicas: tuple[int, int] | None = None
    inputs: tuple[list[str], list[str]] | None = None
    outputs: tuple[list[str], list[str]] | None = None   # "output>dest" edges it sends on

    @property
    def needs_restart(self) -> bool:
        return bool(self.restart or self.outputs)


@dataclass
class Plan:
    added: list[str] = field(default_factory=list)      # in the new config's start order (downstream first)
    removed: list[str] = field(default_factory=list)    # in stop order (sources first)
    changed: dict[str, StageChange] = field(default_factory=dict)
    pipeline: Diff = field(default_factory=dict)        # live pipeline-wide settings
    refusals: list[str] = field(default_factory=list)
    scaled: dict[str, int] = field(default_factory=dict)    # stage -> its replicas since `streampipe scale` (not the config's)
    recorded: dict[str, int] = field(default_factory=dict)  # of those, the ones the new config now gives that count

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.pipeline or self.recorded)

    def steps(self) -> list[tuple[str, str, str]]:
        """``(kind, stage, what)`` in the order :mod:`streampipe.launcher.apply` carries them out."""
        out: list[tuple[str, str, str]] = []
        for key, (old, new) in self.pipeline.items():
            out.append(("setting", "", f"{key}: {old!r} -> {new!r}"))
        for c in self.changed.values():
            if c.settings:
                out.append(("setting", c.name, ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in c.settings.items())))
        for name in self.added:
            out.append(("add", name, "start (downstream first)"))
        for c in self.changed.values():
            if c.inputs:
                out.append(("inputs", c.name, f"{c.inputs[0]} -> {c.inputs[1]} (acknowledges both while they drain)"))
        for name, n in self.recorded.items():
            out.append(("record", name, f"{n} replicas, as `streampipe scale` set them (no change)"))
        for c in self.changed.values():
            if c.replicas:
                since = f" (back to the file's count: {c.replicas[0]} ran since `streampipe scale`)" if c.name in self.scaled else ""
                out.append(("scale", c.name, f"{c.replicas[0]} -> {c.replicas[1]} replicas{since}"))
        for c in self.changed.values():
            if c.needs_restart:
                why = [f"{k}: {_short(o)} -> {_short(n)}" for k, (o, n) in c.restart.items()]
                if c.outputs:
                    why.append(f"outputs: {c.outputs[0]} -> {c.outputs[1]}")
                out.append(("restart", c.name, "rolling restart: " + "; ".join(why)))
        for name in self.removed:
            out.append(("remove", name, "producers rewired, then drain and stop"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "refusals": self.refusals,
                "steps": [list(s) for s in self.steps()]}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def outputs_of(cfg: PipelineConfig, stage: str) -> list[str]:
    return sorted(e.name for e in cfg.edges() if e.src == stage)


def _diff(old: StageConfig, new: StageConfig, fields: tuple[str, ...]) -> Diff:
    return {f: (getattr(old, f), getattr(new, f)) for f in fields if getattr(old, f) != getattr(new, f)}


def replica_drift(cfg: PipelineConfig, running: dict[str, int]) -> dict[str, dict[str, int]]:
    """The stages whose ``running`` replica count is not the one ``cfg`` says (``streampipe scale``
    changes the running count, not the file): ``{stage: {"running": n, "configured": m}}``.

    >>> from streampipe.launcher.config import PipelineConfig
    >>> cfg = PipelineConfig.model_validate({"stages": {"g": {"type": "generator"},
    ...                                      "n": {"type": "normalizer", "inputs": ["g"]}}})
    >>> replica_drift(cfg, {"g": 1, "n": 3})
    {'n': {'running': 3, 'configured': 1}}
    """
    return {name: {"running": n, "configured": cfg.stages[name].replicas} for name, n in running.items()
            if name in cfg.stages and cfg.stages[name].replicas != n}


def make_plan(old: PipelineConfig, new: PipelineConfig, running: dict[str, int] | None = None) -> Plan:
    """The plan that turns the running ``old`` into ``new``; ``refusals`` say what cannot change live.

    ``running``: each stage's replica count as it runs, where ``streampipe scale`` changed it
    from ``old``'s: ``new`` is compared with that, so applying a file scales such a stage to the
    count the file says (and a file that says the running count records it, with no change).

    >>> from streampipe.launcher.config import PipelineConfig
    >>> old = PipelineConfig.model_validate({"stages": {"g": {"type": "generator"},
    ...                                      "n": {"type": "normalizer", "inputs": ["g"]}}})
    >>> new = PipelineConfig.model_validate({"delivery": "at-most-once", "stages": {"g": {"type": "generator"},
    ...                                      "n": {"type": "normalizer", "inputs": ["g"], "replicas": 2}}})
    >>> plan = make_plan(old, new)
    >>> plan.changed["n"].replicas, plan.refusals
    ((1, 2), ["delivery: 'at-least-once' -> 'at-most-once' cannot change while the pipeline runs: streampipe down, then up"])
    >>> make_plan(old, old, running={"g": 1, "n": 3}).steps()     # `scale n 3`, then apply the unchanged file
    [('scale', 'n', "3 -> 1 replicas (back to the file's count: 3 ran since `streampipe scale`)")]
    """
    plan = Plan()
    drift = replica_drift(old, running or {})
    plan.scaled = {name: d["running"] for name, d in drift.items()}
    for key in FIXED_FIELDS:
        if getattr(old, key) != getattr(new, key):
            plan.refusals.append(f"{key}: {_short(getattr(old, key))} -> {_short(getattr(new, key))} cannot change while "
                                 f"the pipeline runs: streampipe down, then up")
    plan.pipeline = {k: (getattr(old, k), getattr(new, k)) for k in LIVE_FIELDS if getattr(old, k) != getattr(new, k)}
    plan.added = [n for n in new.downstream_first() if n not in old.stages]
    plan.removed = [n for n in reversed(old.downstream_first()) if n not in new.stages]
    for name, now in new.stages.items():
        was = old.stages.get(name)
        if was is None:
            continue
        change = StageChange(name, restart=_diff(was, now, RESTART_FIELDS), settings=_diff(was, now, SETTING_FIELDS))
        replicas = plan.scaled.get(name, was.replicas)
        if replicas != now.replicas:
            change.replicas = (replicas, now.replicas)
        elif name in plan.scaled:
            plan.recorded[name] = replicas
        if sorted(was.inputs) != sorted(now.inputs):
            change.inputs = (list(was.inputs), list(now.inputs))
        if outputs_of(old, name) != outputs_of(new, name):
            change.outputs = (outputs_of(old, name), outputs_of(new, name))
        if old.is_source(name) != new.is_source(name):
            plan.refusals.append(f"stages.{name}.inputs: a stage cannot turn into a source or out of one while it runs: "
                                 f"give it a new name (one stage removed, one added)")
        elif change.replicas and new.is_source(name):
            plan.refusals.append(f"stages.{name}.replicas: {name} is a source and cannot be scaled while it runs "
                                 f"({replicas} -> {now.replicas}): down and up repartitions its saved positions")
        if change.restart or change.settings or change.replicas or change.inputs or change.outputs:
            plan.changed[name] = change
    return plan
