"""``services.yaml`` -> Kubernetes manifests: ``streampipe export kubernetes``.

On Kubernetes the kubelet is the supervisor: it restarts containers, probes them and enforces
their limits, and the scheduler spreads the stages over nodes. Each stage replica is one pod
running ``streampipe run-stage STAGE`` (one process, its probes on ``/healthz`` and
``/readyz``, its metrics on ``/metrics``, JSON-line logs on stdout), and the pods find each other
through headless Services, exactly as ``run-stage`` finds peers by name on any network.

What is written, per pipeline ``demo`` (objects named ``<pipeline>-<stage>`` in RFC 1123 form:
``log_extractor`` -> ``demo-log-extractor``; the real names kept in labels and annotations):

- a ConfigMap ``demo`` holding the ``services.yaml`` the pods run: the user's, with the network
  fields a cluster needs (below), mounted over the image's copy so that stage modules and
  relative input paths beside it still resolve;
- per stage a **StatefulSet** with a volume claim template, its run directory (source
  positions, snapshots, the consumer's output and dedup marks, checkpoints, dead letters);
- per stage a **headless Service** of the same name: for a stage with inputs, the address its
  producers resolve (one A record per ready pod); for every stage, the pods' stable DNS names
  and the ``health`` port a ServiceMonitor scrapes;
- per stage a **NetworkPolicy** admitting data only from its producers, acknowledgements only
  from its consumers, and probes and scrapes on the health port;
- with ``--service-monitor``, one ServiceMonitor (Prometheus Operator) for the pipeline.

A ``serve`` stage is the exception: it is stateless (it emits nothing and keeps nothing; the model
it answers with is the newest checkpoint in the trainer's folder), so it becomes a **Deployment**
of ``replicas`` pods behind a ClusterIP **Service** on its HTTP port (``http``, plus ``health``),
each pod run as replica 0 (``--replica 0``: no ordinal needed, none of its ids reach a
consumer), with an ``emptyDir`` run directory, the trainer's volume mounted read-only for the
checkpoints (and the evaluator's, when there is one on the same checkpoints, for ``GET /model``'s
hold-out scores), and its readiness probe on its own ``/readyz`` (ready once a model serves), so
the Service sends requests only to pods that can answer them. In the pods' ``services.yaml`` it
binds ``0.0.0.0`` on its ``port``; it must have a ``token`` or a ``token_file`` (the port is open
to the cluster), and a ``token_file`` is read from the Secret ``<pipeline>-<stage>-token`` (key
``token``), mounted at :data:`TOKEN_DIR`.

Why no Deployment (but for ``serve``, above): streampipe's wire names every sender by stage *and replica index* (sequence
numbers, acks and a source's share of the ids are per replica), and ``run-stage`` takes the
index from the ordinal at the end of the host name. A Deployment's pods have no stable ordinal
(their random suffix may even end in digits), so two pods could claim one index; a StatefulSet
gives each pod its own ordinal, its own volume, and a stable name. Every stage also keeps dead
letters, which are records the pipeline answers for, so every stage gets a volume.

The ``services.yaml`` in the ConfigMap is rewritten, with a comment at its top listing every
change, rather than refused when the user's file lacks network fields: the export owns the
cluster's addresses (the Service names), ports and the pod IP, and a user should not have to
hand-edit a file for it. Changed: ``transport: tcp``; ``bind_host: 0.0.0.0`` (per-stage
``bind_host`` removed); ``advertise_host`` removed (each pod advertises its IP, from the downward
API in ``STREAMPIPE_ADVERTISE_HOST``); per stage with inputs ``address`` (the Service name) and
``port`` (the user's, else :data:`DATA_PORT`); per stage with consumers a fixed ``ack_port`` (the
user's, else :data:`ACK_PORT`) so that NetworkPolicies can name it; with ``security: curve``,
``keys`` (the Secret's mount); an evaluator's, a predictor's and a serve stage's ``checkpoint_dir``
(the trainer's volume, read-only); a serve stage's ``host``, ``port``, ``token_file`` and ``metrics``.

What cannot map honestly is refused (:class:`ConfigError`, exit 2, with the line): ``restart:
never`` or ``on-failure`` (Deployments and StatefulSets only restart), a log extractor (it reads
a run directory's log files, which no pod shares; leave it out with ``--without``), absolute
output paths (outside the pod's volume), an evaluator (predictor, serve) reading a trainer of several
replicas, a predictor's ``shadow_dir`` (a second trainer's volume), a serve stage without a token or
on port 0, and names that cannot become Kubernetes names. Settings the kubelet handles its own way are kept and
reported as notes (restart backoff and intensity, ``max_cpu_percent`` throttles rather than
restarts, ``spawn``).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streampipe.launcher.config import Defaults, PipelineConfig, _line_index, _line_of
from streampipe.launcher.errors import ConfigError
from streampipe.launcher.exportdir import write_export
from streampipe.launcher.runstage import run_stage_args

# -- where things are inside a pod (the Dockerfile at the repository's root lays the image out so) --
PIPELINE_DIR = "/pipeline"                 # the image's pipeline folder: services.yaml and the stage modules
CONFIG_PATH = f"{PIPELINE_DIR}/services.yaml"
CLAIM_DIR = "/var/lib/streampipe"          # the pod's volume claim
# the run directory one level down: a claim's root belongs to root (the pod's user writes there
# through fsGroup only), and the run directory is the stage's own, to create and chmod 0700
RUN_DIR = f"{CLAIM_DIR}/run"
PEERS_DIR = "/var/lib/streampipe-peers"    # another stage's volume, read-only (the evaluator reads the trainer's)
KEYS_DIR = "/etc/streampipe/keys"          # the CURVE key Secret
TOKEN_DIR = "/etc/streampipe/token"        # a serve stage's token Secret (key ``token``)
RUN_AS = 10001                             # the image's non-root user and group (Dockerfile: USER 10001:10001)

# -- ports: fixed, so that Services and NetworkPolicies can name them ----------------------------------
DATA_PORT = 5555                           # a stage's input, unless services.yaml gives its port
ACK_PORT = 5556                            # a sender's acknowledgement socket, unless services.yaml gives ack_port
HEALTH_PORT = 9464                         # run-stage --health-port: /healthz, /readyz, /metrics

# -- probes ----------------------------------------------------------------------------------------
# /healthz itself turns 503 once the processing loop has been silent for heartbeat_timeout, so the
# probe only needs to notice: two misses 5 s apart tolerate one slow answer on a loaded node, and a
# hung stage is restarted heartbeat_timeout + ~10 s after its last beat.
LIVENESS_PERIOD_S = 5
LIVENESS_FAILURES = 2
READINESS_PERIOD_S = 2                     # a restarted receiver is back in its Service's DNS within ~2 s
PROBE_TIMEOUT_S = 5                        # the health server is a thread of a busy Python process
# The startup probe holds liveness off until /readyz answers, and gives up after the stage's
# ready_timeout, as the local supervisor does for a stage that never reports READY.
STARTUP_PERIOD_S = 2

# stages that read a trainer's checkpoint folder (option ``checkpoint_dir``): its volume is mounted in their pods
READS_CHECKPOINTS = ("evaluator", "predictor", "serve")
STATELESS = ("serve",)                     # a Deployment behind a ClusterIP Service, not a StatefulSet

STORAGE = "1Gi"                            # per pod run directory, unless --storage says otherwise
SERVICE_MONITOR_INTERVAL = "15s"           # Prometheus Operator's usual scrape interval
# a DNS label is 63 characters; a StatefulSet's pods carry a controller-revision-hash label of
# its name plus 11 characters, which must fit in 63 too
MAX_NAME = 52
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
STORAGE_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$")   # a Kubernetes quantity, as a volume size is written

# restart and liveness settings the kubelet replaces with its own (noted when a user changed them)
KUBELET_OWNS = {
    "backoff_initial": "the kubelet's restart backoff is its own (10 s doubling to 5 min)",
    "backoff_max": "the kubelet's restart backoff is its own (10 s doubling to 5 min)",
    "backoff_factor": "the kubelet's restart backoff is its own (10 s doubling to 5 min)",
    "min_uptime": "the kubelet resets its backoff after 10 min of uptime",
    "max_restarts": "the kubelet never gives up: a crash-looping pod shows CrashLoopBackOff instead of failed",
    "restart_window": "the kubelet never gives up: a crash-looping pod shows CrashLoopBackOff instead of failed",
    "limit_for": "a container over its memory limit is OOM-killed at once, not after limit_for",
    "spawn": "each container starts a fresh interpreter (there is no fork server)",
}


@dataclass(frozen=True)
class StagePlan:
    """One stage as it lands on the cluster: its object name, ports and neighbours."""

    name: str                       # the stage's name in services.yaml
    object_name: str                # <pipeline>-<stage>, RFC 1123
    port: int | None                # its data input (stages with inputs)
    ack_port: int | None            # its acknowledgement socket (stages with consumers)
    producers: tuple[str, ...]      # stages it reads from
    consumers: tuple[str, ...]      # stages that read from it
    reads_checkpoints_of: str | None = None   # the evaluator: the trainer whose volume it mounts
    http_port: int | None = None    # a serve stage: the port its Service forwards requests to
    reads_metrics_of: str | None = None       # a serve stage: the evaluator whose metrics.jsonl it reads
    stateless: bool = False         # a Deployment (serve), not a StatefulSet

    def claim_of(self) -> str:
        """The volume claim of this stage's first pod (a StatefulSet's ``data-<name>-0``)."""
        return f"data-{self.object_name}-0"


@dataclass
class Export:
    """The manifests (one dict per object, in apply order) and notes for the user."""

    objects: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    pod_config: str = ""            # the services.yaml in the ConfigMap


def dns_label(text: str) -> str:
    """A name as an RFC 1123 label: lower case, each run of other characters one '-', trimmed.

    >>> dns_label("log_extractor"), dns_label("My Pipeline!"), dns_label("__x__")
    ('log-extractor', 'my-pipeline', 'x')
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Source:
    """The user's file as text: line numbers for errors, and the raw mapping to rewrite."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.path = cfg.path
        self.text = cfg.path.read_text()
        self.raw: dict[str, Any] = yaml.safe_load(self.text)
        node = yaml.compose(self.text, Loader=yaml.SafeLoader)
        assert node is not None, "load_config read this file as a mapping"
        self.index = _line_index(node)

    def fail(self, message: str, *loc: Any) -> ConfigError:
        return ConfigError(message, file=self.path, line=_line_of(self.index, loc), field=".".join(map(str, loc)))

    def stage_key(self, stage: str, key: str) -> tuple[str, ...]:
        """Where a stage's supervisor key is set: on the stage, else in ``defaults``."""
        spec = (self.raw.get("stages") or {}).get(stage) or {}
        if key in spec or key not in (self.raw.get("defaults") or {}):
            return ("stages", stage, key)
        return ("defaults", key)


