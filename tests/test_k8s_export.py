"""``streampipe export kubernetes``: the manifests validate against Kubernetes' own schemas (strict:
an unknown field is an error), carry what the pipeline needs (names, labels, probes, env, volumes,
NetworkPolicy peers), and what cannot map is refused with exit 2 and the line.

Also the Dockerfile: parsed with BuildKit's parser, checked against the paths the manifests use.
"""

from __future__ import annotations

import fnmatch
import re
import textwrap
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

from streampipe.launcher import kubernetes as k8s
from streampipe.launcher.config import load_config
from streampipe.launcher.errors import ConfigError
from tests.conftest import cli

K8S_VERSION = "1.33.0"   # pinned: the schemas ship in kubernetes-validate's wheel (no network)
REPO = Path(__file__).resolve().parent.parent
RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")   # Service names
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")

# replicas, a stateful trainer read by an evaluator, CURVE, a stage of the user's own, names that
# need converting, limits and a longer stop_grace
BIG = """\
pipeline: fraud_scoring
transport: tcp
security: curve
keys: keys
advertise_host: 10.1.2.3
defaults:
  restart: always
stages:
  source:
    type: generator
    replicas: 2
    options: {count: 1000}
  normalizer:
    type: normalizer
    inputs: [source]
    replicas: 3
    port: 6000
    bind_host: 127.0.0.1
    max_rss_mb: 512
    max_cpu_percent: 150
    stop_grace: 12.5
  records_sink:
    type: consumer
    inputs: [normalizer, normalizer.holdout]
    options: {output: out/records.jsonl}
  trainer:
    type: trainer
    inputs: [normalizer]
    options: {checkpoint_every: 500}
  evaluator:
    type: evaluator
    inputs: [normalizer.holdout]
  enricher:
    type: mystages:Enricher
    inputs: [normalizer]
"""

MYSTAGES = """\
from streampipe import Stage

class Enricher(Stage):
    def process(self, batch):
        return batch
"""


def validate_all(objects: list[dict[str, Any]]) -> None:
    """Every object but the ServiceMonitor (a CRD, checked by hand) against the pinned schemas, strict."""
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(sts: dict[str, Any]) -> dict[str, Any]:
    [c] = sts["spec"]["template"]["spec"]["containers"]
    return c


def write(tmp_path: Path, text: str, **files: str) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(textwrap.dedent(text))
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> k8s.Export:
    folder = tmp_path_factory.mktemp("big")
    cfg = load_config(write(folder, BIG, **{"mystages.py": MYSTAGES}))
    return k8s.export(cfg, image="registry.example/team/fraud:1.0", namespace="fraud", service_monitor=True, storage="5Gi")


@pytest.fixture(scope="module")
def default_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str, str]:
    """The repository's services.yaml through the real CLI, one file per object, and on stdout."""
    out = tmp_path_factory.mktemp("default") / "manifests"
    args = ("export", "kubernetes", "--config", str(REPO / "services.yaml"), "--image", "registry.example/demo:1",
            "--without", "log_extractor")
    files = cli(*args, "-o", str(out), check=True)
    stream = cli(*args, check=True)
    objects = [yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))]
    return objects, stream.stdout, files.stderr + stream.stderr


# -- schemas ---------------------------------------------------------------------------------------

def test_default_pipeline_validates_strictly(default_export: tuple[list[dict[str, Any]], str, str]) -> None:
    objects, stream, _ = default_export
    validate_all(objects)
    kinds = [o["kind"] for o in objects]
    stages = ["generator", "normalizer", "consumer", "trainer", "evaluator"]
    assert kinds == ["ConfigMap"] + ["Service"] * 5 + ["StatefulSet"] * 5 + ["NetworkPolicy"] * 5
    assert sorted(by_kind(objects, "StatefulSet")) == sorted(f"demo-{s}" for s in stages)
    assert list(yaml.safe_load_all(stream)) == objects   # the stdout stream holds the same objects, in order


