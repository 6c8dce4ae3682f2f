"""The Helm chart, linted and rendered by Helm's own engine, offline.

`helm-python-sdk` embeds Helm v4's Go SDK as a shared library (no `helm`
binary, no cluster, no network). Loading a Go runtime into the pytest
process would leave it there for every later test, so all Helm calls run
in one child process, in one batch, and come back as JSON.

Every rendered object is validated against the Kubernetes JSON schemas
that `kubernetes-validate` ships (oldest supported and newest release);
KEDA's custom resources have no schema there, so their shape is asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared.auth import parse_keys

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "baton"
CI_DIR = CHART / "ci"
CONFIG_SOURCE = ROOT / "shared" / "config.py"
RELEASE = "rel"
NAMESPACE = "baton-test"
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
PORTS = {"gateway": 8080, "scheduler": 8081}
LONGEST_POLL_SECONDS = 5
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)

SCENARIOS: dict[str, dict[str, Any]] = {"default": {}}
for _path in sorted(CI_DIR.glob("*.yaml")):
    SCENARIOS[_path.stem] = yaml.safe_load(_path.read_text()) or {}

# Values the schema must refuse, with the message Helm must give.
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "replicas-string": (
        {"gateway": {"replicas": "two"}},
        r"/gateway/replicas.*got string, want integer",
    ),
    "replicas-negative": (
        {"gateway": {"replicas": -1}},
        r"/gateway/replicas.*minimum: got -1, want 0",
    ),
    "scheduler-replicas-float": (
        {"scheduler": {"replicas": 1.5}},
        r"/scheduler/replicas.*want integer",
    ),
    "tag-number": ({"image": {"tag": 1}}, r"/image/tag.*got number, want string"),
    "resources-string": (
        {"gateway": {"resources": "big"}},
        r"/gateway/resources.*got string, want object",
    ),
    "url-number": (
        {"connection": {"amqpUrl": 5}},
        r"/connection/amqpUrl.*got number, want string",
    ),
    "queue-type": ({"config": {"queueType": "fifo"}}, r"/config/queueType"),
    "grace-too-short": (
        {"terminationGracePeriodSeconds": 3},
        r"/terminationGracePeriodSeconds.*minimum",
    ),
    "unknown-key": ({"gatway": {"replicas": 2}}, r"additional properties 'gatway'"),
    "keda-target": ({"keda": {"target": "worker"}}, r"/keda/target"),
    "monitor-interval": (
        {"metrics": {"serviceMonitor": {"interval": "often"}}},
        r"/metrics/serviceMonitor/interval",
    ),
    "auth-key-without-hash": (
        {"auth": {"keys": ["billing-worker:secret"]}},
        r"/auth/keys/0",
    ),
    "auth-short-signing-key": (
        {"auth": {"signingKey": "too-short"}},
        r"/auth/signingKey",
    ),
    "auth-ttl-zero": ({"auth": {"tokenTtlSeconds": 0}}, r"/auth/tokenTtlSeconds"),
}

# Values the schema accepts but the templates refuse, with their message.
REFUSED_BY_TEMPLATES: dict[str, tuple[dict[str, Any], str]] = {
    "grace-below-poll-plus-shutdown": (
        {"terminationGracePeriodSeconds": 15, "config": {"shutdownGraceSeconds": 10}},
        r"terminationGracePeriodSeconds \(15\) must exceed",
    ),
    "keda-without-queue": (
        {"keda": {"enabled": True}},
        r"keda.enabled needs keda.taskType",
    ),
    "keda-and-hpa": (
        {
            "keda": {"enabled": True, "taskType": "t"},
            "gateway": {"autoscaling": {"enabled": True}},
        },
        r"both scale the same Deployment",
    ),
    "auth-without-keys": (
        {"auth": {"enabled": True, "signingKey": "s" * 32}},
        r"auth.keys is required",
    ),
    "auth-without-signing-key": (
        {"auth": {"enabled": True, "keys": [f"k:scrypt:16384:8:1:{'A' * 22}:x"]}},
        r"auth.signingKey is required",
    ),
}

EXTRA_RENDERS: dict[str, dict[str, Any]] = {
    "replicas-5-0": {"gateway": {"replicas": 5}, "scheduler": {"replicas": 0}},
    "keda-scheduler": {
        "keda": {"enabled": True, "target": "scheduler", "queueName": "x.task.y"}
    },
    "auth-existing-secret": {
        "auth": {
            "enabled": True,
            "existingSecret": "baton-auth",
            "keysKey": "keys",
            "signingKeyKey": "signing-key",
        }
    },
}

_CHILD = r"""
import json, sys
import helm_python as helm