def export(cfg: PipelineConfig, *, image: str, namespace: str | None = None, service_monitor: bool = False,
           without: Iterable[str] = (), storage: str = STORAGE) -> Export:
    """Every object that runs ``cfg`` on Kubernetes; raise :class:`ConfigError` for what cannot map."""
    src = Source(cfg)
    notes: list[str] = []
    stages = kept_stages(cfg, src, set(without), notes)
    pipeline = _pipeline_name(cfg, src)
    plans = _plan(cfg, src, stages, pipeline)
    _refuse(cfg, src, plans)
    notes += _kubelet_notes(cfg, plans)
    notes += _serve_notes(cfg, plans, pipeline)
    if cfg.security != "curve":
        notes.append("security: none: the data and ack sockets are plaintext inside the cluster; the NetworkPolicies "
                     "admit only each stage's neighbours, and `security: curve` (README, 'Running on Kubernetes') encrypts them")
    pod_config = _pod_config(cfg, src, plans, pipeline, without=sorted(set(cfg.stages) - set(stages)))
    digest = hashlib.sha256(pod_config.encode()).hexdigest()
    meta = _Meta(cfg, pipeline, namespace)
    objects: list[dict[str, Any]] = [meta.object("v1", "ConfigMap", pipeline, None, data={"services.yaml": pod_config})]
    for plan in plans.values():
        objects.append(_service(meta, plan))
    for plan in plans.values():
        if plan.stateless:
            objects.append(_deployment(cfg, meta, plan, plans, image=image, digest=digest))
        else:
            objects.append(_statefulset(cfg, meta, plan, plans, image=image, digest=digest, storage=storage))
    for plan in plans.values():
        objects.append(_network_policy(meta, plan, plans))
    if service_monitor:
        objects.append(_service_monitor(meta))
    return Export(objects, notes, pod_config)


