"""The container images and the Helm chart, checked offline.

The chart is linted and rendered with helm-python-sdk (Helm's own Go code, no helm binary, no
cluster), with the default values and with every values file in its ``ci/`` folder, and every
rendered manifest is validated: built-in kinds against the Kubernetes OpenAPI schemas shipped
with kubernetes-validate (strict: unknown fields fail), the three custom resources
(ServiceMonitor, PrometheusRule, ScaledObject), which kubernetes-validate has no schema for,
against the small schemas below that hold the fields their operators require.
There is no docker daemon here, so the Dockerfiles are checked statically against the chart.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "imagegate"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "demo"
NAMESPACE = "imagegate"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schema set.
OLDEST_KUBE = "1.25"
NEWEST_KUBE = kubernetes_validate.latest_version()

_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string", "minLength": 1}, "labels": _STR_MAP}}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "required": ["matchLabels"],
                                 "properties": {"matchLabels": _STR_MAP}},
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["port", "path"], "additionalProperties": False,
                        "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                       "interval": _DURATION, "scrapeTimeout": _DURATION}}},
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object", "required": ["groups"], "additionalProperties": False,
                "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "rules": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["alert", "expr"], "additionalProperties": False,
                            "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                                           "expr": {"type": "string", "minLength": 1},
                                           "for": _DURATION, "labels": _STR_MAP,
                                           "annotations": _STR_MAP}}},
                    }}}},
            },
        },
    },
    "ScaledObject": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": _META,
            "spec": {
                "type": "object", "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"],
                                       "properties": {"name": {"type": "string"}}},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer"},
                    "cooldownPeriod": {"type": "integer"},
                    "triggers": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            # KEDA rejects non-string trigger metadata values.
                            "metadata": _STR_MAP,
                        }}},
                },
            },
        },
    },
}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders with ``values``."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for name, text in sorted(out.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    return str(caught.value)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


VALUE_SETS = [pytest.param({}, id="defaults")] + [
    pytest.param(_load(p), id=p.name) for p in CI_FILES
]


# ---- chart: lint, render, validate ------------------------------------------------------------

def test_ci_values_cover_gpu_redis_autoscaling_and_monitoring():
    assert CI_FILES, "deploy/helm/imagegate/ci/ has no values files"
    sets = [_load(p) for p in CI_FILES]
    assert all(s.get("gpu", {}).get("count", 0) > 0 for s in sets)
    assert all(s.get("redis", {}).get("url") or s.get("redis", {}).get("existingSecret") for s in sets)
    autoscalers = {k for s in sets for k in ("hpa", "keda") if s.get("autoscaling", {}).get(k, {}).get("enabled")}
    assert autoscalers == {"hpa", "keda"}
    for part in ("serviceMonitor", "prometheusRule"):
        assert any(s.get("metrics", {}).get(part, {}).get("enabled") for s in sets), part


@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_is_clean(values):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_rendered_manifest_validates(values):
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    versions = [NEWEST_KUBE] if values.get("lifecycle", {}).get("useSleepAction") else [OLDEST_KUBE, NEWEST_KUBE]
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_ci_renders_the_autoscaling_and_monitoring_objects():
    kinds = {p.name: {d["kind"] for d in render(_load(p))} for p in CI_FILES}
    every = set().union(*kinds.values())
    assert {"ScaledObject", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule",
            "PodDisruptionBudget"} <= every, kinds
    for name, found in kinds.items():
        assert not {"ScaledObject", "HorizontalPodAutoscaler"} <= found, f"{name}: KEDA and an HPA both scale"


def test_schema_rejects_bad_values():
    assert "gpu/count" in render_error({"gpu": {"count": -1}})
    assert "logFormat" in render_error({"server": {"logFormat": "xml"}})
    assert "gpuCount" in render_error({"gpuCount": 1})  # typos at the top level are caught


# ---- probes, drain, PDB -----------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUE_SETS)
def test_probes_use_three_different_endpoints(values):
    c = container(render(values))
    paths = {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/startup", "readinessProbe": "/ready", "livenessProbe": "/health"}
    assert {c[p]["httpGet"]["port"] for p in paths} == {"http"}
    assert [p["name"] for p in c["ports"]] == ["http"]
    startup = c["startupProbe"]
    # Loading and compiling SDXL on a GPU takes minutes; the startup probe must allow for it.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("values", VALUE_SETS)
def test_grace_period_outlasts_prestop_and_drain(values):
    docs = render(values)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    pre = c["lifecycle"]["preStop"]
    sleep = pre["sleep"]["seconds"] if "sleep" in pre else int(pre["exec"]["command"][-1])
    assert pre.get("exec", {}).get("command", ["sleep"])[0] == "sleep"
    drain = float(env_of(c)["IMAGEGATE_DRAIN_TIMEOUT_S"])
    assert sleep > 0
    assert pod["terminationGracePeriodSeconds"] > sleep + drain


def test_too_short_grace_period_is_refused():
    message = render_error({"terminationGracePeriodSeconds": 40, "lifecycle": {"preStopSleepSeconds": 10},
                            "server": {"drainTimeoutSeconds": 30}})
    assert "terminationGracePeriodSeconds (40) must exceed" in message
    render({"terminationGracePeriodSeconds": 46, "lifecycle": {"preStopSleepSeconds": 10},
            "server": {"drainTimeoutSeconds": 30}})


def test_pdb_only_with_replicas_to_protect_and_never_a_no_op():
    assert "PodDisruptionBudget" not in {d["kind"] for d in render({})}
    many = {"replicaCount": 3, "redis": {"url": "redis://r:6379/0"}}
    pdb = one(render(many), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(render(many), "Deployment")["spec"]["selector"]["matchLabels"]
    assert "below the 3 replicas" in render_error({**many, "podDisruptionBudget": {"maxUnavailable": 3}})
    assert "at least 1" in render_error({**many, "podDisruptionBudget": {"maxUnavailable": 0}})
    assert "minAvailable" in render_error({**many, "podDisruptionBudget": {"minAvailable": 0}})
    assert one(render({**many, "podDisruptionBudget": {"minAvailable": 2}}), "PodDisruptionBudget")["spec"] == {
        "minAvailable": 2, "selector": pdb["spec"]["selector"]}


def test_replicas_need_redis_and_autoscalers_are_exclusive():
    assert "redis.url" in render_error({"replicaCount": 2})
    independent = {"replicaCount": 2, "replicasWithoutRedis": True}
    assert "cannot share one persistence.data claim" in render_error(independent)
    independent["persistence"] = {"data": {"enabled": False}}
    assert one(render(independent), "Deployment")["spec"]["replicas"] == 2
    both = {"redis": {"url": "redis://r:6379/0"},
            "autoscaling": {"hpa": {"enabled": True, "targetCPUUtilizationPercentage": 80},
                            "keda": {"enabled": True}}}
    assert "exclusive" in render_error(both)
    keda = one(render({"redis": {"url": "redis://r:6379/0"}, "autoscaling": {"keda": {"enabled": True}}}),
               "ScaledObject")
    assert "imagegate_queue_images" in keda["spec"]["triggers"][0]["metadata"]["query"]


def _volumes(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    return {v["name"]: v for v in spec["volumes"]}


def test_a_data_dir_is_never_shared_and_every_rollout_can_finish():
    """A server locks its data dir: with Redis each pod gets its own emptyDir (no data claim);
    without Redis the one replica keeps the claim and the rollout replaces it (Recreate)."""
    plain = render()
    assert "persistentVolumeClaim" in _volumes(plain)["data"]
    assert one(plain, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    redis = {"redis": {"url": "redis://r:6379/0"}, "replicaCount": 3}
    for values in (redis, *(_load(p) for p in CI_FILES)):
        docs = render(values)
        assert _volumes(docs)["data"] == {"name": "data", "emptyDir": {}}
        claims = [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert not any(name.endswith("-data") for name in claims), claims
        assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    surge = {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}
    assert "never finishes" in render_error(surge)
    no_surge = {"strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}
    assert one(render(no_surge), "Deployment")["spec"]["strategy"] == no_surge["strategy"]


def test_replicas_on_redis_get_a_release_prefix_and_their_pod_name_as_id():
    env = env_of(container(render({"redis": {"url": "redis://r:6379/0"}})))
    assert env["IMAGEGATE_REDIS_PREFIX"] == one(render(), "Deployment")["metadata"]["name"]
    assert env["IMAGEGATE_REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    chosen = env_of(container(render({"redis": {"url": "redis://r:6379/0", "prefix": "team-a"}})))
    assert chosen["IMAGEGATE_REDIS_PREFIX"] == "team-a"
    alone = env_of(container(render()))
    assert "IMAGEGATE_REDIS_PREFIX" not in alone and "IMAGEGATE_REPLICA_ID" not in alone
    assert "replica_id is set by the chart" in render_error({"server": {"settings": {"replica_id": "x"}}})


# ---- GPU, image, env, secrets -----------------------------------------------------------------

def _gpu_in(resources: dict[str, Any]) -> list[str]:
    return [k for part in resources.values() for k in part if "gpu" in k]


def test_gpu_resources_only_when_gpus_are_requested():
    cpu = container(render({}))
    assert _gpu_in(cpu.get("resources", {})) == []
    assert env_of(cpu)["IMAGEGATE_DEVICE"] == "cpu"
    assert cpu["image"].endswith("-cpu")
    gpu = container(render({"gpu": {"count": 2}}))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env_of(gpu)["IMAGEGATE_DEVICE"] == "cuda"
    assert not gpu["image"].endswith("-cpu")
    other = container(render({"gpu": {"count": 1, "resource": "amd.com/gpu"}}))
    assert _gpu_in(other["resources"]) == ["amd.com/gpu"]


def test_pod_placement_values_reach_the_pod():
    values = {"runtimeClassName": "nvidia", "nodeSelector": {"gpu": "h100"},
              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    pod = one(render(values), "Deployment")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == values["tolerations"]
    assert "runtimeClassName" not in one(render({}), "Deployment")["spec"]["template"]["spec"]


def test_runs_as_non_root():
    pod = one(render({}), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_env_names_are_real_settings_and_args_parse(values):
    from gateway.cli import build_parser
    from gateway.settings import Settings

    c = container(render(values))
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), f"an env var is set twice: {names}"
    fields = set(Settings.__struct_fields__)
    for name in names:
        if not name.startswith("IMAGEGATE_"):
            continue
        field = name.removeprefix("IMAGEGATE_").lower()
        if field == "redis_url" and field not in fields:
            continue  # --redis-url arrives with the shared-Redis work (issue 10, item 6)
        assert field in fields, f"{name} is not an imagegate setting"
    assert "command" not in c, "the chart must use the image's entrypoint (imagegate serve)"
    args = build_parser().parse_args(["serve", *c["args"]])
    assert args.model_arg == (values.get("model") or "tiny-sdxl")


def test_existing_secret_is_used_and_chart_secret_is_not_made():
    docs = render({"auth": {"existingSecret": "mine"}, "redis": {"existingSecret": "r", "existingSecretKey": "u"}})
    assert "Secret" not in {d["kind"] for d in docs}
    c = container(docs)
    env = env_of(c)
    assert env["IMAGEGATE_TOKEN_SECRET"]["secretKeyRef"]["name"] == "mine"
    assert env["IMAGEGATE_TOKEN_SECRET"]["secretKeyRef"]["optional"] is False  # shared: required
    alone = env_of(container(render({"auth": {"existingSecret": "mine"}})))
    assert alone["IMAGEGATE_TOKEN_SECRET"]["secretKeyRef"]["optional"] is True
    assert env["IMAGEGATE_REDIS_URL"]["secretKeyRef"] == {"name": "r", "key": "u"}
    assert env["IMAGEGATE_KEYS_FILE"] == "/etc/imagegate/auth/keys.json"
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "mine"


def test_dev_secret_is_generated_when_no_keys_are_given():
    docs = render({})
    secret = one(docs, "Secret")
    assert set(secret["data"]) == {"api-keys", "token-secret"}
    assert env_of(container(docs))["IMAGEGATE_API_KEYS"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    open_docs = render({"auth": {"insecureNoAuth": True}})
    assert "Secret" not in {d["kind"] for d in open_docs}
    assert env_of(container(open_docs))["IMAGEGATE_INSECURE_NO_AUTH"] == "true"


def test_chart_owned_settings_cannot_be_overridden_via_settings():
    assert "server.port" in render_error({"server": {"settings": {"PORT": "9000"}}})
    env = env_of(container(render({"server": {"settings": {"max_queue_images": 32}}})))
    assert env["IMAGEGATE_MAX_QUEUE_IMAGES"] == "32"


# ---- dashboard and rules: one source of truth -------------------------------------------------

def test_dashboard_and_rules_come_from_observability():
    dash_file = ROOT / "observability" / "dashboards" / "imagegate.json"
    rules_file = ROOT / "observability" / "alerts" / "imagegate.rules.yaml"
    assert (CHART / "files" / "dashboard.json").resolve() == dash_file.resolve()
    assert (CHART / "files" / "alerts.yaml").resolve() == rules_file.resolve()
    docs = render({"metrics": {"prometheusRule": {"enabled": True}}})
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["imagegate.json"]) == json.loads(dash_file.read_text())
    assert one(docs, "PrometheusRule")["spec"] == yaml.safe_load(rules_file.read_text())
    relabelled = render({"metrics": {"dashboard": {"sidecarLabel": "my_dashboards", "sidecarLabelValue": "yes"}}})
    cm = next(d for d in relabelled if d["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["my_dashboards"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]


# ---- Dockerfiles agree with the chart ----------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _last(instrs: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in instrs if w == word]
    assert found, f"no {word}"
    return found[-1]


def _env(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instrs:
        if word == "ENV":
            env.update(dict(part.split("=", 1) for part in shlex.split(rest)))
    return env


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_matches_the_chart(dockerfile):
    instrs = _instructions(ROOT / dockerfile)
    values = _load(CHART / "values.yaml")
    assert json.loads(_last(instrs, "ENTRYPOINT")) == ["imagegate", "serve"]
    assert "imagegate = \"gateway.cli:main\"" in (ROOT / "pyproject.toml").read_text()
    assert _last(instrs, "EXPOSE") == str(values["server"]["port"])
    volumes = set(json.loads(_last(instrs, "VOLUME")))
    persistence = values["persistence"]
    assert volumes == {persistence["cache"]["mountPath"], persistence["data"]["mountPath"],
                       persistence["models"]["mountPath"]}
    env = _env(instrs)
    assert env["IMAGEGATE_CACHE_DIR"] == persistence["cache"]["mountPath"]
    assert env["IMAGEGATE_DATA_DIR"] == persistence["data"]["mountPath"]
    assert env["IMAGEGATE_PORT"] == str(values["server"]["port"])
    assert env["HF_HOME"].startswith(persistence["cache"]["mountPath"] + "/")
    user = _last(instrs, "USER").split(":")[0]
    assert user == str(values["podSecurityContext"]["runAsUser"]) != "0"
    health = _last(instrs, "HEALTHCHECK")
    assert "/ready" in health and "curl" not in health


def test_cuda_image_keeps_the_base_torch_and_cpu_image_pins_it():
    cuda = _instructions(ROOT / "Dockerfile")
    base = [rest for w, rest in cuda if w == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert base and re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base[0])
    install = " ".join(rest for w, rest in cuda if w == "RUN")
    assert "-c /tmp/torch-constraint.txt ." in install and "torch.version.cuda" in install
    cpu = _instructions(ROOT / "Dockerfile.cpu")
    assert _last(cpu, "FROM") == "python:3.11-slim"
    run = " ".join(rest for w, rest in cpu if w == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in run
    assert any(rest == "TORCH_VERSION=2.13.0" for w, rest in cpu if w == "ARG")
    assert json.loads(_last(cpu, "CMD")) == ["tiny-sdxl"]


def test_dockerignore_keeps_the_build_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests"} <= ignored
    for needed in ("gateway", "inference", "auth", "observability", "pyproject.toml", "README.md"):
        assert needed not in ignored