chart_dir, release, namespace = sys.argv[1:4]
jobs = json.load(sys.stdin)
results = {}
with helm.Chart.load(chart_dir) as chart:
    for key, job in jobs.items():
        try:
            if job["op"] == "lint":
                out = helm.lint(chart_dir, job["values"], strict=True)
            elif job["op"] == "validate":
                out = chart.validate_schema(job["values"])
            else:
                out = chart.render(
                    job["values"], name=release, namespace=namespace,
                    is_install=True,
                )
            results[key] = {"ok": True, "out": out}
        except helm.HelmError as exc:
            results[key] = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
json.dump(results, sys.stdout)
"""


def _jobs() -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    for name, values in {**SCENARIOS, **EXTRA_RENDERS}.items():
        jobs[f"render:{name}"] = {"op": "render", "values": values}
    for name, values in SCENARIOS.items():
        jobs[f"lint:{name}"] = {"op": "lint", "values": values}
        jobs[f"validate:{name}"] = {"op": "validate", "values": values}
    for name, (values, _) in {**BAD_VALUES, **REFUSED_BY_TEMPLATES}.items():
        jobs[f"render:{name}"] = {"op": "render", "values": values}
    for name, (values, _) in BAD_VALUES.items():
        jobs[f"validate:{name}"] = {"op": "validate", "values": values}
    return jobs


@cache
def helm_results() -> dict[str, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(CHART), RELEASE, NAMESPACE],
        input=json.dumps(_jobs()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    return results


def result(key: str) -> dict[str, Any]:
    return helm_results()[key]


@cache
def manifests(scenario: str) -> tuple[dict[str, Any], ...]:
    rendered = result(f"render:{scenario}")
    assert rendered["ok"], rendered["error"]
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered["out"].items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return tuple(docs)


def objects(scenario: str, kind: str) -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for doc in manifests(scenario)
        if doc["kind"] == kind
    }


def name_of(component: str) -> str:
    return f"{RELEASE}-baton-{component}"


def deployment(scenario: str, component: str) -> dict[str, Any]:
    return objects(scenario, "Deployment")[name_of(component)]


def container(scenario: str, component: str) -> dict[str, Any]:
    (only,) = deployment(scenario, component)["spec"]["template"]["spec"]["containers"]
    return only


def env_of(scenario: str, component: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(scenario, component).get("env", [])}


def configmap(scenario: str) -> dict[str, str]:
    data: dict[str, str] = objects(scenario, "ConfigMap")[f"{RELEASE}-baton"]["data"]
    return data


def config_names() -> set[str]:
    source = CONFIG_SOURCE.read_text()
    return set(re.findall(r'"((?:AMQP_URL|MONGODB_URL|BATON_[A-Z_]+))"', source))


ALL_RENDERS = sorted({**SCENARIOS, **EXTRA_RENDERS})
COMPONENTS = sorted(PORTS)


# Lint and schemas.


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chart_lints_clean(scenario: str) -> None:
    linted = result(f"lint:{scenario}")
    assert linted["ok"], linted.get("error")
    report = linted["out"]
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info, e.g. "icon is
    # recommended") is allowed.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_values_pass_the_chart_schema(scenario: str) -> None:
    validated = result(f"validate:{scenario}")
    assert validated["ok"], validated.get("error")


@pytest.mark.parametrize("scenario", ALL_RENDERS)
def test_manifests_match_kubernetes_schemas(scenario: str) -> None:
    checked = 0
    for doc in manifests(scenario):
        if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue  # a CRD: shape asserted in the KEDA and monitor tests
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("scenario", ALL_RENDERS)
def test_recommended_labels_everywhere(scenario: str) -> None:
    for doc in manifests(scenario):
        labels = doc["metadata"]["labels"]
        for label in RECOMMENDED_LABELS:
            assert labels.get(label), f"{doc['kind']} lacks {label}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert doc["metadata"]["namespace"] == NAMESPACE
    for component in COMPONENTS:
        dep = deployment(scenario, component)
        for meta in (dep["metadata"], dep["spec"]["template"]["metadata"]):
            assert meta["labels"]["app.kubernetes.io/component"] == component
        selector = dep["spec"]["selector"]["matchLabels"]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()


def test_defaults_render_core_kinds_and_only_served_endpoints() -> None:
    kinds = {doc["kind"] for doc in manifests("default")}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    }
    for scenario in ALL_RENDERS:
        text = json.dumps(manifests(scenario))
        paths = set(re.findall(r'"path": "([^"]*)"', text))
        assert paths <= {"/health", "/ready", "/metrics"}, paths


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_schema_refuses_bad_values(name: str) -> None:
    _, message = BAD_VALUES[name]
    for op in ("validate", "render"):
        refused = result(f"{op}:{name}")
        assert not refused["ok"], f"{op} accepted {name}"
        assert refused["type"] == "HelmValuesError"
        # validate_schema names the chart; render also says what failed.
        assert "baton:" in refused["error"]
        if op == "render":
            assert "don't meet the specifications of the schema" in refused["error"]
        assert re.search(message, refused["error"]), refused["error"]


@pytest.mark.parametrize("name", sorted(REFUSED_BY_TEMPLATES))
def test_templates_refuse_inconsistent_values(name: str) -> None:
    _, message = REFUSED_BY_TEMPLATES[name]
    refused = result(f"render:{name}")
    assert not refused["ok"], f"render accepted {name}"
    assert re.search(message, refused["error"]), refused["error"]


# Deployments.


@pytest.mark.parametrize("scenario", ALL_RENDERS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_probes_hit_health_and_ready_on_the_service_port(
    scenario: str, component: str
) -> None:
    main = container(scenario, component)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert list(ports.values()) == [PORTS[component]]
    port_env = "BATON_PORT" if component == "gateway" else "BATON_SCHEDULER_PORT"
    assert env_of(scenario, component)[port_env]["value"] == str(PORTS[component])
    module = f"services.{component}"
    assert main["command"] == ["python", "-m", module]
    paths = {
        "startupProbe": "/health",
        "livenessProbe": "/health",
        "readinessProbe": "/ready",
    }
    for probe, path in paths.items():
        get = main[probe]["httpGet"]
        assert get["path"] == path
        port = get["port"]
        assert ports.get(port, port) == PORTS[component]
        # /ready waits up to 5 s for RabbitMQ and MongoDB itself.
        assert main[probe]["timeoutSeconds"] > 5


@pytest.mark.parametrize("scenario", ALL_RENDERS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_urls_come_from_the_secret(scenario: str, component: str) -> None:
    values = {**SCENARIOS, **EXTRA_RENDERS}[scenario]
    existing = values.get("connection", {}).get("existingSecret")
    secrets = objects(scenario, "Secret")
    if existing:
        assert secrets == {}
        secret_name = existing
        keys = {
            "AMQP_URL": values["connection"]["amqpUrlKey"],
            "MONGODB_URL": values["connection"]["mongodbUrlKey"],
        }
    else:
        secret_name = f"{RELEASE}-baton"
        keys = {"AMQP_URL": "AMQP_URL", "MONGODB_URL": "MONGODB_URL"}
        assert set(secrets[secret_name]["stringData"]) == set(keys.values())
    env = env_of(scenario, component)
    for variable, key in keys.items():
        assert "value" not in env[variable]
        assert env[variable]["valueFrom"]["secretKeyRef"] == {
            "name": secret_name,
            "key": key,
        }
    # Nothing else carries a URL in clear.
    assert not {"AMQP_URL", "MONGODB_URL"} & set(configmap(scenario))


@pytest.mark.parametrize("scenario", ALL_RENDERS)
def test_gateway_leaves_the_scheduler_to_its_deployment(scenario: str) -> None:
    assert env_of(scenario, "gateway")["BATON_RUN_SCHEDULER"]["value"] == "false"
    assert "BATON_RUN_SCHEDULER" not in env_of(scenario, "scheduler")
    assert "BATON_RUN_SCHEDULER" not in configmap(scenario)


@pytest.mark.parametrize("scenario", ALL_RENDERS)
def test_configmap_names_only_variables_baton_reads(scenario: str) -> None:
    data = configmap(scenario)
    assert set(data) <= config_names()
    assert data["BATON_MAX_POLL_TIMEOUT_MS"] == "5000"
    for component in COMPONENTS:
        (source,) = container(scenario, component)["envFrom"]
        assert source["configMapRef"]["name"] == f"{RELEASE}-baton"
        assert set(env_of(scenario, component)) <= config_names()
    if scenario == "keda-values":
        assert data["BATON_QUEUE_PREFIX"] == "prod"


@pytest.mark.parametrize("scenario", ALL_RENDERS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_grace_period_outlasts_poll_and_shutdown(scenario: str, component: str) -> None:
    data = configmap(scenario)
    pod = deployment(scenario, component)["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == 30
    poll = int(data["BATON_MAX_POLL_TIMEOUT_MS"]) / 1000
    assert poll <= LONGEST_POLL_SECONDS
    assert grace > LONGEST_POLL_SECONDS + int(data["BATON_SHUTDOWN_GRACE_SECONDS"])


@pytest.mark.parametrize("scenario", ALL_RENDERS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_resources_and_security_follow_values(scenario: str, component: str) -> None:
    main = container(scenario, component)
    assert (
        main["resources"]
        == yaml.safe_load((CHART / "values.yaml").read_text())[component]["resources"]
    )
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    pod = deployment(scenario, component)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True


# Replicas, autoscaling, disruption budgets.


def test_replicas_follow_values() -> None:
    assert deployment("default", "gateway")["spec"]["replicas"] == 2
    assert deployment("default", "scheduler")["spec"]["replicas"] == 1
    assert deployment("replicas-5-0", "gateway")["spec"]["replicas"] == 5
    assert deployment("replicas-5-0", "scheduler")["spec"]["replicas"] == 0
    assert objects("default", "HorizontalPodAutoscaler") == {}


def test_hpa_min_and_max_follow_values() -> None:
    values = SCENARIOS["hpa-values"]
    hpas = objects("hpa-values", "HorizontalPodAutoscaler")
    assert set(hpas) == {name_of(c) for c in COMPONENTS}
    for component in COMPONENTS:
        wanted = values[component]["autoscaling"]
        spec = hpas[name_of(component)]["spec"]
        assert hpas[name_of(component)]["apiVersion"] == "autoscaling/v2"
        assert spec["minReplicas"] == wanted["minReplicas"]
        assert spec["maxReplicas"] == wanted["maxReplicas"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name_of(component),
        }
        # The HPA owns the replica count.
        assert "replicas" not in deployment("hpa-values", component)["spec"]
    gateway = hpas[name_of("gateway")]["spec"]
    assert gateway["minReplicas"] == values["gateway"]["replicas"] == 3
    (metric,) = gateway["metrics"]
    assert metric["resource"]["target"]["averageUtilization"] == 60


def test_pdbs() -> None:
    default = objects("default", "PodDisruptionBudget")
    assert set(default) == {name_of("gateway")}
    gateway = default[name_of("gateway")]["spec"]
    assert gateway["minAvailable"] == 1
    pods = deployment("default", "gateway")["spec"]["template"]["metadata"]
    assert gateway["selector"]["matchLabels"].items() <= pods["labels"].items()
    with_scheduler = objects("existing-secret-values", "PodDisruptionBudget")
    assert with_scheduler[name_of("scheduler")]["spec"]["maxUnavailable"] == 1


def test_gateway_service() -> None:
    service = objects("default", "Service")[name_of("gateway")]["spec"]
    (port,) = service["ports"]
    assert port["port"] == 8080
    assert port["targetPort"] == "http"
    pods = deployment("default", "gateway")["spec"]["template"]["metadata"]
    assert service["selector"].items() <= pods["labels"].items()
    assert service["selector"]["app.kubernetes.io/component"] == "gateway"


# KEDA.


def _keda(scenario: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (scaled,) = objects(scenario, "ScaledObject").values()
    (auth,) = objects(scenario, "TriggerAuthentication").values()
    for doc in (scaled, auth):
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
    return scaled, auth


def test_keda_scales_the_gateway_on_a_task_queue() -> None:
    values = SCENARIOS["keda-values"]["keda"]
    scaled, auth = _keda("keda-values")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name_of("gateway"),
    }
    assert spec["minReplicaCount"] == values["minReplicaCount"]
    assert spec["maxReplicaCount"] == values["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    # Baton's queues are {BATON_QUEUE_PREFIX}.task.{taskType}.
    assert trigger["metadata"]["queueName"] == "prod.task.encode"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["value"] == "50"
    assert "host" not in trigger["metadata"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": f"{RELEASE}-baton", "key": "AMQP_URL"}
    ]
    assert "replicas" not in deployment("keda-values", "gateway")["spec"]
    assert deployment("keda-values", "scheduler")["spec"]["replicas"] == 1
    assert objects("default", "ScaledObject") == {}


def test_keda_can_scale_the_scheduler_on_a_named_queue() -> None:
    scaled, _ = _keda("keda-scheduler")
    assert scaled["spec"]["scaleTargetRef"]["name"] == name_of("scheduler")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["queueName"] == "x.task.y"
    assert "replicas" not in deployment("keda-scheduler", "scheduler")["spec"]
    assert deployment("keda-scheduler", "gateway")["spec"]["replicas"] == 2


def test_monitors_scrape_metrics_on_each_service_port() -> None:
    scenario = "servicemonitor-values"
    (service_monitor,) = objects(scenario, "ServiceMonitor").values()
    (pod_monitor,) = objects(scenario, "PodMonitor").values()
    (service,) = objects(scenario, "Service").values()
    deployments = objects(scenario, "Deployment")

    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        service_monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )
    assert service_monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s"}
    ]
    scheduler = deployments[name_of("scheduler")]
    pod_labels = scheduler["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    ports = scheduler["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert any(p["name"] == "http" for p in ports)
    assert objects("default", "ServiceMonitor") == {}
    assert objects("default", "PodMonitor") == {}


# Authentication.

AUTH_VARIABLES = {"BATON_AUTH_KEYS", "BATON_AUTH_SIGNING_KEY"}


def test_auth_is_off_unless_enabled() -> None:
    for scenario in ("default", "existing-secret-values"):
        assert set(objects(scenario, "Secret")) <= {f"{RELEASE}-baton"}
        for component in COMPONENTS:
            assert not {n for n in env_of(scenario, component) if "AUTH" in n}


def test_auth_values_become_a_secret_the_gateway_reads() -> None:
    values = SCENARIOS["auth-values"]["auth"]
    secret_name = f"{RELEASE}-baton-auth"
    data = objects("auth-values", "Secret")[secret_name]["stringData"]
    assert set(data) == AUTH_VARIABLES
    assert data["BATON_AUTH_SIGNING_KEY"] == values["signingKey"]
    keys = parse_keys(data["BATON_AUTH_KEYS"])
    assert list(keys) == ["billing-worker", "reports-worker"]

    env = env_of("auth-values", "gateway")
    for variable in AUTH_VARIABLES:
        assert "value" not in env[variable]
        assert env[variable]["valueFrom"]["secretKeyRef"] == {
            "name": secret_name,
            "key": variable,
        }
    assert env["BATON_AUTH_TOKEN_TTL_SECONDS"]["value"] == "1800"
    assert not {n for n in env_of("auth-values", "scheduler") if "AUTH" in n}
    assert not AUTH_VARIABLES & set(configmap("auth-values"))
    # A key or signing key change rolls the gateway's pods.
    pod = deployment("auth-values", "gateway")["spec"]["template"]["metadata"]
    assert "checksum/auth-secret" in pod["annotations"]


def test_auth_can_read_a_secret_you_manage() -> None:
    scenario = "auth-existing-secret"
    assert f"{RELEASE}-baton-auth" not in objects(scenario, "Secret")
    env = env_of(scenario, "gateway")
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in AUTH_VARIABLES}
    assert refs == {
        "BATON_AUTH_KEYS": {"name": "baton-auth", "key": "keys"},
        "BATON_AUTH_SIGNING_KEY": {"name": "baton-auth", "key": "signing-key"},
    }
    assert env["BATON_AUTH_TOKEN_TTL_SECONDS"]["value"] == "3600"
    pod = deployment(scenario, "gateway")["spec"]["template"]["metadata"]
    assert "checksum/auth-secret" not in pod["annotations"]