# -- checks and plan -------------------------------------------------------------------------------

def kept_stages(cfg: PipelineConfig, src: Source, without: set[str], notes: list[str]) -> list[str]:
    unknown = sorted(without - set(cfg.stages))
    if unknown:
        raise ConfigError(f"--without {unknown[0]}: no such stage (stages: {', '.join(cfg.stages)})", file=cfg.path)
    for name in cfg.stages:
        for ref in cfg.stages[name].inputs if name not in without else ():
            if ref.partition(".")[0] in without:
                raise src.fail(f"reads {ref!r}, which --without leaves out: leave {name!r} out too, or keep both",
                               "stages", name, "inputs")
    for name in sorted(without):
        notes.append(f"stage {name!r} left out (--without)")
    kept = [n for n in cfg.stages if n not in without]
    if not kept:
        raise ConfigError("--without leaves no stage to run", file=cfg.path)
    return kept


def _pipeline_name(cfg: PipelineConfig, src: Source) -> str:
    name = dns_label(cfg.pipeline)
    if not name or not name[0].isalpha():
        raise src.fail(f"the pipeline's name begins every Kubernetes object's name, which must start with a letter "
                       f"({cfg.pipeline!r} gives {name!r}): rename it", "pipeline")
    return name


def _plan(cfg: PipelineConfig, src: Source, stages: list[str], pipeline: str) -> dict[str, StagePlan]:
    producers: dict[str, list[str]] = {n: [] for n in stages}
    consumers: dict[str, list[str]] = {n: [] for n in stages}
    for edge in cfg.edges():
        if edge.dest in producers and edge.src not in producers[edge.dest]:
            producers[edge.dest].append(edge.src)
            consumers[edge.src].append(edge.dest)
    taken: dict[str, str] = {}
    plans: dict[str, StagePlan] = {}
    for name in stages:
        stage = cfg.stages[name]
        if not LABEL_VALUE.match(name):
            raise src.fail("on Kubernetes a stage's name starts and ends with a letter or a digit", "stages", name)
        obj = f"{pipeline}-{dns_label(name)}"
        if obj in taken:
            raise src.fail(f"stages {taken[obj]!r} and {name!r} both become {obj!r} on Kubernetes: rename one", "stages", name)
        if len(obj) > MAX_NAME:
            raise src.fail(f"{obj!r} is {len(obj)} characters; a StatefulSet's name may have {MAX_NAME}: "
                           "shorten the pipeline's or the stage's name", "stages", name)
        taken[obj] = name
        port = (stage.port or DATA_PORT) if producers[name] else None
        ack = None
        if consumers[name]:
            ack = stage.ack_port or (ACK_PORT if port != ACK_PORT else ACK_PORT + 1)
        if HEALTH_PORT in (port, ack) or (port is not None and port == ack):
            raise src.fail(f"ports must differ: data {port}, ack {ack}, health {HEALTH_PORT}", "stages", name, "port")
        trainer = _trainer_of(cfg, src, name, stages)
        http_port = _http_port(cfg, src, name) if stage.type in STATELESS else None
        plans[name] = StagePlan(name, obj, port, ack, tuple(producers[name]), tuple(consumers[name]), trainer,
                                http_port, _evaluator_of(cfg, name, stages) if http_port else None,
                                stage.type in STATELESS)
    return plans


