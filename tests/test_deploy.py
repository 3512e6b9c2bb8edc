"""The deployment files, checked offline: there is no container daemon or cluster to run them on.

The Dockerfile must lint clean (hadolint, from the test extra's wheel); every kustomize tree must render
(`kubectl kustomize`) and every object validate strictly against the pinned Kubernetes schemas (kubernetes-validate);
and the rendered pods must say what the tiers need: the right tier on 0.0.0.0, probes on the gRPC health port,
headless Services, grace periods that cover the drain, non-root read-only containers, secrets mounted where the flags
point. The exec probe shipped in the image is run against real health servers, plaintext and mutual TLS.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubernetes_validate.utils import SchemaNotFoundError

from common.serving.health import REPLICA_HEALTH_SERVICE
from tests.tls_for_tests import make_ca

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31.0"  # oldest minor the manifests target (grpc probes GA, preStop sleep on by default)
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no bundled schema: checked by hand below
TREES = ("base", "overlays/example")
TIERS = ("edge", "cloud")
GRPC_PORT, METRICS_PORT = 50051, 9090
PROBE_SCRIPT = "/opt/splitexit/healthcheck.py"


def _tool(name: str) -> str | None:
    """A console script of this interpreter's environment (it may not be on PATH), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@cache
def render(tree: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize trees")
    out = subprocess.run([kubectl, "kustomize", str(K8S / tree)], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def find(docs, kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` and ``--name value`` arguments as a dict (a bare ``--flag`` maps to "")."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = arg, args[i + 1]
                i += 1
            else:
                key, value = arg, ""
            out[key] = value
        i += 1
    return out


def expand(text: str, container: dict, namespace: str) -> str:
    """Kubernetes' $(VAR) expansion of args from the container's env (literal values and the pod's namespace)."""
    values = {}
    for var in container.get("env", []):
        if "value" in var:
            values[var["name"]] = expand(var["value"], {"env": []}, namespace) if "$(" in var["value"] else var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            values[var["name"]] = namespace
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values.get(m.group(1), m.group(0)), text)


def tier_pod(tree: str, tier: str) -> tuple[dict, dict, dict]:
    """(Deployment, its pod spec, its one container)."""
    deployment = find(render(tree), "Deployment", f"splitexit-{tier}")
    spec = deployment["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    return deployment, spec, spec["containers"][0]


def mounts(spec: dict, container: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container.get("volumeMounts", [])}


def mounted_secret(spec: dict, container: dict, path: str) -> str:
    """The name of the Secret mounted read-only at the folder holding ``path``."""
    mount, volume = mounts(spec, container)[str(Path(path).parent)]
    assert mount.get("readOnly") is True
    assert "secret" in volume, f"{path} is not from a Secret"
    return volume["secret"]["secretName"]


# --- the image ---------------------------------------------------------------------------------------------------

def test_dockerfile_lints_clean():
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]'"
    # The linter is live: it does flag an unpinned base image and pip install.
    bad = subprocess.run([hadolint, "--no-color", "-"], input="FROM python\nRUN pip install requests\n",
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "DL3006" in bad.stdout
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_runs_any_tier_as_non_root_with_the_pinned_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^EXPOSE\s+50051\s+9090\s*$", final, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m"\]$', final, re.M)
    assert re.search(r'^CMD \["cloud", .*"--listen", "0\.0\.0\.0:50051"', final, re.M)
    assert f"COPY deploy/healthcheck.py {PROBE_SCRIPT}" in final
    pins = dict(re.findall(r"^\s*\"(torch|torchvision)==([^\"]+)\"", (ROOT / "pyproject.toml").read_text(), re.M))
    assert f"ARG TORCH_VERSION={pins['torch']}\n" in text
    assert f"ARG TORCHVISION_VERSION={pins['torchvision']}\n" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "deploy" not in ignored and "deploy/healthcheck.py" not in ignored and "README.md" not in ignored


# --- rendering and schemas ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tree", TREES)
def test_every_object_validates_strictly(tree):
    docs = render(tree)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, f"no schema for {doc['kind']}"


def test_strict_validation_rejects_an_unknown_field():
    deployment = yaml.safe_load(yaml.safe_dump(find(render("base"), "Deployment", "splitexit-edge")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- what the pods must say --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("tier", TIERS)
def test_tier_command_grace_and_security(tree, tier):
    deployment, spec, container = tier_pod(tree, tier)
    args = container["args"]
    assert args[0] == tier  # the image's ENTRYPOINT is `python -m`
    f = flags(args[1:])
    assert f["--listen"] == f"0.0.0.0:{GRPC_PORT}" and int(f["--metrics-port"]) == METRICS_PORT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}

    prestop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] >= prestop + float(f["--grace"]) + 1
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"

    pod_sc, sc = spec["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec.get("automountServiceAccountToken") is False

    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    assert int(f["--threads"]) <= float(resources["limits"]["cpu"])  # torch threads fit the CPU limit

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == METRICS_PORT and annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("tier", TIERS)
def test_bundle_and_secrets_are_mounted_where_the_flags_point(tree, tier):
    _, spec, container = tier_pod(tree, tier)
    f = flags(container["args"][1:])
    mount, volume = mounts(spec, container)["/bundle"]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["claimName"] == "splitexit-bundles"
    assert f["--bundle"] == f"/bundle/{tier}"
    assert mounted_secret(spec, container, f["--token-file"]) == "splitexit-token"
    if tree == "base":
        assert not any(k.startswith("--tls") for k in f)
    else:
        for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
            assert mounted_secret(spec, container, f[flag]) == f"splitexit-{tier}-tls"


@pytest.mark.parametrize("tier", TIERS)
def test_plaintext_pods_use_the_kubelets_grpc_probe_on_the_health_port(tier):
    _, _, container = tier_pod("base", tier)
    health_probe = {"port": GRPC_PORT, "service": ""}
    if tier == "cloud":
        assert container["readinessProbe"]["grpc"] == health_probe
        assert container["startupProbe"]["grpc"] == health_probe
        assert container["livenessProbe"]["grpc"] == health_probe
    else:  # the edge's health "" follows the cloud's; its readiness and liveness must not
        assert container["readinessProbe"]["grpc"] == {"port": GRPC_PORT, "service": REPLICA_HEALTH_SERVICE}
        assert container["livenessProbe"]["tcpSocket"]["port"] == GRPC_PORT


@pytest.mark.parametrize("tier", TIERS)
def test_mutual_tls_pods_probe_with_their_own_certificate(tier):
    deployment, spec, container = tier_pod("overlays/example", tier)
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        assert set(probe) & {"grpc", "tcpSocket", "httpGet"} == set()  # the kubelet cannot present a client cert
        command = probe["exec"]["command"]
        assert command[:2] == ["python", PROBE_SCRIPT]
        tls_dir = flags(command[2:])["--tls-dir"]
        assert mounted_secret(spec, container, f"{tls_dir}/tls.crt") == f"splitexit-{tier}-tls"
        assert ("--live" in command) == (kind == "livenessProbe")
        if tier == "edge" and kind == "readinessProbe":
            assert flags(command[2:])["--service"] == REPLICA_HEALTH_SERVICE
    namespace = deployment["metadata"]["namespace"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert expand(env["SPLITEXIT_PROBE_SERVER_NAME"], container, namespace) == \
        f"splitexit-{tier}.{namespace}.svc.cluster.local"


@pytest.mark.parametrize("tree", TREES)
def test_edge_reaches_the_cloud_pool_through_dns(tree):
    docs = render(tree)
    deployment, _, container = tier_pod(tree, "edge")
    namespace = deployment["metadata"].get("namespace", "default")
    target = expand(flags(container["args"][1:])["--next"], container, namespace)
    assert target == f"dns:///splitexit-cloud.{namespace}.svc.cluster.local:{GRPC_PORT}"
    cloud = find(docs, "Service", "splitexit-cloud")
    assert cloud["metadata"].get("namespace", "default") == namespace
    _, _, cloud_container = tier_pod(tree, "cloud")
    assert "--next" not in flags(cloud_container["args"][1:])  # the last tier


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("tier", TIERS)
def test_services_budgets_and_autoscalers_point_at_the_pods(tree, tier):
    docs = render(tree)
    deployment, _, _ = tier_pod(tree, tier)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    name = f"splitexit-{tier}"

    service = find(docs, "Service", name)["spec"]
    assert service["clusterIP"] == "None"  # headless: clients balance over the pod addresses
    assert {p["name"]: p["port"] for p in service["ports"]} == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert service["selector"].items() <= pod_labels.items()

    budget = find(docs, "PodDisruptionBudget", name)["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = find(docs, "HorizontalPodAutoscaler", name)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])


def test_custom_metric_autoscaling_reads_a_series_the_tiers_export():
    hpa = find(render("overlays/example"), "HorizontalPodAutoscaler", "splitexit-edge")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics == ["splitexit_samples_per_second"]
    rules = yaml.safe_load((K8S / "overlays/example/prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule["seriesQuery"] for rule in rules}
    series = re.match(r"\s*'?([a-z_:]+)\{", served[pods_metrics[0]]).group(1)
    assert series.endswith("_total")  # a counter, read through rate()
    counter = series.removesuffix("_total")
    sources = "".join(p.read_text() for p in (ROOT / "common").rglob("*.py"))
    assert re.search(rf'Counter\(\s*"{counter}"', sources), f"no tier exports the counter {counter}"


def test_service_monitor_scrapes_the_metrics_port_of_both_services():
    docs = render("overlays/example")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert (monitor["apiVersion"], monitor["kind"]) in CRD_KINDS
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [d for d in docs if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()]
    assert sorted(s["metadata"]["name"] for s in selected) == ["splitexit-cloud", "splitexit-edge"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_device_unit_drains_before_systemd_kills_it():
    unit = (DEPLOY / "device" / "splitexit-device.service").read_text().replace("\\\n", " ")
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    assert exec_start[1:3] == ["-m", "device"]
    f = flags(exec_start[3:])
    assert f["--next"] and f["--bundle"] and f["--token-file"].startswith("${CREDENTIALS_DIRECTORY}/")
    stop = float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    assert stop > float(f["--grace"])


# --- the exec probe shipped in the image ---------------------------------------------------------------------------

def _load_probe():
    spec = importlib.util.spec_from_file_location("splitexit_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def health_server():
    """Start a health-only gRPC server; yields a function (credentials) -> (port, servicer)."""
    servers = []

    def start(credentials=None):
        server = grpc.server(ThreadPoolExecutor(2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
                else server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
        return port, servicer

    yield start
    for server in servers:
        server.stop(0)


def test_probe_passes_on_serving_and_liveness_on_any_answer(health_server):
    probe = _load_probe()
    port, servicer = health_server()
    addr = f"--addr=127.0.0.1:{port}"
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.main([addr]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # loading, draining, or the next tier is down
    assert probe.main([addr]) == 1
    assert probe.main([addr, "--live"]) == 0
    assert probe.main([addr, "--live", "--service=no.such.Service"]) == 1


def test_probe_fails_when_nothing_answers():
    probe = _load_probe()
    with socket.socket() as s:  # a port with no server behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe.main([f"--addr=127.0.0.1:{port}", "--timeout=0.5", "--live"]) == 1


def test_probe_speaks_mutual_tls_where_a_plaintext_probe_cannot(health_server, tmp_path):
    try:
        ca = make_ca(tmp_path / "ca", leaves=("server", "pod"))
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    credentials = grpc.ssl_server_credentials([((ca / "server.key").read_bytes(), (ca / "server.pem").read_bytes())],
                                              root_certificates=(ca / "ca.pem").read_bytes(),
                                              require_client_auth=True)
    port, servicer = health_server(credentials)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    tls = tmp_path / "tls"  # laid out like the mounted Secret
    tls.mkdir()
    for src, dst in (("pod.pem", "tls.crt"), ("pod.key", "tls.key"), ("ca.pem", "ca.crt")):
        shutil.copy(ca / src, tls / dst)
    probe = _load_probe()
    assert probe.main([f"--addr=127.0.0.1:{port}", "--timeout=1"]) == 1  # what the kubelet's grpc probe would get
    assert probe.main([f"--addr=127.0.0.1:{port}", f"--tls-dir={tls}", "--server-name=localhost"]) == 0
