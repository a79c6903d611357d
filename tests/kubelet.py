"""A small kubelet for tests: runs the pods of Kubernetes manifests on network-namespace hosts.

:class:`Cluster` takes manifests as ``kubectl apply`` would (ConfigMaps, Secrets, Services,
StatefulSets; NetworkPolicies are accepted and not enforced) and plays the parts of a cluster a
pipeline meets, on the test hosts of :mod:`tests.netns`:

- the **StatefulSet controller**: pods ``<name>-0 .. <name>-<replicas-1>`` started together
  (``podManagementPolicy: Parallel``), one more or one fewer on :meth:`Cluster.scale`, each with
  its claims from ``volumeClaimTemplates`` (a folder per claim, ``data-<pod>``, kept when the pod
  goes, as a StatefulSet keeps its claims);
- the **kubelet**: per pod a host (a network namespace, so a pod IP) named as the pod, and its one
  container started by :mod:`tests.podinit` with the pod's name as host name, the image's root and
  environment, the container's ``env`` (downward API filled in: pod IP, name, namespace), its
  volumes mounted at their paths (ConfigMap and Secret projected as the kubelet writes them,
  ``emptyDir``, claims; ``fsGroup`` applied), ``readOnlyRootFilesystem``, the user and groups of
  the security contexts; startup, liveness and readiness probes over HTTP at their declared
  periods, timeouts and thresholds, from the node's network (a host of its own); a container that
  exits, or fails its liveness or startup probe (SIGTERM, ``terminationGracePeriodSeconds``, then
  SIGKILL), is restarted in the same pod (``restartPolicy: Always``), with a back-off;
- the **endpoints controller and cluster DNS**: a headless Service's names (``svc``, ``svc.ns``,
  ``svc.ns.svc.cluster.local``) resolve to its ready pods' IPs, and a ready StatefulSet pod's
  ``<pod>.<svc>.<ns>.svc.cluster.local`` to its own, through every host's hosts file.

What it leaves out, each by name: scheduling (one node: pod affinity holds trivially), resource
limits, seccomp profiles, NetworkPolicies, images (the image's files come from the machine and a
folder; see :class:`Image`). A manifest field it does not know fails the test rather than being
ignored, so a new field in the export gets a decision here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import netns
from tests.netns import Hosts
from tests.netstages import http_get

PODINIT = Path(__file__).with_name("podinit.py")
CLUSTER_DOMAIN = "cluster.local"
NODE = "node"                       # the host the kubelet probes from, as from its node
# The kubelet's restart back-off is 10 s doubling to 5 min after the first restart (which is
# immediate); a tenth of it here, so that a test waits seconds rather than minutes.
BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
EXIT_POLL_S = 0.05                  # how soon a container's exit is seen (a kubelet learns it from the runtime's events)
LOG_TAIL_CHARS = 1500               # of a container's log in describe(): a traceback's end
EVENTS_SHOWN = 6                    # a pod's latest events in describe(): a crash loop repeats itself

# what this kubelet knows of a manifest; anything else fails the test (see the module's docstring)
POD_FIELDS = {"containers", "volumes", "securityContext", "terminationGracePeriodSeconds", "affinity", "restartPolicy"}
CONTAINER_FIELDS = {"name", "image", "command", "args", "env", "ports", "startupProbe", "livenessProbe", "readinessProbe",
                    "volumeMounts", "securityContext", "resources"}
POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy", "seccompProfile",
                "supplementalGroups"}
CONTAINER_SECURITY = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities", "runAsNonRoot", "runAsUser",
                      "runAsGroup"}
PROBE_FIELDS = {"httpGet", "periodSeconds", "failureThreshold", "successThreshold", "timeoutSeconds", "initialDelaySeconds"}
KINDS = {"ConfigMap", "Secret", "Service", "StatefulSet", "NetworkPolicy"}


class Unsupported(AssertionError):
    """A manifest asks for something this kubelet does not do: decide here, do not ignore it."""


def skip_reason() -> str | None:
    """Why pods cannot run here (network, UTS or mount namespaces, an overlay root), or None when they can."""
    reason = netns.skip_reason()
    if reason:
        return reason
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"the {tool} command (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as d:
        q = shlex.quote(d)
        probe = subprocess.run(["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount -t tmpfs tmpfs {q} && mkdir {q}/u {q}/w {q}/r && "
                                f"mount -t overlay overlay -o lowerdir=/,upperdir={q}/u,workdir={q}/w {q}/r"],
                               capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot make a pod's root file system (a mount namespace, tmpfs, an overlay over /): {probe.stderr.strip()}"
    return None


def known(obj: dict[str, Any], fields: set[str], where: str) -> None:
    extra = sorted(set(obj) - fields)
    if extra:
        raise Unsupported(f"{where}: the test kubelet does not know {extra}")


@dataclass
class Image:
    """What the kubelet takes from an image: its entrypoint, environment, working dir, user, and
    its own files. Its root is the machine's ``/`` (the interpreter and streampipe installed there),
    with ``files`` copied over it (the Dockerfile's ``COPY`` of the pipeline folder)."""

    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str
    user: tuple[int, int]
    files: dict[str, Path] = field(default_factory=dict)     # path in the image -> folder copied there
    traversable: list[str] = field(default_factory=list)     # folders its user must pass through (its interpreter)

    @classmethod
    def from_dockerfile(cls, dockerfile: Path, build_args: dict[str, Path]) -> Image:
        """The final stage of ``dockerfile``, its ``COPY ${ARG}/ DEST/`` sources taken from ``build_args``;
        ``PATH`` leads to this interpreter's ``bin`` (where ``pip install`` put ``streampipe``)."""
        import dockerfile as parser

        final: list[Any] = []
        for c in parser.parse_file(str(dockerfile)):
            final = [] if c.cmd == "FROM" else [*final, c]
        bin_dir = str(Path(sys.executable).parent)
        env = {"PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        import streampipe.launcher
        import streampipe.monitor
        import streampipe.stages

        installed = [Path(m.__file__ or "").parent for m in (streampipe, streampipe.stages, streampipe.launcher, streampipe.monitor)]
        image = cls(entrypoint=[], cmd=[], env=env, workdir="/", user=(0, 0),
                    traversable=[sys.prefix, os.path.realpath(sys.executable), sys.base_prefix, *map(str, installed)])
        for c in final:
            if c.cmd == "ENV":
                env.update(zip(c.value[::2], c.value[1::2]))
            elif c.cmd == "WORKDIR":
                image.workdir = c.value[0]
            elif c.cmd == "USER":
                uid, _, gid = c.value[0].partition(":")
                image.user = (int(uid), int(gid or uid))
            elif c.cmd == "ENTRYPOINT":
                image.entrypoint = list(c.value)
            elif c.cmd == "CMD":
                image.cmd = list(c.value)
            elif c.cmd == "COPY":
                *sources, dest = c.value
                for source in sources:
                    arg = re.fullmatch(r"\$\{(\w+)\}/?", source)
                    if arg is None or arg.group(1) not in build_args:
                        raise Unsupported(f"Dockerfile COPY {source}: only a folder given as a build argument is known here")
                    image.files[dest.rstrip("/") or "/"] = build_args[arg.group(1)]
        return image


def secret_from_files(name: str, folder: Path, namespace: str | None = None) -> dict[str, Any]:
    """The Secret ``kubectl create secret generic NAME --from-file=FOLDER/`` makes: one key per file."""
    data = {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted(folder.iterdir()) if p.is_file()}
    meta: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Cluster:
    """The objects applied, their pods, and the names the cluster's DNS answers."""

    def __init__(self, hosts: Hosts, root: Path, image: Image) -> None:
        self.hosts, self.root, self.image = hosts, root, image
        self.lock = threading.RLock()       # Hosts and the pod table are shared with the pods' threads
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}   # (kind, namespace, name) -> object
        self.pods: dict[str, Pod] = {}
        self.published: dict[str, list[str]] = {}
        with self.lock:
            self.node_ip = hosts.add(NODE)

    # -- the API server --------------------------------------------------------------------------
    def apply(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            if obj["kind"] not in KINDS:
                raise Unsupported(f"{obj['kind']} {obj['metadata']['name']}: the test kubelet does not run this kind")
            self.objects[(obj["kind"], namespace_of(obj), obj["metadata"]["name"])] = obj
        for (kind, ns, name) in list(self.objects):
            if kind == "StatefulSet":
                self.reconcile(ns, name)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.objects[(kind, namespace, name)]
        except KeyError:
            raise AssertionError(f"{kind} {namespace}/{name} does not exist (a kubelet would leave the pod in "
                                 f"ContainerCreating)") from None

    def scale(self, name: str, replicas: int, namespace: str | None = None) -> None:
        """``kubectl scale statefulset/NAME --replicas=N``."""
        [key] = [k for k in self.objects if k[0] == "StatefulSet" and k[2] == name and namespace in (None, k[1])]
        self.objects[key]["spec"]["replicas"] = replicas
        self.reconcile(key[1], name)

    # -- the StatefulSet controller --------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> None:
        sts = self.get("StatefulSet", namespace, name)
        want = sts["spec"].get("replicas", 1)
        if sts["spec"].get("podManagementPolicy", "OrderedReady") != "Parallel":
            raise Unsupported(f"StatefulSet {name}: only podManagementPolicy: Parallel is run here")
        for ordinal in range(want):
            pod = f"{name}-{ordinal}"
            with self.lock:                   # the pods' threads read the table (publish)
                if pod not in self.pods:
                    self.pods[pod] = Pod(self, sts, ordinal)
        for pod_name in sorted((p for p, pod in self.pods.items() if pod.owner == name and pod.ordinal >= want), reverse=True):
            self.delete(pod_name)

    def delete(self, name: str) -> list[int | None]:
        """Delete a pod: out of its Services, SIGTERM, its grace period, SIGKILL; its claims stay."""
        with self.lock:
            pod = self.pods.pop(name)
        codes = pod.stop()
        with self.lock:
            self.hosts.remove(name)
            self.hosts.set_names({name: []})  # its host name goes with it
        self.publish()
        return codes

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    # -- endpoints and DNS -----------------------------------------------------------------------
    def publish(self) -> None:
        """Every headless Service's names -> its ready pods' IPs, in every host's hosts file."""
        with self.lock:
            names: dict[str, list[str]] = {}
            for (kind, ns, name), svc in self.objects.items():
                if kind != "Service":
                    continue
                spec = svc["spec"]
                if spec.get("clusterIP") != "None":
                    raise Unsupported(f"Service {name}: only headless Services (clusterIP: None) resolve here")
                pods = [p for p in self.pods.values() if p.namespace == ns and labels_match(spec["selector"], p.labels)
                        and (p.ready or spec.get("publishNotReadyAddresses", False))]
                fqdn = f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"
                for dns in (name, f"{name}.{ns}", fqdn):
                    names[dns] = sorted(p.ip for p in pods)
                for p in pods:
                    if p.subdomain == name:
                        names[f"{p.name}.{fqdn}"] = [p.ip]
            for gone in set(self.published) - set(names):
                names[gone] = []
            changed = {k: v for k, v in names.items() if self.published.get(k) != v}
            if changed:
                self.hosts.set_names(changed)
                self.published = {k: v for k, v in names.items() if v}

    def get_from_node(self, pod: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET ``http://<pod IP>:<port><path>`` from the node's network (the test's own thread)."""
        with self.hosts.inside(NODE):
            return http_get(f"http://{self.pods[pod].ip}:{port}{path}", timeout)

    def close(self) -> dict[str, list[int | None]]:
        """Delete every pod at once (as ``kubectl delete -f``); each pod's exit codes, oldest first."""
        codes: dict[str, list[int | None]] = {}
        stoppers = [threading.Thread(target=lambda n=n: codes.__setitem__(n, self.delete(n))) for n in list(self.pods)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        return codes


def namespace_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"].get("namespace", "default"))


@dataclass
class _Run:
    """One container's run as its probe workers share it."""

    started: threading.Event                  # the startup probe succeeded (or there is none)
    done: threading.Event                     # the container is gone: results no longer count
    failed: str = ""                          # why liveness or startup gave up on it
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Probe:
    """One ``httpGet`` probe with the kubelet's defaults for what the manifest leaves out."""

    path: str
    port: int
    period: float = 10
    timeout: float = 1
    failures: int = 3
    successes: int = 1
    delay: float = 0

    @classmethod
    def of(cls, spec: dict[str, Any], ports: dict[str, int], where: str) -> Probe:
        known(spec, PROBE_FIELDS, where)
        get = spec["httpGet"]
        known(get, {"path", "port", "scheme"}, f"{where}.httpGet")
        if get.get("scheme", "HTTP") != "HTTP":
            raise Unsupported(f"{where}: only HTTP probes")
        port = get["port"] if isinstance(get["port"], int) else ports[get["port"]]
        return cls(get.get("path", "/"), port, spec.get("periodSeconds", 10), spec.get("timeoutSeconds", 1),
                   spec.get("failureThreshold", 3), spec.get("successThreshold", 1), spec.get("initialDelaySeconds", 0))


class Pod:
    """One pod of a StatefulSet: its host (network namespace), volumes and container, restarted as
    ``restartPolicy: Always`` says by a thread of its own, and probed by one thread per probe."""

    def __init__(self, cluster: Cluster, sts: dict[str, Any], ordinal: int) -> None:
        self.cluster, self.ordinal = cluster, ordinal
        self.owner = sts["metadata"]["name"]
        self.name = f"{self.owner}-{ordinal}"
        self.namespace = namespace_of(sts)
        self.subdomain = sts["spec"].get("serviceName")
        template = sts["spec"]["template"]
        self.labels: dict[str, str] = dict(template["metadata"].get("labels", {}))
        self.spec: dict[str, Any] = template["spec"]
        known(self.spec, POD_FIELDS, f"{self.name}: spec")
        if self.spec.get("restartPolicy", "Always") != "Always":
            raise Unsupported(f"{self.name}: restartPolicy {self.spec['restartPolicy']}")
        if len(self.spec["containers"]) != 1:
            raise Unsupported(f"{self.name}: one container per pod is run here")
        self.container: dict[str, Any] = self.spec["containers"][0]
        known(self.container, CONTAINER_FIELDS, f"{self.name}: container")
        self.ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", []) if "name" in p}
        self.probes = {kind: Probe.of(self.container[f"{kind}Probe"], self.ports, f"{self.name}: {kind}Probe")
                       for kind in ("startup", "liveness", "readiness") if f"{kind}Probe" in self.container}
        self.grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        self.dir = cluster.root / "pods" / self.name
        shutil.rmtree(self.dir, ignore_errors=True)    # an earlier pod of this name (scaled down and up): its emptyDir goes
        self.dir.mkdir(parents=True)
        self.uid, self.gid, self.groups, self.fs_group = self.identity()
        self.mounts = self.volumes(sts)

        self.ready = False
        self.restarts = 0                       # container restarts, as `kubectl get pods` counts them
        self.exits: list[int | None] = []       # every container's exit status (None: still running at the end)
        self.events: list[str] = []             # why containers were killed, for a failing test's message
        self.state = "waiting (ContainerCreating)"     # the container's state as `kubectl describe pod` says it
        self.probed: dict[str, str] = {}        # each probe's latest result ("503", "no answer"), for describe()
        self.proc: subprocess.Popen[bytes] | None = None
        self.proc_lock = threading.Lock()
        self.stopping = threading.Event()
        with cluster.lock:
            self.ip = cluster.hosts.add(self.name)
        self.thread = threading.Thread(target=self.run, name=f"kubelet {self.name}", daemon=True)
        self.thread.start()

    # -- the pod's spec ----------------------------------------------------------------------------
    def identity(self) -> tuple[int, int, list[int], int | None]:
        pod_sc, sc = self.spec.get("securityContext", {}), self.container.get("securityContext", {})
        known(pod_sc, POD_SECURITY, f"{self.name}: securityContext")
        known(sc, CONTAINER_SECURITY, f"{self.name}: container securityContext")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", self.cluster.image.user[0]))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", self.cluster.image.user[1]))
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
            raise AssertionError(f"{self.name}: runAsNonRoot with user 0: CreateContainerConfigError")
        if set(sc.get("capabilities", {}).get("add", [])):
            raise Unsupported(f"{self.name}: capabilities.add")
        fs_group = pod_sc.get("fsGroup")
        groups = sorted({gid, *([fs_group] if fs_group is not None else []), *pod_sc.get("supplementalGroups", [])})
        return uid, gid, groups, fs_group

    def volumes(self, sts: dict[str, Any]) -> list[dict[str, Any]]:
        """Each volume as a folder, and the container's mounts of them (path, source, read-only)."""
        folders: dict[str, Path] = {}
        owned: list[Path] = []                  # volumes fsGroup applies to (projected ones are written with it)
        for claim in sts["spec"].get("volumeClaimTemplates", []):
            name = claim["metadata"]["name"]
            folders[name] = self.cluster.root / "claims" / f"{name}-{self.name}"   # data-demo-consumer-0, kept across pods
            if not folders[name].exists():
                folders[name].mkdir(parents=True)      # provisioned: a fresh file system's root belongs to root
            owned.append(folders[name])
        for vol in self.spec.get("volumes", []):
            name, where = vol["name"], self.dir / "volumes" / vol["name"]
            if "configMap" in vol:
                cm = self.cluster.get("ConfigMap", self.namespace, vol["configMap"]["name"])
                files = {k: v.encode() for k, v in cm.get("data", {}).items()}
                project(where, files, vol["configMap"].get("defaultMode", 0o644), self.fs_group)
            elif "secret" in vol:
                secret = self.cluster.get("Secret", self.namespace, vol["secret"]["secretName"])
                files = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
                project(where, files, vol["secret"].get("defaultMode", 0o644), self.fs_group)
            elif "emptyDir" in vol:
                where.mkdir(parents=True, exist_ok=True)
                where.chmod(0o777)                     # as the kubelet makes it, then fsGroup below
                owned.append(where)
            elif "persistentVolumeClaim" in vol:
                where = self.cluster.root / "claims" / vol["persistentVolumeClaim"]["claimName"]
                if not where.exists():
                    raise AssertionError(f"{self.name}: claim {where.name} does not exist (the pod would stay Pending)")
            else:
                raise Unsupported(f"{self.name}: volume {name} of kind {sorted(set(vol) - {'name'})}")
            folders[name] = where
        if self.fs_group is not None:
            for folder in owned:
                fs_group(folder, self.fs_group)
        mounts = []
        for m in self.container.get("volumeMounts", []):
            known(m, {"name", "mountPath", "subPath", "readOnly"}, f"{self.name}: volumeMount {m.get('name')}")
            source = folders[m["name"]] / m.get("subPath", "")
            mounts.append({"path": m["mountPath"], "source": str(source.resolve()), "read_only": bool(m.get("readOnly")),
                           "file": source.resolve().is_file()})
        return mounts

    def claim(self, name: str = "data") -> Path:
        """The folder of this pod's claim from the template ``name``."""
        return self.cluster.root / "claims" / f"{name}-{self.name}"

    def env(self) -> dict[str, str]:
        fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "status.podIP": self.ip,
                  "status.hostIP": self.cluster.node_ip, "spec.nodeName": NODE}
        env = {**self.cluster.image.env, "HOSTNAME": self.name}
        for e in self.container.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            elif "fieldRef" in e.get("valueFrom", {}):
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                if path not in fields:
                    raise Unsupported(f"{self.name}: env {e['name']} from fieldPath {path}")
                env[e["name"]] = fields[path]
            else:
                raise Unsupported(f"{self.name}: env {e['name']}: {e}")
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        image = self.cluster.image
        command = self.container.get("command", image.entrypoint)
        args = self.container.get("args", image.cmd if "command" not in self.container else [])
        return [expand(a, env) for a in [*command, *args]]

    # -- the kubelet's loop ----------------------------------------------------------------------
    def start_container(self) -> None:
        env = self.env()
        sc = self.container.get("securityContext", {})
        scratch = self.dir / f"root-{len(self.exits)}"
        scratch.mkdir()
        spec = {"hostname": self.name, "scratch": str(scratch), "workdir": self.cluster.image.workdir,
                "image_files": {k: str(v) for k, v in self.cluster.image.files.items()},
                "traversable": self.cluster.image.traversable if self.uid != 0 else [], "mounts": self.mounts,
                "image_paths": self.cluster.image.traversable,
                "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
                "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
                "uid": self.uid, "gid": self.gid, "groups": self.groups, "argv": self.argv(env), "env": env}
        log = open(self.log_path(len(self.exits)), "wb")   # noqa: SIM115 (the child keeps it; closed below)
        with self.cluster.lock:
            proc = self.cluster.hosts.popen(self.name, ["unshare", "--uts", "--mount", "--propagation", "private",
                                                        sys.executable, str(PODINIT), json.dumps(spec)],
                                            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        with self.proc_lock:
            self.proc = proc
            self.exits.append(None)
            self.state = f"running (container {len(self.exits) - 1})"

    def log_path(self, n: int) -> Path:
        return self.dir / f"container-{n}.log"

    def logs(self, previous: bool = False) -> str:
        """``kubectl logs`` (``--previous``: the container before the last restart)."""
        return self.log_of(len(self.exits) - (2 if previous else 1))

    def log_of(self, n: int) -> str:
        """Container ``n``'s log ("" before it started)."""
        path = self.log_path(n)
        return path.read_text(errors="replace") if n >= 0 and path.exists() else ""

    def last_exited(self) -> int | None:
        """The latest container that exited (``kubectl describe``'s "Last State: Terminated"), or None."""
        done = [n for n, code in enumerate(self.exits) if code is not None]
        return done[-1] if done else None

    def describe(self, tail: int = LOG_TAIL_CHARS) -> str:
        """What ``kubectl describe pod`` and ``kubectl logs [--previous]`` tell of why a pod is not
        ready: the container's state and last state (exit status), each probe's latest result, the
        events, the current container's log and that of the last one that exited."""
        last = self.last_exited()
        lines = [f"--- {self.name} ip={self.ip} ready={self.ready} restarts={self.restarts} state={self.state}"
                 + (f" last state=exited {self.exits[last]} (container {last})" if last is not None else ""),
                 f"    probes: {', '.join(f'{k} {v}' for k, v in self.probed.items()) or 'none answered yet'}",
                 f"    events: {self.events[-EVENTS_SHOWN:]}" + (f" ({len(self.events) - EVENTS_SHOWN} earlier)"
                                                                 if len(self.events) > EVENTS_SHOWN else "")]
        shown = [n for n in (len(self.exits) - 1, last) if n is not None and n >= 0]
        for n in dict.fromkeys(shown):
            text = self.log_of(n)
            lines.append(f"    log of container {n}{' (exited ' + str(self.exits[n]) + ')' if self.exits[n] is not None else ''}:"
                         + ("\n" + text[-tail:].rstrip() if text.strip() else " (empty)"))
        return "\n".join(lines)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.start_container()
                self.watch()
                if self.stopping.is_set():
                    break
                delay = BACKOFF_S[min(self.restarts, len(BACKOFF_S) - 1)]
                self.state = f"waiting (back-off {delay:g}s after exit {self.exits[-1]})"
                if self.stopping.wait(delay):
                    break
                self.restarts += 1
        except Exception as exc:     # a broken kubelet: say so in the test's report rather than hang
            self.events.append(f"kubelet error: {exc!r}")
            self.state = f"kubelet error: {exc!r}"
            raise

    def watch(self) -> None:
        """Until the container exits, fails its liveness or startup probe (then it is stopped) or the
        pod is deleted; a worker per probe, as the kubelet has, so a probe that times out delays no other."""
        proc = self.proc
        assert proc is not None
        run = _Run(started=threading.Event(), done=threading.Event())
        if "startup" not in self.probes:
            run.started.set()
        for kind, probe in self.probes.items():
            threading.Thread(target=self.probe_worker, args=(kind, probe, run), name=f"{kind} probe {self.name}",
                             daemon=True).start()
        try:
            while not self.stopping.is_set():
                code = proc.poll()
                if code is not None:
                    self.exits[-1] = code
                    self.events.append(f"container {len(self.exits) - 1} exited {code}")
                    return
                if run.failed:
                    self.events.append(f"container {len(self.exits) - 1}: {run.failed}: killed")
                    with run.lock:
                        run.done.set()
                        self.set_ready(False)
                    self.terminate()
                    return
                if run.started.is_set() and "readiness" not in self.probes:
                    self.set_ready(True)
                self.stopping.wait(EXIT_POLL_S)
        finally:
            with run.lock:
                run.done.set()
                self.set_ready(False)

    def probe_worker(self, kind: str, probe: Probe, run: _Run) -> None:
        """One probe of one container, from the node's network, at its period (a ticker), until the container is done."""
        with self.cluster.hosts.inside(NODE):
            if kind != "startup":
                while not run.started.wait(EXIT_POLL_S):     # liveness and readiness wait for the startup probe
                    if run.done.is_set():
                        return
            oks = fails = 0
            next_at = time.monotonic() + probe.delay
            while not run.done.wait(max(0.0, next_at - time.monotonic())):
                next_at = time.monotonic() + probe.period
                status, _ = http_get(f"http://{self.ip}:{probe.port}{probe.path}", probe.timeout)
                oks, fails = (oks + 1, 0) if 200 <= status < 400 else (0, fails + 1)
                self.probed[kind] = f"{status or 'no answer'}" + (f" x{fails}" if fails > 1 else "")
                with run.lock:
                    if run.done.is_set():
                        return
                    if kind == "startup" and oks >= probe.successes:
                        run.started.set()
                        return
                    if kind == "readiness" and (oks >= probe.successes or fails >= probe.failures):
                        self.set_ready(oks >= probe.successes)
                    elif kind != "readiness" and fails >= probe.failures:
                        run.failed = f"{kind} probe failed {fails} times ({status or 'no answer'})"
                        return

    def set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self.cluster.publish()

    def terminate(self) -> None:
        """SIGTERM, ``terminationGracePeriodSeconds``, SIGKILL; the exit status is recorded."""
        with self.proc_lock:
            proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.events.append(f"still running {self.grace:g} s after SIGTERM: SIGKILL")
                proc.kill()
                proc.wait(10)
        self.exits[-1] = proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the container's process from outside (an OOM kill, a crash): the kubelet sees it exit."""
        with self.proc_lock:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name}: no running container"
            self.proc.send_signal(sig)

    def stop(self) -> list[int | None]:
        """The pod is deleted: out of its Services first, then its container terminated."""
        self.stopping.set()
        self.thread.join(30)
        self.set_ready(False)
        self.terminate()
        return list(self.exits)

    def metrics(self, port: str = "health") -> str:
        status, body = self.cluster.get_from_node(self.name, self.ports[port], "/metrics")
        return body if status == 200 else ""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references in command, args and env values (``$$`` escapes)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def project(folder: Path, files: dict[str, bytes], mode: int, group: int | None) -> None:
    """A ConfigMap's or Secret's keys as the kubelet writes them: a timestamped folder, ``..data``
    pointing at it, and each key a symlink through ``..data`` (so updates swap atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / time.strftime("..%Y_%m_%d_%H_%M_%S.0000000")
    stamp.mkdir()
    stamp.chmod(0o755)
    for key, content in files.items():
        (stamp / key).write_bytes(content)
        (stamp / key).chmod(mode)
        if group is not None:
            os.chown(stamp / key, 0, group)
        (folder / key).symlink_to(f"..data/{key}")
    (folder / "..data").symlink_to(stamp.name)
    if group is not None:
        os.chown(stamp, 0, group)
        os.chown(folder, 0, group)
    folder.chmod(0o1777 if group is None else 0o3777)


def fs_group(folder: Path, gid: int) -> None:
    """``fsGroup`` with ``OnRootMismatch``: when the volume's root is not yet the group's, every file
    becomes the group's, group-writable, and every folder set-group-ID."""
    st = folder.stat()
    if st.st_gid == gid and st.st_mode & 0o2070 == 0o2070:
        return
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chown(path, -1, gid)
        extra = 0o2070 if path.is_dir() else 0o060
        path.chmod(path.stat().st_mode & 0o7777 | extra)