def _http_port(cfg: PipelineConfig, src: Source, name: str) -> int:
    """A serve stage's port, which its Service names: fixed, and not the health port."""
    port = int(_option(cfg, name, "port"))
    where = ("stages", name, "options", "port")
    if port == 0:
        raise src.fail("port 0 (any free port) cannot be named by a Service: give the serve stage a fixed port", *where)
    if port == HEALTH_PORT:
        raise src.fail(f"port {port} is the health port of every pod: give the serve stage another", *where)
    return port


def _evaluator_of(cfg: PipelineConfig, name: str, stages: list[str]) -> str | None:
    """The evaluator whose metrics file a serve stage reads for ``GET /model`` (same checkpoints and file), if any."""
    for other in stages:
        if (cfg.stages[other].type == "evaluator"
                and _option(cfg, other, "checkpoint_dir") == _option(cfg, name, "checkpoint_dir")
                and _option(cfg, other, "output") == _option(cfg, name, "metrics")):
            return other
    return None


def _trainer_of(cfg: PipelineConfig, src: Source, name: str, stages: list[str]) -> str | None:
    """The trainer whose checkpoints an evaluator, a predictor or a serve stage reads (same ``checkpoint_dir``), if any."""
    if cfg.stages[name].type not in READS_CHECKPOINTS:
        return None
    wanted = _option(cfg, name, "checkpoint_dir")
    for other in stages:
        if cfg.stages[other].type == "trainer" and _option(cfg, other, "checkpoint_dir") == wanted:
            if cfg.stages[other].replicas > 1:
                raise src.fail(f"the {cfg.stages[name].type} {name!r} reads the checkpoints of {other!r}, which has {cfg.stages[other].replicas} "
                               "replicas; on Kubernetes each replica writes its own volume: set replicas: 1",
                               *src.stage_key(other, "replicas"))
            return other
    return None


def _option(cfg: PipelineConfig, stage: str, key: str) -> Any:
    """A built-in stage's option as it will run: the config's value, else its ``__init__`` default."""
    from streampipe.stages.registry import load_target

    options = cfg.stages[stage].options
    if key in options:
        return options[key]
    return inspect.signature(load_target(cfg.stages[stage].type)).parameters[key].default


# options of built-in stages that name a file or folder they write, relative to the run directory
WRITTEN_PATHS = {"consumer": ("output",), "trainer": ("checkpoint_dir",), "evaluator": ("checkpoint_dir", "output")}


