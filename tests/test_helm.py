"""Tests of the Helm chart in helm/celery-events-exporter.

The chart is rendered and linted by Helm's own Go code through helm-python-sdk
(``helm_python``: ``Chart.load``, ``Chart.render``, ``Chart.validate_schema``
and ``lint``), so no helm binary is needed. Every rendered manifest is then
validated with kubernetes-validate against the Kubernetes JSON schemas it
ships, except the prometheus-operator kinds (CRDs), whose structure is checked
here by hand.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import Config, load

try:
    import helm_python as helm
except (ImportError, OSError) as exc:  # OSError: the bundled libhelm_c failed to load
    pytest.fail(
        f"helm-python-sdk is not usable ({exc}): pip install 'helm-python-sdk>=0.2.2' "
        "(or pip install -e '.[test]')",
        pytrace=False,
    )
try:
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions
except ImportError as exc:
    pytest.fail(
        f"kubernetes-validate is missing ({exc}): pip install 'kubernetes-validate>=1.31' "
        "(or pip install -e '.[test]')",
        pytrace=False,
    )

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "helm" / "celery-events-exporter"
CI_DIR = CHART_DIR / "ci"
SYNC_SCRIPT = ROOT / "scripts" / "sync-chart-files.sh"
RULES_SOURCE = ROOT / "config" / "prometheus" / "alerts.yaml"
RULES_COPY = CHART_DIR / "files" / "alerts.yaml"
DASHBOARDS_SOURCE = ROOT / "grafana" / "dashboards"
DASHBOARDS_COPY = CHART_DIR / "files" / "dashboards"

RELEASE = "rel"
NAMESPACE = "monitoring"
FULLNAME = f"{RELEASE}-celery-events-exporter"
TEMPLATE = "celery-events-exporter/templates/{}"

# The chart declares kubeVersion >=1.25; validate against a version in the middle
# of what clusters run today. kubernetes-validate ships schemas for it.
KUBE_VERSION = "1.30.0"

# A recognisable fake broker URL: it must appear only in the Secret (base64).
FAKE_BROKER_URL = "redis://:s3cret@redis:6379/0"
FAKE_PASSWORD = "s3cret"

# The daemon's YAML config keys (its configuration contract), minus broker_url.
CONFIG_KEYS = {
    "broker_transport_options", "broker_ssl_options", "events_exchange", "event_queue_ttl",
    "event_queue_expires", "host", "port", "log_level", "log_format", "max_tracked_tasks",
    "default_queue", "runtime_buckets", "wait_buckets", "static_labels", "worker_timeout",
    "purge_offline_after", "queues", "queue_poll_interval", "enable_events",
    "enable_events_interval", "otlp_traces", "trace_sample_ratio", "max_label_values",
    "web_config_file", "inspect_interval", "inspect_timeout", "flower_metrics",
    "task_objectives", "task_expected_intervals",
}  # fmt: skip

# prometheus-operator kinds are CRDs: kubernetes-validate has no schema for them,
# so their schema validation is skipped and check_crd() checks their structure.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def ci_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI_DIR / name).read_text()) or {}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Everything on: the all-on scenario plus every pass-through value the templates have.
EVERYTHING = deep_merge(
    ci_values("all-on-values.yaml"),
    {
        "image": {"registry": "ghcr.io/acme", "digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "platform"},
        "podAnnotations": {"example.com/note": "yes"},
        "podLabels": {"tier": "monitoring"},
        "serviceAccount": {"annotations": {"example.com/role": "none"}},
        "service": {"annotations": {"example.com/svc": "yes"}, "labels": {"svc": "yes"}},
        "extraEnvFrom": [{"configMapRef": {"name": "otel-settings"}}],
        "extraArgs": ["--log-level", "debug"],
        "extraVolumes": [{"name": "web", "secret": {"secretName": "web-config"}}],
        "extraVolumeMounts": [{"name": "web", "mountPath": "/etc/celery-events-exporter/web"}],
        "config": {"web_config_file": "/etc/celery-events-exporter/web/web-config.yaml"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {
                                "matchLabels": {"app.kubernetes.io/name": "celery-events-exporter"}
                            },
                        },
                    }
                ]
            }
        },
        "serviceMonitor": {"annotations": {"example.com/sm": "yes"}},
        "prometheusRule": {"annotations": {"example.com/pr": "yes"}},
        "grafanaDashboards": {"labels": {"team": "platform"}, "annotations": {"a": "b"}},
    },
)

SCENARIOS: dict[str, dict[str, Any] | None] = {
    "chart-defaults": None,
    **{path.name: ci_values(path.name) for path in sorted(CI_DIR.glob("*-values.yaml"))},
    "everything-on": EVERYTHING,
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def chart() -> Any:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce."""
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def objects(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return manifests(render(chart, values))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_var(docs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    matches = [e for e in container(docs).get("env", []) if e["name"] == name]
    assert len(matches) <= 1, f"{name} set twice"
    return matches[0] if matches else None


def config_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = one(docs, "ConfigMap", FULLNAME)
    return yaml.safe_load(cm["data"]["config.yaml"]) or {}


def with_fake_broker(values: dict[str, Any] | None) -> dict[str, Any]:
    values = copy.deepcopy(values or {})
    if not values.get("broker", {}).get("existingSecret"):
        values.setdefault("broker", {})["url"] = FAKE_BROKER_URL
    return values


def check_crd(doc: dict[str, Any]) -> None:
    """Structure of the prometheus-operator objects (monitoring.coreos.com/v1)."""
    kind = doc["kind"]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", kind
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, kind
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    assert all(isinstance(v, str) for v in doc["metadata"].get("labels", {}).values())
    spec = doc["spec"]
    relabel_keys = {"sourceLabels", "separator", "targetLabel", "regex", "modulus",
                    "replacement", "action"}  # fmt: skip
    if kind == "ServiceMonitor":
        assert set(spec) <= {"jobLabel", "selector", "namespaceSelector", "endpoints",
                             "targetLabels", "podTargetLabels", "sampleLimit"}  # fmt: skip
        assert spec["selector"]["matchLabels"]
        assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
        assert spec["endpoints"], "a ServiceMonitor needs endpoints"
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout",
                                     "honorLabels", "tlsConfig", "relabelings",
                                     "metricRelabelings"}  # fmt: skip
            assert endpoint["port"] == "http-metrics"
            assert endpoint["path"] == "/metrics"
            assert endpoint["scheme"] in {"http", "https"}
            for key in ("relabelings", "metricRelabelings"):
                for rule in endpoint.get(key, []):
                    assert isinstance(rule, dict) and set(rule) <= relabel_keys, rule
    elif kind == "PrometheusRule":
        assert set(spec) == {"groups"}
        assert isinstance(spec["groups"], list) and spec["groups"]
        for group in spec["groups"]:
            assert set(group) <= {
                "name",
                "interval",
                "rules",
                "limit",
                "query_offset",
                "partial_response_strategy",
                "labels",
            }, group.keys()
            assert isinstance(group["name"], str) and group["name"]
            for rule in group["rules"]:
                assert set(rule) <= {
                    "record",
                    "alert",
                    "expr",
                    "for",
                    "keep_firing_for",
                    "labels",
                    "annotations",
                }, rule.keys()
                assert ("record" in rule) != ("alert" in rule), rule
                assert isinstance(rule["expr"], str) and rule["expr"].strip()
                for key in ("labels", "annotations"):
                    assert all(isinstance(v, str) for v in rule.get(key, {}).values()), rule
    else:  # pragma: no cover - CRD_KINDS lists the kinds above
        raise AssertionError(kind)


# ---------------------------------------------------------------- chart and lint


def test_kubernetes_validate_ships_the_schemas_we_use() -> None:
    assert KUBE_VERSION.rsplit(".", 1)[0] in {v.rsplit(".", 1)[0] for v in all_versions()}


def test_chart_metadata(chart: Any) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "celery-events-exporter"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"
    assert chart.schema is not None, "values.schema.json is missing"


def test_chart_packages_rules_and_dashboards_but_not_ci(chart: Any) -> None:
    names = {f["name"] for f in chart.files}
    assert not any(n.startswith("ci/") for n in names), ".helmignore must drop ci/"
    if RULES_SOURCE.exists():
        assert "files/alerts.yaml" in names


def test_default_values_pass_the_schema(chart: Any) -> None:
    chart.validate_schema(chart.values)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART_DIR, SCENARIOS[scenario], strict=True,
                       kube_version=f"v{KUBE_VERSION}")  # fmt: skip
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], json.dumps(report, indent=2)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_manifests_are_valid_kubernetes(chart: Any, scenario: str) -> None:
    docs = objects(chart, SCENARIOS[scenario])
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            check_crd(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(exc.message)
        assert doc["metadata"].get("namespace") == NAMESPACE, doc["kind"]


def test_defaults_render_only_the_core_objects(chart: Any) -> None:
    rendered = render(chart)
    docs = manifests(rendered)
    assert kinds(docs) == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    # No broker configured: no Secret, no env, and NOTES says so.
    assert env_var(docs, "CELERY_EXPORTER_BROKER_URL") is None
    assert "WARNING: no broker is configured" in rendered[TEMPLATE.format("NOTES.txt")]


def test_everything_on_renders_every_optional_part(chart: Any) -> None:
    docs = objects(chart, EVERYTHING)
    present = set(kinds(docs))
    assert present >= {"ConfigMap", "Deployment", "Service", "ServiceAccount", "Secret",
                       "ServiceMonitor", "PrometheusRule", "NetworkPolicy",
                       "PodDisruptionBudget"}  # fmt: skip
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] != FULLNAME]
    assert len(dashboards) == len(list(DASHBOARDS_COPY.glob("*.json")))