def test_pipeline_with_replicas_trainer_and_curve_validates_strictly(big: k8s.Export) -> None:
    validate_all(big.objects)


def test_schema_check_is_strict() -> None:
    """The validator would catch a misspelt field: the tests above mean something."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIp": "None"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


# -- names and labels ------------------------------------------------------------------------------

def test_names_are_rfc1123_and_real_names_kept(big: k8s.Export) -> None:
    names = {o["metadata"]["name"] for o in big.objects}
    assert "fraud-scoring-records-sink" in names and "fraud-scoring" in names
    for obj in big.objects:
        meta = obj["metadata"]
        assert RFC1123_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
        assert meta["namespace"] == "fraud"
        for key, value in meta["labels"].items():
            assert LABEL_KEY.match(key) and LABEL_VALUE.match(value), (key, value)
        assert meta["labels"]["app.kubernetes.io/name"] == "streampipe"
        assert meta["labels"]["app.kubernetes.io/instance"] == "fraud-scoring"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "streampipe"
        assert meta["annotations"]["streampipe/pipeline"] == "fraud_scoring"
    for name in by_kind(big.objects, "Service"):
        assert RFC1035_LABEL.match(name), name
    sts = by_kind(big.objects, "StatefulSet")["fraud-scoring-records-sink"]
    assert sts["metadata"]["labels"]["streampipe/stage"] == "records_sink"
    assert sts["metadata"]["labels"]["app.kubernetes.io/component"] == "records-sink"
    selector = sts["spec"]["selector"]["matchLabels"]
    assert selector.items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_dns_label() -> None:
    assert k8s.dns_label("log_extractor") == "log-extractor"
    assert k8s.dns_label("Fraud__Scoring v2") == "fraud-scoring-v2"


# -- workloads -------------------------------------------------------------------------------------

def test_statefulsets_run_each_stage_with_probes_env_and_a_volume(big: k8s.Export) -> None:
    sets = by_kind(big.objects, "StatefulSet")
    assert {n: s["spec"]["replicas"] for n, s in sets.items()} == {
        "fraud-scoring-source": 2, "fraud-scoring-normalizer": 3, "fraud-scoring-records-sink": 1,
        "fraud-scoring-trainer": 1, "fraud-scoring-evaluator": 1, "fraud-scoring-enricher": 1}
    for name, sts in sets.items():
        stage = sts["metadata"]["labels"]["streampipe/stage"]
        spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
        c = container(sts)
        assert spec["serviceName"] == name
        assert c["image"] == "registry.example/team/fraud:1.0"
        # one replica in the foreground; its index from the pod's host name (<name>-<ordinal>)
        assert c["command"] == ["streampipe"]
        assert c["args"] == ["run-stage", stage, "--config", k8s.CONFIG_PATH, "--run-dir", k8s.RUN_DIR,
                             "--health-port", str(k8s.HEALTH_PORT)]
        env = {e["name"]: e for e in c["env"]}
        assert env["STREAMPIPE_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        health = {p["name"]: p["containerPort"] for p in c["ports"]}["health"]
        assert health == k8s.HEALTH_PORT
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        # ready_timeout (60 s) is the startup probe's budget, as the supervisor's READY timeout
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 60
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(health) and annotations["prometheus.io/path"] == "/metrics"
        # every stage keeps state (positions, snapshots, output, checkpoints, dead letters): its own claim
        [claim] = spec["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
        assert claim["metadata"]["labels"] == spec["selector"]["matchLabels"]   # immutable: no version in it
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts[k8s.CLAIM_DIR]["name"] == claim["metadata"]["name"]
        assert k8s.RUN_DIR.startswith(k8s.CLAIM_DIR + "/")
        assert mounts[k8s.CONFIG_PATH] == {"name": "config", "mountPath": k8s.CONFIG_PATH, "subPath": "services.yaml", "readOnly": True}
        assert mounts[k8s.KEYS_DIR]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["keys"]["secret"]["secretName"] == "fraud-scoring-keys"
        assert volumes["config"]["configMap"]["name"] == "fraud-scoring"
        # non-root, nothing writable but the volumes
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == k8s.RUN_AS
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    norm = sets["fraud-scoring-normalizer"]
    assert container(norm)["resources"] == {"limits": {"memory": "512Mi", "cpu": "1500m"}}
    assert norm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 13   # stop_grace 12.5
    assert sets["fraud-scoring-source"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5
    assert "resources" not in container(sets["fraud-scoring-source"])


def test_evaluator_reads_the_trainers_volume_beside_it(big: k8s.Export) -> None:
    ev = by_kind(big.objects, "StatefulSet")["fraud-scoring-evaluator"]
    pod = ev["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["trainer"]["persistentVolumeClaim"] == {"claimName": "data-fraud-scoring-trainer-0", "readOnly": True}
    mounts = {m["name"]: m for m in container(ev)["volumeMounts"]}
    assert mounts["trainer"]["readOnly"] is True
    [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert term["topologyKey"] == "kubernetes.io/hostname"
    cfg = yaml.safe_load(big.pod_config)
    # the trainer writes <its run dir>/checkpoints; its claim is mounted here whole
    assert cfg["stages"]["evaluator"]["options"]["checkpoint_dir"] == mounts["trainer"]["mountPath"] + "/run/checkpoints"


# -- the pods' services.yaml and the network -------------------------------------------------------

def test_pod_config_is_valid_and_names_the_services(big: k8s.Export, tmp_path: Path) -> None:
    cm = by_kind(big.objects, "ConfigMap")["fraud-scoring"]
    assert cm["data"]["services.yaml"] == big.pod_config
    assert big.pod_config.startswith("# services.yaml of pipeline 'fraud_scoring'")
    path = write(tmp_path, big.pod_config, **{"mystages.py": MYSTAGES})   # as in the image's /pipeline
    cfg = load_config(path)   # as `run-stage` will: the stages' code and options checked too
    assert (cfg.transport, cfg.bind_host, cfg.advertise_host, cfg.keys) == ("tcp", "0.0.0.0", None, k8s.KEYS_DIR)
    services = by_kind(big.objects, "Service")
    sets = by_kind(big.objects, "StatefulSet")
    for name, stage in cfg.stages.items():
        obj = "fraud-scoring-" + name.replace("_", "-")
        ports = {p["name"]: p for p in services[obj]["spec"]["ports"]}
        container_ports = {p["name"]: p["containerPort"] for p in container(sets[obj])["ports"]}
        assert services[obj]["spec"]["clusterIP"] == "None"
        assert services[obj]["spec"]["selector"] == sets[obj]["spec"]["selector"]["matchLabels"]
        assert stage.bind_host is None
        if stage.inputs:   # producers resolve the headless Service's name
            assert stage.address == obj
            assert stage.port == ports["data"]["port"] == container_ports["data"]
        else:
            assert stage.address is None and "data" not in ports
    assert cfg.stages["normalizer"].port == 6000   # the user's port is kept
    assert cfg.stages["records_sink"].port == k8s.DATA_PORT
    assert cfg.stages["normalizer"].ack_port == k8s.ACK_PORT == container_ports_of(sets["fraud-scoring-normalizer"])["ack"]
    for line in ("bind_host: 0.0.0.0 (was '127.0.0.1'", "advertise_host removed", "stages.normalizer.bind_host removed",
                 "stages.normalizer.address: fraud-scoring-normalizer", "keys: /etc/streampipe/keys (was 'keys'"):
        assert line in big.pod_config


def container_ports_of(sts: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(sts)["ports"]}


def peers_of(rule: dict[str, Any]) -> set[str]:
    return {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule.get("from", [])}


def test_network_policies_admit_only_neighbours(big: k8s.Export) -> None:
    policies = by_kind(big.objects, "NetworkPolicy")
    assert len(policies) == 6

    def rules(stage: str) -> dict[int, set[str] | None]:
        spec = policies[f"fraud-scoring-{stage}"]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == stage
        return {r["ports"][0]["port"]: (peers_of(r) if "from" in r else None) for r in spec["ingress"]}

    # data from the producers, acks from the consumers, the health port (probes, scrapes) from anywhere
    assert rules("normalizer") == {6000: {"source"}, k8s.ACK_PORT: {"records-sink", "trainer", "evaluator", "enricher"},
                                   k8s.HEALTH_PORT: None}
    assert rules("source") == {k8s.ACK_PORT: {"normalizer"}, k8s.HEALTH_PORT: None}
    assert rules("records-sink") == {k8s.DATA_PORT: {"normalizer"}, k8s.HEALTH_PORT: None}
    assert rules("evaluator") == {k8s.DATA_PORT: {"normalizer"}, k8s.HEALTH_PORT: None}


def test_service_monitor_shape(big: k8s.Export) -> None:
    """A CRD the schemas do not know: its shape checked against the Prometheus Operator's v1 API."""
    [sm] = by_kind(big.objects, "ServiceMonitor").values()
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"} and set(sm["spec"]) == {"selector", "endpoints"}
    assert sm["metadata"]["namespace"] == "fraud"
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint == {"port": "health", "path": "/metrics", "interval": "15s"}
    selected = [s for s in by_kind(big.objects, "Service").values()
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 6   # every stage's Service, each with the named port
    for service in selected:
        assert "health" in {p["name"] for p in service["spec"]["ports"]}


def test_without_service_monitor_flag_none_is_written(default_export: tuple[list[dict[str, Any]], str, str]) -> None:
    objects, _, stderr = default_export
    assert not by_kind(objects, "ServiceMonitor")
    assert "note: stage 'log_extractor' left out (--without)" in stderr
    assert "security: none" in stderr   # plaintext sockets are said, not hidden


def test_notes_for_settings_the_kubelet_owns(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        pipeline: p
        defaults: {max_restarts: 3, backoff_max: 30}
        stages:
          gen: {type: generator, max_cpu_percent: 50}
        """)
    notes = k8s.export(load_config(path, check_stages=False), image="i").notes
    assert any("'gen': max_restarts not applied: the kubelet never gives up" in n for n in notes), notes
    assert any("'gen': backoff_max not applied" in n for n in notes), notes
    assert any("throttles the pod at 50 %" in n for n in notes), notes


# -- serving: a Deployment behind a Service ---------------------------------------------------------

# the loop on a cluster: a trainer, an evaluator and a predictor on its checkpoints, and a serve stage
SERVING = """\
pipeline: shop
stages:
  gen: {type: generator}
  norm: {type: normalizer, inputs: [gen], options: {holdout: 0.1}}
  trainer: {type: trainer, inputs: [norm]}
  evaluator: {type: evaluator, inputs: [norm.holdout]}
  predictor: {type: predictor, inputs: [norm]}
  scored: {type: consumer, inputs: [predictor]}
  api:
    type: serve
    replicas: 3
    options: {port: 8080, token_file: api-token}
"""


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> tuple[k8s.Export, Path]:
    folder = tmp_path_factory.mktemp("serving")
    cfg = load_config(write(folder, SERVING, **{"api-token": "s3cret\n"}))
    return k8s.export(cfg, image="registry.example/shop:1"), folder


def test_serve_is_a_deployment_behind_a_cluster_ip_service(serving: tuple[k8s.Export, Path]) -> None:
    export, _ = serving
    validate_all(export.objects)
    assert "shop-api" not in by_kind(export.objects, "StatefulSet")
    deployment = by_kind(export.objects, "Deployment")["shop-api"]
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0   # a rollout keeps every pod answering
    c = container(deployment)
    # every pod is a whole serve stage: replica 0, not an ordinal a Deployment's pod name does not have
    assert c["args"][:4] == ["run-stage", "api", "--replica", "0"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "health": k8s.HEALTH_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}   # ready once a model serves
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}} and mounts["data"]["mountPath"] == k8s.CLAIM_DIR
    # stateless: the checkpoints are read from where the trainer writes them, its volume, read-only, on its node
    assert volumes["trainer"]["persistentVolumeClaim"] == {"claimName": "data-shop-trainer-0", "readOnly": True}
    assert volumes["evaluator"]["persistentVolumeClaim"] == {"claimName": "data-shop-evaluator-0", "readOnly": True}
    assert mounts["trainer"]["readOnly"] is mounts["evaluator"]["readOnly"] is True
    [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert volumes["token"]["secret"]["secretName"] == "shop-api-token"
    assert mounts["token"]["mountPath"] == k8s.TOKEN_DIR
    service = by_kind(export.objects, "Service")["shop-api"]
    assert service["spec"]["type"] == "ClusterIP" and "clusterIP" not in service["spec"]
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8080, "http"), "health": (k8s.HEALTH_PORT, "health")}
    policy = by_kind(export.objects, "NetworkPolicy")["shop-api"]["spec"]
    assert {r["ports"][0]["port"]: "from" in r for r in policy["ingress"]} == {8080: False, k8s.HEALTH_PORT: False}
    assert any("a Deployment of 3 pods behind the Service shop-api:8080" in n for n in export.notes), export.notes
    assert any("run on the node of 'trainer'" in n for n in export.notes), export.notes
    # the predictor reads the same checkpoints: the trainer's volume in its StatefulSet too
    predictor = by_kind(export.objects, "StatefulSet")["shop-predictor"]
    assert {v["name"]: v for v in predictor["spec"]["template"]["spec"]["volumes"]}["trainer"] == volumes["trainer"]


def test_serve_pod_config_listens_for_its_service(serving: tuple[k8s.Export, Path], tmp_path: Path) -> None:
    export, _ = serving
    deployment = by_kind(export.objects, "Deployment")["shop-api"]
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
    cfg = yaml.safe_load(export.pod_config)
    options = cfg["stages"]["api"]["options"]
    assert options["host"] == "0.0.0.0" and options["port"] == 8080
    assert options["token_file"] == k8s.TOKEN_DIR + "/token"
    assert options["checkpoint_dir"] == mounts["trainer"] + "/run/checkpoints"
    assert options["metrics"] == mounts["evaluator"] + "/run/metrics.jsonl"
    assert cfg["stages"]["predictor"]["options"]["checkpoint_dir"] == options["checkpoint_dir"]
    # the pods' file passes validate (a host beyond loopback with a token is allowed), as run-stage will check it
    checked = load_config(write(tmp_path, export.pod_config))
    assert checked.stages["api"].replicas == 3 and checked.stages["api"].inputs == []


SERVE_REFUSED = [
    ("serve_without_token", "  api: {type: serve, options: {port: 8080}}\n", 8, "stages.api.options", "set token_file"),
    ("serve_any_port", "  api: {type: serve, options: {port: 0, token: t}}\n", 8, "stages.api.options.port",
     "cannot be named by a Service"),
    ("serve_health_port", f"  api: {{type: serve, options: {{port: {k8s.HEALTH_PORT}, token: t}}}}\n", 8,
     "stages.api.options.port", "the health port"),
    ("predictor_shadow_dir", "  pr: {type: predictor, inputs: [gen], options: {shadow_dir: other}}\n", 8,
     "stages.pr.options.shadow_dir", "use pinned"),
    ("serve_of_trainer_replicas", "  tr: {type: trainer, inputs: [gen], replicas: 2}\n  api: {type: serve, options: {token: t}}\n",
     8, "stages.tr.replicas", "the serve 'api' reads the checkpoints of 'tr'"),
]


@pytest.mark.parametrize("name,extra,line,field,needle", SERVE_REFUSED, ids=[r[0] for r in SERVE_REFUSED])
def test_serve_refused_with_line_and_field(tmp_path: Path, name: str, extra: str, line: int, field: str, needle: str) -> None:
    cfg = load_config(write(tmp_path, SMALL + extra), check_stages=False)
    with pytest.raises(ConfigError) as exc:
        k8s.export(cfg, image="i")
    assert (exc.value.line, exc.value.field) == (line, field), str(exc.value)
    assert needle in exc.value.reason


def test_serve_inline_token_is_noted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SMALL + "  api: {type: serve, options: {token: t}}\n"), check_stages=False)
    export = k8s.export(cfg, image="i")
    validate_all(export.objects)
    assert any("its token is in the ConfigMap 'p' in clear" in n for n in export.notes), export.notes
    assert "token" not in {v["name"] for v in by_kind(export.objects, "Deployment")["p-api"]["spec"]["template"]["spec"]["volumes"]}


# -- refusals --------------------------------------------------------------------------------------

SMALL = """\
pipeline: p
stages:
  gen:
    type: generator
  sink:
    type: consumer
    inputs: [gen]
"""

# (name, yaml, --without, line, field, text the message must contain)
REFUSED = [
    ("restart_never", SMALL + "    restart: never\n", (), 8, "stages.sink.restart", "Use restart: always"),
    ("restart_on_failure_in_defaults", SMALL.replace("stages:", "defaults: {restart: on-failure}\nstages:"), (), 2,
     "defaults.restart", "keep this pipeline on `streampipe up`"),
    ("log_extractor", SMALL + "  logs:\n    type: log_extractor\n", (), 9, "stages.logs.type", "--without logs"),
    ("absolute_output", SMALL + "    allow_outside_run_dir: true\n    options: {output: /data/out.jsonl}\n", (), 9,
     "stages.sink.options.output",
     "relative to the run directory"),
    ("trainer_replicas", SMALL + "  tr: {type: trainer, inputs: [gen], replicas: 2}\n  ev: {type: evaluator, inputs: [gen]}\n",
     (), 8, "stages.tr.replicas", "set replicas: 1"),
    ("name_collision", SMALL + "  sink_a: {type: consumer, inputs: [gen]}\n  sink-a: {type: consumer, inputs: [gen]}\n", (), 9,
     "stages.sink-a", "stages 'sink_a' and 'sink-a' both become 'p-sink-a'"),
    ("name_too_long", SMALL.replace("sink", "s" * 60), (), 5, "stages." + "s" * 60, "shorten"),
    ("pipeline_digit", SMALL.replace("pipeline: p", "pipeline: 9lives"), (), 1, "pipeline", "start with a letter"),
    ("without_read_stage", SMALL, ("gen",), 7, "stages.sink.inputs", "--without leaves out"),
    ("without_unknown", SMALL, ("nope",), None, None, "--without nope: no such stage"),
]


@pytest.mark.parametrize("name,text,without,line,field,needle", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_line_and_field(tmp_path: Path, name: str, text: str, without: tuple[str, ...], line: int | None,
                                     field: str | None, needle: str) -> None:
    cfg = load_config(write(tmp_path, text), check_stages=False)
    with pytest.raises(ConfigError) as exc:
        k8s.export(cfg, image="i", without=without)
    assert (exc.value.line, exc.value.field) == (line, field), str(exc.value)
    assert needle in exc.value.reason


def test_cli_refusal_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL + "    restart: never\n")
    proc = cli("export", "kubernetes", "--config", str(path), "--image", "i")
    assert proc.returncode == 2
    assert f"{path}:8: stages.sink.restart: restart: never cannot hold on Kubernetes" in proc.stderr
    assert proc.stdout == ""


def test_bad_config_exits_2_as_validate_does(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL.replace("inputs: [gen]", "inputs: [gen, nope]"))
    export = cli("export", "kubernetes", "--config", str(path), "--image", "i")
    validate = cli("validate", "--config", str(path))
    assert export.returncode == validate.returncode == 2
    assert f"{path}:7: stages.sink.inputs[1]: unknown stage 'nope'" in export.stderr
    assert export.stderr == validate.stderr


@pytest.mark.parametrize("option,value", [("--namespace", "Not_OK"), ("--storage", "lots"), ("--image", "two words")])
def test_bad_option_is_a_usage_error(tmp_path: Path, option: str, value: str) -> None:
    args = {"--image": "i", option: value}
    proc = cli("export", "kubernetes", "--config", str(write(tmp_path, SMALL)), *[x for kv in args.items() for x in kv])
    assert proc.returncode == 2 and option in proc.stderr and proc.stdout == ""


# -- the image -------------------------------------------------------------------------------------

def test_dockerfile_builds_what_the_manifests_expect() -> None:
    commands = dockerfile.parse_file(str(REPO / "Dockerfile"))
    stages: list[list[dockerfile.Command]] = []
    for c in commands:
        if c.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(c)
    assert len(stages) == 2, "a build stage and a runtime stage"
    build, final = stages

    def last(stage: list[dockerfile.Command], cmd: str) -> tuple[str, ...]:
        values = [c.value for c in stage if c.cmd == cmd]
        assert values, f"no {cmd}"
        return values[-1]

    assert last(final, "USER") == (f"{k8s.RUN_AS}:{k8s.RUN_AS}",)   # numeric: runAsNonRoot can check it
    assert last(final, "WORKDIR") == (k8s.PIPELINE_DIR,)
    assert last(final, "ENTRYPOINT") == ("streampipe",)             # the manifests' command
    exposed = {int(p) for c in final if c.cmd == "EXPOSE" for p in c.value}
    assert {k8s.DATA_PORT, k8s.ACK_PORT, k8s.HEALTH_PORT} <= exposed
    run = " ".join(" ".join(c.value) for c in final if c.cmd == "RUN")
    assert f"--uid {k8s.RUN_AS}" in run and f"install -d -o {k8s.RUN_AS} -g {k8s.RUN_AS} -m 0700 {k8s.CLAIM_DIR}" in run
    assert "streampipe validate" in run   # a broken pipeline fails the build, not the pods
    # what the build stage copies exists and is not left out of the context by .dockerignore
    ignored = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for c in build:
        if c.cmd == "COPY":
            for source in c.value[:-1]:
                assert (REPO / source).exists(), source
                assert not any(fnmatch.fnmatch(source, p) for p in ignored), source
    # the README makes the keys beside services.yaml (keys/): their secret halves stay out of the image
    assert any(fnmatch.fnmatch("keys/server.key_secret", p) for p in ignored)
    # the default pipeline folder (ARG PIPELINE=.) has a services.yaml for /pipeline
    [arg] = [c.value[0] for c in final if c.cmd == "ARG" and c.value[0].startswith("PIPELINE=")]
    folder = REPO / arg.partition("=")[2]
    assert (folder / "services.yaml").is_file()
    assert [c.value for c in final if c.cmd == "COPY"] == [("${PIPELINE}/", f"{k8s.PIPELINE_DIR}/")]


def test_output_folder_drops_an_earlier_exports_stale_files(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SMALL + "  extra: {type: consumer, inputs: [gen]}\n"), check_stages=False)
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "kustomization.yaml").write_text("resources: []\n")   # not ours: kept
    first, _ = k8s.write_manifests(k8s.export(cfg, image="i").objects, out)
    second, stale = k8s.write_manifests(k8s.export(cfg, image="i", without=["extra"]).objects, out)
    assert {p.name for p in stale} == {p.name for p in first} - {p.name for p in second}
    assert any("p-extra" in p.name for p in stale)
    assert sorted(out.iterdir()) == sorted([*second, out / "kustomization.yaml"])