def _refuse(cfg: PipelineConfig, src: Source, plans: dict[str, StagePlan]) -> None:
    for name in plans:
        stage = cfg.stages[name]
        if stage.restart != "always":
            raise src.fail(f"restart: {stage.restart} cannot hold on Kubernetes: the kubelet restarts every container of a "
                           "StatefulSet that exits (restartPolicy: Always). Use restart: always (a completed finite source "
                           "stays up, idle, so its stream is not sent twice), or keep this pipeline on `streampipe up`, "
                           "whose supervisor honours it", *src.stage_key(name, "restart"))
        if stage.type == "log_extractor":
            raise src.fail("the log extractor reads the log files of a run directory; on Kubernetes each stage logs to its "
                           "pod's stdout (kubectl logs, the cluster's log collector) and has a volume of its own, so it "
                           f"would see nothing: leave it out with --without {name}", "stages", name, "type")
        if stage.type == "predictor" and stage.options.get("shadow_dir") is not None:
            raise src.fail("a shadow_dir is a second trainer's folder, on its own volume, which the export does not mount: "
                           "use pinned (a version of the same trainer), or run the comparison on `streampipe up`",
                           "stages", name, "options", "shadow_dir")
        if stage.type in STATELESS and stage.options.get("token") is None and stage.options.get("token_file") is None:
            raise src.fail("on Kubernetes the serve stage listens on its pod's IP, which every pod of the cluster reaches "
                           f"through its Service: set token_file (read from the Secret {plans[name].object_name}-token, "
                           "key token) or token", "stages", name, "options" if stage.options else "type")
        for key in WRITTEN_PATHS.get(stage.type, ()):
            if key in stage.options and Path(str(stage.options[key])).is_absolute():
                raise src.fail(f"{stage.options[key]!r} is outside the pod's volume (its run directory, {RUN_DIR}): "
                               "use a path relative to the run directory", "stages", name, "options", key)


def _kubelet_notes(cfg: PipelineConfig, plans: dict[str, StagePlan]) -> list[str]:
    notes = []
    defaults = Defaults()
    for name in plans:
        stage = cfg.stages[name]
        changed = [k for k in KUBELET_OWNS if getattr(stage, k) != getattr(defaults, k)]
        for reason in dict.fromkeys(KUBELET_OWNS[k] for k in changed):
            keys = ", ".join(k for k in changed if KUBELET_OWNS[k] == reason)
            notes.append(f"stage {name!r}: {keys} not applied: {reason}")
        if stage.max_cpu_percent is not None:
            notes.append(f"stage {name!r}: max_cpu_percent becomes a CPU limit: the kernel throttles the pod at "
                         f"{stage.max_cpu_percent:g} % instead of restarting it")
    return notes


def _serve_notes(cfg: PipelineConfig, plans: dict[str, StagePlan], pipeline: str) -> list[str]:
    notes = []
    for plan in plans.values():
        if plan.http_port is None:
            continue
        name, stage = plan.name, cfg.stages[plan.name]
        notes.append(f"stage {name!r}: a Deployment of {stage.replicas} pod{'s' if stage.replicas > 1 else ''} behind the "
                     f"Service {plan.object_name}:{plan.http_port} (POST /predict, GET /model)")
        if plan.reads_checkpoints_of is not None:
            notes.append(f"stage {name!r}: its pods run on the node of {plan.reads_checkpoints_of!r}, whose ReadWriteOnce "
                         "volume holds the checkpoints they serve")
        if stage.options.get("token") is not None:
            notes.append(f"stage {name!r}: its token is in the ConfigMap {pipeline!r} in clear: "
                         f"token_file reads it from the Secret {plan.object_name}-token instead")
    return notes


# -- the services.yaml the pods run ---------------------------------------------------------------