def test_replica_count(chart: Any) -> None:
    assert one(objects(chart, {"replicaCount": 2}), "Deployment")["spec"]["replicas"] == 2


# ---------------------------------------------------------------- labels


def test_selector_labels_hold_nothing_version_like(chart: Any) -> None:
    docs = objects(chart, EVERYTHING)
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "celery-events-exporter",
                        "app.kubernetes.io/instance": RELEASE}  # fmt: skip
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/version"] == "0.1.0"
    assert pod_labels["helm.sh/chart"] == "celery-events-exporter-0.1.0"
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"] == selector
    assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    # Another image tag changes the labels, never the selector.
    bumped = one(objects(chart, {"image": {"tag": "9.9.9"}}), "Deployment")
    assert bumped["spec"]["selector"]["matchLabels"] == selector
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]
        assert labels["app.kubernetes.io/name"] == "celery-events-exporter", doc["kind"]


# ---------------------------------------------------------------- security


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_and_container_security_context(chart: Any, scenario: str) -> None:
    docs = objects(chart, SCENARIOS[scenario])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    assert psc["fsGroup"] == 10001
    csc = container(docs)["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"]
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc.get("privileged", False) is False
    # The read-only root filesystem needs a writable /tmp.
    tmp = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1
    volume = next(v for v in pod["volumes"] if v["name"] == tmp[0]["name"])
    assert "emptyDir" in volume
    # The exporter never calls the Kubernetes API.
    assert pod["automountServiceAccountToken"] is False
    for sa in (d for d in docs if d["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


def test_resources_are_empty_by_default_and_taken_from_values(chart: Any) -> None:
    assert "resources" not in container(objects(chart))
    resources = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert container(objects(chart, {"resources": resources}))["resources"] == resources


# ---------------------------------------------------------------- probes


def test_probes_hit_healthz_and_readyz(chart: Any) -> None:
    c = container(objects(chart))
    assert c["ports"] == [{"name": "http-metrics", "containerPort": 9808, "protocol": "TCP"}]
    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert live["httpGet"] == {"path": "/healthz", "port": "http-metrics", "scheme": "HTTP"}
    assert ready["httpGet"] == {"path": "/readyz", "port": "http-metrics", "scheme": "HTTP"}


def test_each_probe_takes_its_own_settings(chart: Any) -> None:
    values = {
        "livenessProbe": {"initialDelaySeconds": 11, "periodSeconds": 31, "timeoutSeconds": 7,
                          "failureThreshold": 5},
        "readinessProbe": {"initialDelaySeconds": 2, "periodSeconds": 4, "timeoutSeconds": 1,
                           "failureThreshold": 2},
    }  # fmt: skip
    c = container(objects(chart, values))
    for probe in ("livenessProbe", "readinessProbe"):
        for key, expected in values[probe].items():
            assert c[probe][key] == expected, (probe, key)
    settings = ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold")
    for key in settings:
        assert c["livenessProbe"][key] != c["readinessProbe"][key], key
    # Changing one probe leaves the other alone.
    default = container(objects(chart))
    only_live = container(objects(chart, {"livenessProbe": {"periodSeconds": 59}}))
    assert only_live["livenessProbe"]["periodSeconds"] == 59
    assert only_live["readinessProbe"] == default["readinessProbe"]


def test_probes_can_be_disabled_and_follow_the_config_port(chart: Any) -> None:
    c = container(objects(chart, {"readinessProbe": {"enabled": False}, "config": {"port": 9100}}))
    assert "readinessProbe" not in c and "livenessProbe" in c
    assert "enabled" not in c["livenessProbe"]
    assert c["ports"][0]["containerPort"] == 9100
    https = container(objects(chart, {"probeScheme": "HTTPS"}))
    assert https["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert https["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_config_map_holds_values_config_and_is_mounted(chart: Any, scenario: str) -> None:
    values = SCENARIOS[scenario] or {}
    docs = objects(chart, values)
    config = config_of(docs)
    assert "broker_url" not in config
    assert set(config) <= CONFIG_KEYS, set(config) - CONFIG_KEYS
    expected = deep_merge(chart.values["config"], values.get("config", {}))
    if values.get("otel", {}).get("enabled"):
        expected.setdefault("otlp_traces", True)
    assert config == expected
    c = container(docs)
    assert c["args"][:2] == ["--config", "/etc/celery-events-exporter/config.yaml"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/celery-events-exporter/config.yaml"
    assert mount["subPath"] == "config.yaml" and mount["readOnly"] is True
    volume = next(
        v
        for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "config"
    )
    assert volume["configMap"]["name"] == FULLNAME


def test_config_checksum_rolls_the_pods(chart: Any) -> None:
    def checksum(values: dict[str, Any]) -> str:
        pod = one(objects(chart, values), "Deployment")["spec"]["template"]
        return pod["metadata"]["annotations"]["checksum/config"]

    base = checksum({})
    assert len(base) == 64
    assert checksum({}) == base
    assert checksum({"config": {"log_level": "debug"}}) != base
    assert checksum({"replicaCount": 2}) == base


def test_otel_block_sets_the_standard_env_and_turns_tracing_on(chart: Any) -> None:
    off = objects(chart)
    assert not [e for e in container(off)["env"] if e["name"].startswith("OTEL_")]
    assert "otlp_traces" not in config_of(off)
    values = {"otel": {"enabled": True, "endpoint": "http://collector:4318",
                       "resourceAttributes": {"deployment.environment": "prod"},
                       "headersSecret": {"name": "otel", "key": "headers"}}}  # fmt: skip
    on = objects(chart, values)
    assert env_var(on, "OTEL_EXPORTER_OTLP_ENDPOINT")["value"] == "http://collector:4318"
    assert env_var(on, "OTEL_SERVICE_NAME")["value"] == FULLNAME
    attributes = env_var(on, "OTEL_RESOURCE_ATTRIBUTES")["value"]
    assert "k8s.pod.name=$(POD_NAME)" in attributes
    assert "deployment.environment=prod" in attributes
    # $(POD_NAME) only expands when POD_NAME is defined earlier in the list.
    names = [e["name"] for e in container(on)["env"]]
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert env_var(on, "OTEL_EXPORTER_OTLP_HEADERS")["valueFrom"]["secretKeyRef"] == {
        "name": "otel", "key": "headers"}  # fmt: skip
    assert config_of(on)["otlp_traces"] is True
    explicit = deep_merge(values, {"config": {"otlp_traces": False}})
    assert config_of(objects(chart, explicit))["otlp_traces"] is False


def test_extra_env_is_appended(chart: Any) -> None:
    extra = {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"}
    assert env_var(objects(chart, {"extraEnv": [extra]}), "OTEL_TRACES_SAMPLER") == extra


# ---------------------------------------------------------------- broker secret


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_broker_url_only_in_the_secret(chart: Any, scenario: str) -> None:
    values = with_fake_broker(SCENARIOS[scenario])
    rendered = render(chart, values)
    encoded = base64.b64encode(FAKE_BROKER_URL.encode()).decode()
    needles = (FAKE_BROKER_URL, FAKE_PASSWORD, encoded)
    secrets = []
    for path, text in rendered.items():
        docs = [] if path.endswith("NOTES.txt") else [d for d in yaml.safe_load_all(text) if d]
        secrets.extend(d for d in docs if d["kind"] == "Secret")
        if any(d["kind"] == "Secret" for d in docs):
            # The Secret's own file: every other object in it must be clean.
            others = [yaml.safe_dump(d) for d in docs if d["kind"] != "Secret"]
            leaks = [n for n in needles for other in others if n in other]
        else:
            # Raw text, so comments and annotations are checked too.
            leaks = [n for n in needles if n in text]
        assert not leaks, f"broker URL leaked into {path}"
    docs = manifests(rendered)
    ref = env_var(docs, "CELERY_EXPORTER_BROKER_URL")
    assert ref is not None and set(ref) == {"name", "valueFrom"}, "must not be an inline value"
    key_ref = ref["valueFrom"]["secretKeyRef"]
    if values["broker"].get("existingSecret"):
        assert secrets == []
        assert key_ref == {
            "name": values["broker"]["existingSecret"],
            "key": values["broker"].get("existingSecretKey", "broker-url"),
        }
    else:
        assert len(secrets) == 1
        secret = secrets[0]
        assert secret["type"] == "Opaque"
        assert key_ref == {"name": secret["metadata"]["name"], "key": "broker-url"}
        assert base64.b64decode(secret["data"]["broker-url"]).decode() == FAKE_BROKER_URL
        assert "stringData" not in secret


def test_existing_secret_is_referenced_and_no_secret_is_created(chart: Any) -> None:
    docs = objects(chart, ci_values("existing-secret-values.yaml"))
    assert "Secret" not in kinds(docs)
    ref = env_var(docs, "CELERY_EXPORTER_BROKER_URL")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "celery-broker", "key": "url"}


def test_url_and_existing_secret_together_are_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmError, match=r"either broker\.url or broker\.existingSecret"):
        render(chart, {"broker": {"url": FAKE_BROKER_URL, "existingSecret": "x"}})


def test_sentinel_and_rabbitmq_tls_scenarios(chart: Any) -> None:
    sentinel = objects(chart, ci_values("sentinel-values.yaml"))
    assert config_of(sentinel)["broker_transport_options"] == {"master_name": "mymaster"}
    secret = one(sentinel, "Secret")
    assert base64.b64decode(secret["data"]["broker-url"]).decode().startswith("sentinel://")

    tls = objects(chart, ci_values("rabbitmq-tls-values.yaml"))
    url = base64.b64decode(one(tls, "Secret")["data"]["broker-url"]).decode()
    assert url.startswith("amqps://")
    ssl = config_of(tls)["broker_ssl_options"]
    mount = next(m for m in container(tls)["volumeMounts"] if m["name"] == "broker-tls")
    assert mount["readOnly"] is True
    for key in ("ca_certs", "certfile", "keyfile"):
        assert ssl[key].startswith(mount["mountPath"] + "/"), key
    pod = one(tls, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "broker-tls")
    assert volume["secret"]["secretName"]


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"service": {"port": "x"}}, "port"),
        ({"unknownTopLevelKey": True}, "unknownTopLevelKey"),
        ({"config": {"broker_url": FAKE_BROKER_URL}}, "broker_url"),
        ({"config": {"not_a_daemon_key": 1}}, "not_a_daemon_key"),
        ({"config": {"log_format": "xml"}}, "log_format"),
        ({"config": {"port": 70000}}, "port"),
        ({"config": {"task_objectives": {"payments.*": 1}}}, "task_objectives"),
        ({"config": {"task_expected_intervals": {"beat.*": 0}}}, "task_expected_intervals"),
        ({"livenessProbe": {"periodSeconds": "10s"}}, "periodSeconds"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"serviceMonitor": {"enabled": "yes"}}, "enabled"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema_refuses_bad_values(chart: Any, values: dict[str, Any], key: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(chart, values)
    assert key in str(caught.value)
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(chart.merge_values(values))
    assert key in str(caught.value)
    report = helm.lint(CHART_DIR, values)
    assert any(key in m["error"] for m in report["messages"] if m["severity"] == 3), report


# ---------------------------------------------------------------- optional parts


def test_service_and_service_monitor(chart: Any) -> None:
    docs = objects(chart, EVERYTHING)
    service = one(docs, "Service")["spec"]
    assert service["ports"] == [
        {"name": "http-metrics", "port": 9808, "targetPort": "http-metrics", "protocol": "TCP"}
    ]
    # A pod that lost the broker is unready, and must still be scraped to alert on it.
    assert service["publishNotReadyAddresses"] is True
    sm = one(docs, "ServiceMonitor")
    sm_values = EVERYTHING["serviceMonitor"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # job="celery-events-exporter", the job name the rules and dashboards use.
    assert sm["spec"]["jobLabel"] == "app.kubernetes.io/name"
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["interval"] == sm_values["interval"]
    assert endpoint["scrapeTimeout"] == sm_values["scrapeTimeout"]
    assert endpoint["relabelings"] == sm_values["relabelings"]
    assert endpoint["metricRelabelings"] == sm_values["metricRelabelings"]


def test_network_policy(chart: Any) -> None:
    open_egress = one(objects(chart, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert open_egress["spec"]["policyTypes"] == ["Ingress"]
    assert open_egress["spec"]["ingress"] == [
        {"ports": [{"port": "http-metrics", "protocol": "TCP"}]}]  # fmt: skip
    np = one(objects(chart, EVERYTHING), "NetworkPolicy")
    values = EVERYTHING["networkPolicy"]
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert np["spec"]["ingress"][0]["from"] == values["ingress"]["from"]
    egress = np["spec"]["egress"]
    assert {p["port"] for p in egress[0]["ports"]} == {53}
    assert egress[1:] == values["egress"]["rules"]


def test_pod_disruption_budget(chart: Any) -> None:
    default = one(objects(chart, {"podDisruptionBudget": {"enabled": True}}), "PodDisruptionBudget")
    assert default["spec"]["maxUnavailable"] == 1 and "minAvailable" not in default["spec"]
    pdb = one(objects(chart, EVERYTHING), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]


# ---------------------------------------------------------------- rules and dashboards


def test_chart_copies_match_the_sources() -> None:
    hint = "the chart's copies drifted from the sources: run make chart-files"
    if RULES_SOURCE.exists():
        assert RULES_COPY.exists(), f"{RULES_COPY.relative_to(ROOT)} missing: {hint}"
        assert RULES_COPY.read_bytes() == RULES_SOURCE.read_bytes(), hint
    else:
        assert not RULES_COPY.exists(), f"{RULES_SOURCE.relative_to(ROOT)} is gone: {hint}"
    sources = {p.name: p.read_bytes() for p in DASHBOARDS_SOURCE.glob("*.json")}
    copies = {p.name: p.read_bytes() for p in DASHBOARDS_COPY.glob("*.json")}
    assert sorted(copies) == sorted(sources), hint
    for name, data in sources.items():
        assert copies[name] == data, f"files/dashboards/{name}: {hint}"


def test_prometheus_rule_has_the_groups_of_the_rules_file(chart: Any) -> None:
    assert RULES_SOURCE.exists(), (
        f"{RULES_SOURCE.relative_to(ROOT)} is missing (the rules' authors own it)"
    )
    source_groups = yaml.safe_load(RULES_SOURCE.read_text())["groups"]
    rule = one(objects(chart, {"prometheusRule": {"enabled": True}}), "PrometheusRule")
    check_crd(rule)
    assert rule["spec"]["groups"] == source_groups, "run make chart-files"
    # {{ $labels.x }} / {{ $value }} in annotations reach Prometheus untouched.
    source_text = RULES_SOURCE.read_text()
    if "{{" in source_text:
        assert "{{" in yaml.safe_dump(rule["spec"])


def test_additional_rule_labels_go_on_alerts_only(chart: Any) -> None:
    source_groups = yaml.safe_load(RULES_SOURCE.read_text())["groups"]
    values = {
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "prom"},
            "additionalRuleLabels": {"team": "platform", "severity": "overridden?"},
        }
    }
    rule = one(objects(chart, values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    for group, source in zip(rule["spec"]["groups"], source_groups, strict=True):
        for rendered, original in zip(group["rules"], source["rules"], strict=True):
            if "record" in original:
                assert rendered == original
                continue
            own = original.get("labels", {})
            assert rendered["labels"]["team"] == own.get("team", "platform")
            # A rule's own labels win over the additional ones.
            assert rendered["labels"]["severity"] == own.get("severity", "overridden?")
            assert {k: v for k, v in rendered.items() if k != "labels"} == {
                k: v for k, v in original.items() if k != "labels"}  # fmt: skip


def test_dashboards_config_maps(chart: Any) -> None:
    sources = sorted(DASHBOARDS_COPY.glob("*.json"))
    assert sources, (
        "no dashboards in the chart: run make chart-files (grafana/dashboards/*.json are "
        "the dashboards' authors')"
    )
    values = {"grafanaDashboards": {"enabled": True, "folder": "Celery"}}
    maps = [d for d in objects(chart, values)
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] != FULLNAME]  # fmt: skip
    assert len(maps) == len(sources)
    by_file = {next(iter(m["data"])): m for m in maps}
    for path in sources:
        cm = by_file[path.name]
        assert cm["data"] == {path.name: path.read_text()}, "dashboard must be copied verbatim"
        json.loads(cm["data"][path.name])
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "Celery"
        assert len(cm["metadata"]["name"]) <= 253
    custom = {"grafanaDashboards": {"enabled": True, "label": "dash", "labelValue": "yes",
                                    "namespace": "grafana"}}  # fmt: skip
    for cm in (d for d in objects(chart, custom) if d["metadata"]["name"] != FULLNAME):
        if cm["kind"] == "ConfigMap":
            assert cm["metadata"]["labels"]["dash"] == "yes"
            assert "grafana_dashboard" not in cm["metadata"]["labels"]
            assert cm["metadata"]["namespace"] == "grafana"
            assert "annotations" not in cm["metadata"]


def test_rules_and_dashboards_missing_from_the_chart_fail_loudly(tmp_path: Path) -> None:
    bare = tmp_path / "celery-events-exporter"
    shutil.copytree(CHART_DIR, bare, ignore=shutil.ignore_patterns("files"))
    with helm.Chart.load(bare) as bare_chart:
        assert "ConfigMap" in kinds(objects(bare_chart))  # the core still renders
        for part in ("prometheusRule", "grafanaDashboards"):
            with pytest.raises(helm.HelmRenderError, match="run make chart-files"):
                render(bare_chart, {part: {"enabled": True}})


# ---------------------------------------------------------------- sync script


def test_sync_script_mirrors_rules_and_dashboards(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(SYNC_SCRIPT, repo / "scripts" / SYNC_SCRIPT.name)
    chart_dir = repo / "helm" / "celery-events-exporter"
    chart_dir.mkdir(parents=True)
    (chart_dir / "Chart.yaml").write_text("apiVersion: v2\nname: x\nversion: 0.1.0\n")
    rules = repo / "config" / "prometheus" / "alerts.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text("groups:\n  - name: g\n    rules: []\n")
    dashboards = repo / "grafana" / "dashboards"
    dashboards.mkdir(parents=True)
    (dashboards / "a.json").write_text('{"legendFormat": "{{instance}}"}\n')
    (dashboards / "b.json").write_text("{}\n")
    (dashboards / "notes.txt").write_text("not a dashboard\n")

    def sync() -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in {"REPO_ROOT", "CHART_DIR"}}
        return subprocess.run(
            ["bash", str(repo / "scripts" / SYNC_SCRIPT.name)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )

    sync()
    files = chart_dir / "files"
    assert (files / "alerts.yaml").read_bytes() == rules.read_bytes()
    assert sorted(p.name for p in (files / "dashboards").iterdir()) == ["a.json", "b.json"]
    assert (files / "dashboards" / "a.json").read_bytes() == (dashboards / "a.json").read_bytes()

    (dashboards / "b.json").unlink()
    rules.unlink()
    result = sync()
    assert sorted(p.name for p in (files / "dashboards").iterdir()) == ["a.json"]
    assert not (files / "alerts.yaml").exists()
    assert "does not exist" in result.stderr


def test_sync_script_is_strict_bash() -> None:
    text = SYNC_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(SYNC_SCRIPT)], check=True)


def test_the_chart_config_keys_are_the_daemon_options(chart: Any) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    keys = set(schema["properties"]["config"]["properties"])
    # The broker URL comes from a Secret; the demo is no way to run in a cluster.
    assert keys == {spec.name for spec in Config.options()} - {"broker_url", "demo"}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_rendered_config_starts_the_daemon(chart: Any, scenario: str, tmp_path: Path) -> None:
    settings = config_of(objects(chart, SCENARIOS[scenario]))
    settings.pop("web_config_file", None)  # a file mounted from a Secret in the cluster
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    load(["--config", str(path)], environ={"CELERY_EXPORTER_BROKER_URL": "redis://r:6379/0"})


# ---------------------------------------------------------------- several brokers

TWO_BROKERS: dict[str, Any] = {
    "config": {"static_labels": {"cluster": "eu"}, "log_format": "json", "enable_events": True},
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "brokers": [
        {"name": "orders", "url": FAKE_BROKER_URL},
        {"name": "billing", "existingSecret": "billing-broker", "existingSecretKey": "url",
         "config": {"queues": ["invoices"], "task_hostname_label": "drop",
                    "enable_events": False}},
    ],
}  # fmt: skip


def test_two_brokers_render_a_deployment_each_with_its_secret_and_label(chart: Any) -> None:
    docs = objects(chart, TWO_BROKERS)
    assert kinds(docs) == ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "PrometheusRule",
                           "Secret", "Service", "ServiceAccount", "ServiceMonitor"]  # fmt: skip
    service = one(docs, "Service")
    for name, secret, key in (("orders", f"{FULLNAME}-orders-broker", "broker-url"),
                              ("billing", "billing-broker", "url")):  # fmt: skip
        deployment = one(docs, "Deployment", f"{FULLNAME}-{name}")
        pod = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["celery-events-exporter/broker"] == name
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        ref = env["CELERY_EXPORTER_BROKER_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": key}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == f"{FULLNAME}-{name}"
        settings = yaml.safe_load(
            one(docs, "ConfigMap", f"{FULLNAME}-{name}")["data"]["config.yaml"]
        )
        assert settings["static_labels"] == {"cluster": "eu", "broker": name}
        assert settings["log_format"] == "json"
    billing = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-billing")["data"]["config.yaml"])
    assert (billing["queues"], billing["task_hostname_label"]) == (["invoices"], "drop")
    assert billing["enable_events"] is False  # a broker's own keys win, false included
    secret = one(docs, "Secret", f"{FULLNAME}-orders-broker")
    assert base64.b64decode(secret["data"]["broker-url"]).decode() == FAKE_BROKER_URL
    selector = one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert (
        "celery-events-exporter/broker" not in selector and selector == service["spec"]["selector"]
    )


def test_two_brokers_lint_clean_and_render_valid_manifests(chart: Any, tmp_path: Path) -> None:
    report = helm.lint(CHART_DIR, TWO_BROKERS, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], json.dumps(report, indent=2)
    for doc in objects(chart, TWO_BROKERS):
        if doc["kind"] in CRD_KINDS:
            check_crd(doc)
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        if doc["kind"] == "ConfigMap":  # each exporter's config starts the daemon
            path = tmp_path / f"{doc['metadata']['name']}.yaml"
            path.write_text(doc["data"]["config.yaml"])
            load(["--config", str(path)], environ={"CELERY_EXPORTER_BROKER_URL": "redis://r/0"})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"brokers": [{"name": "a", "url": FAKE_BROKER_URL}, {"name": "a", "existingSecret": "s"}]},
         'brokers: the name "a" is given twice'),
        ({"broker": {"url": FAKE_BROKER_URL}, "brokers": [{"name": "a", "existingSecret": "s"}]},
         "set either broker (one broker) or brokers (several), not both"),
    ],
)  # fmt: skip
def test_broker_mistakes_fail_the_rendering(chart: Any, values: dict, message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    "entry",
    [{"url": FAKE_BROKER_URL}, {"name": "Orders!", "url": FAKE_BROKER_URL}, {"name": "a"},
     {"name": "a", "existingSecret": "s", "config": {"not_a_daemon_key": 1}}],
)  # fmt: skip
def test_schema_refuses_bad_brokers(chart: Any, entry: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values({"brokers": [entry]}))


def test_objectives_and_intervals_reach_the_daemon_from_the_values(
    chart: Any, tmp_path: Path
) -> None:
    # A list keeps the order of the globs: Helm renders a mapping's keys sorted.
    values = {"config": {"task_objectives": ["payments.*=0.999", "*=0.99"],
                         "task_expected_intervals": {"reports.nightly": 86400}}}  # fmt: skip
    settings = config_of(objects(chart, values))
    assert settings["task_objectives"] == ["payments.*=0.999", "*=0.99"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    loaded = load(["--config", str(path)], environ={"CELERY_EXPORTER_BROKER_URL": "redis://r/0"})
    assert list(loaded.task_objectives.items()) == [("payments.*", 0.999), ("*", 0.99)]
    assert loaded.task_expected_intervals == {"reports.nightly": 86400.0}