def _pod_config(cfg: PipelineConfig, src: Source, plans: dict[str, StagePlan], pipeline: str, without: list[str]) -> str:
    data = _network_first(copy.deepcopy(src.raw))
    changes: list[str] = []

    def put(where: dict[str, Any], key: str, value: Any, label: str, why: str = "") -> None:
        if where.get(key) != value:
            was = f" (was {where[key]!r})" if key in where else ""
            changes.append(f"{label}: {value}{was}" + (f" ({why})" if why else ""))
            where[key] = value

    put(data, "transport", "tcp", "transport", "pods reach each other over the network")
    put(data, "bind_host", "0.0.0.0", "bind_host", "each pod listens on its own IP")
    if data.pop("advertise_host", None) is not None:
        changes.append("advertise_host removed (each pod advertises its IP: STREAMPIPE_ADVERTISE_HOST, from the downward API)")
    if cfg.security == "curve":
        put(data, "keys", KEYS_DIR, "keys", f"the Secret {pipeline}-keys, mounted")
    for name in without:
        del data["stages"][name]
        changes.append(f"stages.{name} removed (--without)")
    for name, plan in plans.items():
        spec = data["stages"][name]
        where = f"stages.{name}"
        if spec.pop("bind_host", None) is not None:
            changes.append(f"{where}.bind_host removed (the pipeline's bind_host applies)")
        if plan.port is not None:
            put(spec, "address", plan.object_name, f"{where}.address", "its headless Service")
            put(spec, "port", plan.port, f"{where}.port")
        if plan.ack_port is not None:
            put(spec, "ack_port", plan.ack_port, f"{where}.ack_port", "fixed, for its NetworkPolicy")
        if plan.reads_checkpoints_of is not None:
            trainer = plans[plan.reads_checkpoints_of]
            put(spec.setdefault("options", {}), "checkpoint_dir", _peer_path(cfg, trainer, "checkpoint_dir"),
                f"{where}.options.checkpoint_dir", f"the volume of {trainer.name!r}, read-only")
        if plan.http_port is not None:
            options = spec.setdefault("options", {})
            put(options, "host", "0.0.0.0", f"{where}.options.host", "its Service forwards to the pod's IP")
            put(options, "port", plan.http_port, f"{where}.options.port")
            if options.get("token_file") is not None:
                put(options, "token_file", f"{TOKEN_DIR}/token", f"{where}.options.token_file",
                    f"the Secret {plan.object_name}-token, mounted")
            if plan.reads_metrics_of is not None:
                evaluator = plans[plan.reads_metrics_of]
                put(options, "metrics", _peer_path(cfg, evaluator, "output"), f"{where}.options.metrics",
                    f"the volume of {evaluator.name!r}, read-only")
    header = [f"# services.yaml of pipeline {cfg.pipeline!r} for its pods, written by `streampipe export kubernetes`",
              f"# from {cfg.path.name}. Changed so that its stages reach each other across pods (nothing else differs;",
              "# the original's comments are not kept). Edit the original and export again rather than this copy.",
              *[f"#   {line}" for line in changes], ""]
    return "\n".join(header) + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _peer_path(cfg: PipelineConfig, peer: StagePlan, option: str) -> str:
    """Where a path another stage writes (relative to its run directory) is, in the pods that mount its volume."""
    run_dir = Path(RUN_DIR).relative_to(CLAIM_DIR)   # where a stage's run directory sits in its claim
    return f"{PEERS_DIR}/{peer.object_name}/{run_dir}/{_option(cfg, peer.name, option)}"


def _network_first(data: dict[str, Any]) -> dict[str, Any]:
    """The top-level network keys right after ``pipeline`` and ``delivery``, where a reader looks."""
    head = [k for k in ("pipeline", "delivery") if k in data]
    out: dict[str, Any] = {k: data.pop(k) for k in head}
    out.update({key: data.pop(key, PipelineConfig.model_fields[key].default) for key in ("transport", "bind_host")})
    out.update(data)
    return out


# -- objects ---------------------------------------------------------------------------------------

class _Meta:
    """Names, labels and namespace shared by every object of the pipeline."""

    def __init__(self, cfg: PipelineConfig, pipeline: str, namespace: str | None) -> None:
        from streampipe import __version__

        self.cfg, self.pipeline, self.namespace = cfg, pipeline, namespace
        self.common = {"app.kubernetes.io/name": "streampipe", "app.kubernetes.io/instance": pipeline,
                       "app.kubernetes.io/managed-by": "streampipe"}
        if LABEL_VALUE.match(__version__):
            self.common["app.kubernetes.io/version"] = __version__
        if LABEL_VALUE.match(cfg.pipeline) and len(cfg.pipeline) <= 63:
            self.common["streampipe/pipeline"] = cfg.pipeline

    def selector(self, plan: StagePlan) -> dict[str, str]:
        """The labels that pick a stage's pods: stable, as a StatefulSet's selector cannot change."""
        return {"app.kubernetes.io/name": "streampipe", "app.kubernetes.io/instance": self.pipeline,
                "app.kubernetes.io/component": plan.object_name.removeprefix(self.pipeline + "-")}

    def labels(self, plan: StagePlan | None) -> dict[str, str]:
        if plan is None:
            return dict(self.common)
        return {**self.common, **self.selector(plan), "streampipe/stage": plan.name}

    def object(self, api: str, kind: str, name: str, plan: StagePlan | None, **body: Any) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name}
        if self.namespace:
            metadata["namespace"] = self.namespace
        metadata["labels"] = self.labels(plan)
        annotations = {"streampipe/pipeline": self.cfg.pipeline}
        if plan is not None:
            annotations["streampipe/stage"] = plan.name
        metadata["annotations"] = annotations
        return {"apiVersion": api, "kind": kind, "metadata": metadata, **body}


def _service(meta: _Meta, plan: StagePlan) -> dict[str, Any]:
    """Headless: its DNS name answers with one A record per ready pod, which producers connect to.

    A serve stage's is a ClusterIP Service instead: one address that spreads requests over its ready pods."""
    ports = [{"name": "data", "port": plan.port, "targetPort": "data", "protocol": "TCP"}] if plan.port else []
    if plan.http_port is not None:
        ports.append({"name": "http", "port": plan.http_port, "targetPort": "http", "protocol": "TCP"})
    ports.append({"name": "health", "port": HEALTH_PORT, "targetPort": "health", "protocol": "TCP"})
    if plan.stateless:
        return meta.object("v1", "Service", plan.object_name, plan, spec={
            "type": "ClusterIP", "selector": meta.selector(plan), "ports": ports})
    return meta.object("v1", "Service", plan.object_name, plan, spec={
        "clusterIP": "None", "selector": meta.selector(plan), "ports": ports,
        # only ready pods are resolved: a producer never pushes to a receiver whose input is not bound yet
        "publishNotReadyAddresses": False})


def _statefulset(cfg: PipelineConfig, meta: _Meta, plan: StagePlan, plans: dict[str, StagePlan], *, image: str,
                 digest: str, storage: str) -> dict[str, Any]:
    template = _pod_template(cfg, meta, plan, plans, image=image, digest=digest)
    # a StatefulSet's claim templates cannot change once applied: only the stable selector labels here
    claim = {"metadata": {"name": "data", "labels": meta.selector(plan)},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}}}
    return meta.object("apps/v1", "StatefulSet", plan.object_name, plan, spec={
        "serviceName": plan.object_name,
        "replicas": cfg.stages[plan.name].replicas,
        # start and stop pods together: stages tolerate absent peers (backpressure), ordering would only be slower
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": meta.selector(plan)},
        "template": template,
        "volumeClaimTemplates": [claim],
    })


def _deployment(cfg: PipelineConfig, meta: _Meta, plan: StagePlan, plans: dict[str, StagePlan], *, image: str,
                digest: str) -> dict[str, Any]:
    """A stateless stage (serve): interchangeable pods, its run directory an ``emptyDir``."""
    template = _pod_template(cfg, meta, plan, plans, image=image, digest=digest)
    template["spec"]["volumes"].append({"name": "data", "emptyDir": {}})
    return meta.object("apps/v1", "Deployment", plan.object_name, plan, spec={
        "replicas": cfg.stages[plan.name].replicas,
        "selector": {"matchLabels": meta.selector(plan)},
        # a new pod is ready (a model serves) before an old one goes: a rollout never answers with fewer pods
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": template,
    })


def _pod_template(cfg: PipelineConfig, meta: _Meta, plan: StagePlan, plans: dict[str, StagePlan], *, image: str,
                  digest: str) -> dict[str, Any]:
    stage = cfg.stages[plan.name]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_PATH, "subPath": "services.yaml", "readOnly": True},
        {"name": "data", "mountPath": CLAIM_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": meta.pipeline}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if cfg.security == "curve":
        mounts.append({"name": "keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append({"name": "keys", "secret": {"secretName": f"{meta.pipeline}-keys", "defaultMode": 0o440}})
    if plan.http_port is not None and stage.options.get("token_file") is not None:
        mounts.append({"name": "token", "mountPath": TOKEN_DIR, "readOnly": True})
        volumes.append({"name": "token", "secret": {"secretName": f"{plan.object_name}-token", "defaultMode": 0o440,
                                                    "items": [{"key": "token", "path": "token"}]}})
    affinity = None
    if plan.reads_checkpoints_of is not None:
        trainer = plans[plan.reads_checkpoints_of]
        mounts.append({"name": "trainer", "mountPath": f"{PEERS_DIR}/{trainer.object_name}", "readOnly": True})
        volumes.append({"name": "trainer", "persistentVolumeClaim": {"claimName": trainer.claim_of(), "readOnly": True}})
        # a ReadWriteOnce volume is shared only between pods on one node: run beside the trainer
        affinity = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": meta.selector(trainer)}, "topologyKey": "kubernetes.io/hostname"}]}}
    if plan.reads_metrics_of is not None:     # the evaluator runs beside the trainer too (its own affinity)
        evaluator = plans[plan.reads_metrics_of]
        mounts.append({"name": "evaluator", "mountPath": f"{PEERS_DIR}/{evaluator.object_name}", "readOnly": True})
        volumes.append({"name": "evaluator", "persistentVolumeClaim": {"claimName": evaluator.claim_of(), "readOnly": True}})
    ports = [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
    if plan.http_port is not None:
        ports.insert(0, {"name": "http", "containerPort": plan.http_port, "protocol": "TCP"})
    if plan.port is not None:
        ports.insert(0, {"name": "data", "containerPort": plan.port, "protocol": "TCP"})
    if plan.ack_port is not None:
        ports.insert(len(ports) - 1, {"name": "ack", "containerPort": plan.ack_port, "protocol": "TCP"})
    # a Deployment's pods have no ordinal: each is a whole serve stage (--replica 0); a StatefulSet's have no
    # --replica: run-stage takes the ordinal at the end of the pod's host name (demo-normalizer-1 -> 1)
    args = run_stage_args(plan.name, config=CONFIG_PATH, run_dir=RUN_DIR, replica=0 if plan.stateless else None,
                          health_port=HEALTH_PORT)
    container: dict[str, Any] = {
        "name": "stage",
        "image": image,
        "command": ["streampipe"],
        "args": args,
        "env": [
            {"name": "STREAMPIPE_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": ports,
        "startupProbe": _probe("/readyz", STARTUP_PERIOD_S, max(1, math.ceil(stage.ready_timeout / STARTUP_PERIOD_S))),
        "livenessProbe": _probe("/healthz", LIVENESS_PERIOD_S, LIVENESS_FAILURES),
        # a serve pod is ready once a model serves (its own /readyz, no token needed): until then its Service skips it
        "readinessProbe": _probe("/readyz", READINESS_PERIOD_S, 1, port="http" if plan.http_port else "health"),
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    limits = {}
    if stage.max_rss_mb is not None:
        limits["memory"] = f"{math.ceil(stage.max_rss_mb)}Mi"
    if stage.max_cpu_percent is not None:
        limits["cpu"] = f"{math.ceil(stage.max_cpu_percent * 10)}m"   # 100 % = one core = 1000m
    if limits:
        container["resources"] = {"limits": limits}   # requests default to the limits
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": math.ceil(stage.stop_grace),
        # fsGroup makes the claim writable by the non-root user; OnRootMismatch skips the recursive chown on restarts
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if affinity:
        pod_spec["affinity"] = affinity
    return {
        "metadata": {
            "labels": meta.labels(plan),
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(HEALTH_PORT),
                            "prometheus.io/path": "/metrics",
                            # a changed services.yaml changes the template, so `kubectl apply` rolls the pods
                            "streampipe/config-sha256": digest},
        },
        "spec": pod_spec,
    }


def _probe(path: str, period: int, failures: int, port: str = "health") -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": PROBE_TIMEOUT_S}


def _network_policy(meta: _Meta, plan: StagePlan, plans: dict[str, StagePlan]) -> dict[str, Any]:
    """Data only from the producers, acks only from the consumers, the health port from anywhere."""
    def peers(names: Iterable[str]) -> list[dict[str, Any]]:
        return [{"podSelector": {"matchLabels": meta.selector(plans[n])}} for n in names]

    ingress: list[dict[str, Any]] = []
    if plan.port is not None:
        ingress.append({"from": peers(plan.producers), "ports": [{"protocol": "TCP", "port": plan.port}]})
    if plan.ack_port is not None:
        ingress.append({"from": peers(plan.consumers), "ports": [{"protocol": "TCP", "port": plan.ack_port}]})
    if plan.http_port is not None:   # requests come from the pipeline's clients, wherever they run (the token admits them)
        ingress.append({"ports": [{"protocol": "TCP", "port": plan.http_port}]})
    # probes come from the kubelet and scrapes from Prometheus, wherever they run: no peer restriction
    ingress.append({"ports": [{"protocol": "TCP", "port": HEALTH_PORT}]})
    return meta.object("networking.k8s.io/v1", "NetworkPolicy", plan.object_name, plan, spec={
        "podSelector": {"matchLabels": meta.selector(plan)}, "policyTypes": ["Ingress"], "ingress": ingress})


def _service_monitor(meta: _Meta) -> dict[str, Any]:
    """Prometheus Operator: scrape every stage's pods through their Services' ``health`` port."""
    selector = {"app.kubernetes.io/name": "streampipe", "app.kubernetes.io/instance": meta.pipeline}
    return meta.object("monitoring.coreos.com/v1", "ServiceMonitor", meta.pipeline, None, spec={
        "selector": {"matchLabels": selector},
        "endpoints": [{"port": "health", "path": "/metrics", "interval": SERVICE_MONITOR_INTERVAL}]})


# -- output ----------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line text (the ConfigMap's services.yaml), and no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def manifest_stream(objects: list[dict[str, Any]]) -> str:
    """One multi-document YAML stream, for ``kubectl apply -f -``."""
    return "".join(f"---\n{to_yaml(obj)}" for obj in objects)


def file_name(index: int, obj: dict[str, Any]) -> str:
    """``03-statefulset-demo-normalizer.yaml``: ``kubectl apply -f DIR`` takes files in name order."""
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


MANAGED = "app.kubernetes.io/managed-by: streampipe"   # in every file written, so an earlier export's are known


def write_manifests(objects: list[dict[str, Any]], folder: Path) -> tuple[list[Path], list[Path]]:
    """One file per object in ``folder`` (created); returns the paths written and the stale ones
    removed (an earlier export's file this one does not write: ``kubectl apply -f DIR`` would bring it back)."""
    return write_export(folder, {file_name(i, obj): to_yaml(obj) for i, obj in enumerate(objects)},
                        "[0-9][0-9]-*.yaml", MANAGED)
