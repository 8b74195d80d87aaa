"""Deployment files checked offline: hadolint, the Compose Specification schema, Kubernetes schemas, dashboards.

No Docker engine or cluster is needed; the schemas ship in the check-jsonschema and kubernetes-validate packages.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from core.queues import Keys
from core.settings import Settings
from tests.deploy import compose
from tests.s3_server import S3Server

ROOT = compose.ROOT
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The newest Kubernetes version whose schemas the installed kubernetes-validate ships.
K8S_VERSION = kubernetes_validate.utils.latest_version()
COMPOSE_DEFAULTS: dict[str, str] = {}  # interpolate with nothing set: every ${VAR:-default} takes its default


def hadolint() -> str:
    return str(Path(sys.executable).parent / "hadolint")


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each stage of Dockerfile.gpu, continuation lines joined."""
    text = (ROOT / "Dockerfile.gpu").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(1), [])
        current.append(line)
    return stages


def compose_schema() -> dict[str, Any]:
    path = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not a manifest
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def metric_names_in_code() -> set[str]:
    names: set[str] = set()
    for package in ("api", "worker", "core"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"""["'](sdq_[a-z0-9_]+)["']""", path.read_text()))
    return names


# --- Dockerfile.gpu -------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_at_every_severity() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", "Dockerfile.gpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_catches_a_broken_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: a Dockerfile with known mistakes fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nRUN pip install torch\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3013" in result.stdout  # unpinned pip install


def test_dockerfile_has_a_slim_api_target_and_a_gpu_worker_as_default() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["api", "worker"]  # the last stage is what a plain `docker build` produces
    api, worker = ("\n".join(stages[name]) for name in ("api", "worker"))
    assert "FROM ${CUDA_BASE} AS worker" in worker
    assert 'ARG CUDA_BASE=nvidia/cuda:' in (ROOT / "Dockerfile.gpu").read_text()
    # torch: pinned, installed before the project is copied, and kept by a constraint during the project's install
    torch_at = worker.index('"torch==${TORCH_VERSION}"')
    project_at = worker.index('--constraint /opt/torch-constraint.txt ".[model]"')
    assert torch_at < worker.index("COPY pyproject.toml") < project_at
    assert "torch" not in api.replace("find_spec('torch')", "")  # the api image installs `.` only: no torch
    assert "pip install --no-cache-dir ." in api
    for stage in (api, worker):
        assert re.search(r"^USER 10001:10001$", stage, re.MULTILINE)
        assert "HEALTHCHECK" in stage
    assert 'VOLUME ["/models"]' in worker
    assert worker.rstrip().endswith('CMD ["sdqueue", "worker"]')


def test_pyproject_keeps_torch_out_of_the_api_install() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "torch" not in base and "transformers" not in base and "numpy" not in base
    assert "boto3" in base
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["model"])


# --- docker-compose.yml ---------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    schema = compose_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for model in (compose.load_raw(), compose.load(COMPOSE_DEFAULTS)):
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(model), key=str)
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_schema_rejects_a_broken_file() -> None:
    model = compose.load(COMPOSE_DEFAULTS)
    model["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["gpu"] = True
    assert not jsonschema.Draft202012Validator(compose_schema()).is_valid(model)


def test_compose_services_are_wired_for_scaling_and_durability() -> None:
    services = compose.load(COMPOSE_DEFAULTS)["services"]
    assert set(services) == {"redis", "minio", "createbucket", "api", "worker", "webhooks", "prometheus", "grafana"}

    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N must not collide
    [gpu] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and str(gpu["count"]) == "1"
    assert worker["build"]["target"] == "worker" and services["api"]["build"]["target"] == "api"
    assert worker["volumes"] == ["./models:/models:ro"]
    assert worker["environment"]["SDQ_CHECKPOINT"] == "/models/v1-5-pruned-emaonly.safetensors"

    # The webhook sender needs no GPU and no torch: it runs the api image, with its own metrics port.
    webhooks = services["webhooks"]
    assert webhooks["build"]["target"] == "api" and webhooks["image"] == services["api"]["image"]
    assert webhooks["command"] == ["sdqueue", "webhooks"] and "deploy" not in webhooks
    assert "9102" in " ".join(webhooks["healthcheck"]["test"])  # the api image's own check probes port 8000

    # The API is published on the host's interfaces: keys required unless the operator says otherwise.
    assert services["api"]["environment"]["SDQ_AUTH"] == "on"
    assert compose.load({"SDQ_AUTH": "off"})["services"]["api"]["environment"]["SDQ_AUTH"] == "off"
    # Metrics listen beyond the container's loopback, for Prometheus; they are not published on the host.
    for name in ("worker", "webhooks"):
        assert services[name]["environment"]["SDQ_METRICS_HOST"] == "0.0.0.0" and "ports" not in services[name]

    for name in ("api", "worker", "webhooks"):
        env = services[name]["environment"]
        assert env["SDQ_REDIS_URL"] == "redis://redis:6379/0"
        assert env["SDQ_STORAGE"] == "s3" and env["SDQ_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"
        Settings.model_validate({k[4:].lower(): v for k, v in env.items()})  # every value is valid for sdqueue

    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./models":
                assert (ROOT / source).exists(), f"compose mounts {source}, which is not in the repository"


def test_every_compose_variable_and_setting_is_documented_in_env_example() -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    used = compose.variables(compose.load_raw())
    assert used - documented == set(), "compose variables missing from .env.example"
    settings = {f"SDQ_{name.upper()}" for name in Settings.model_fields}
    assert settings - documented == set(), "SDQ_ settings missing from .env.example"


def test_compose_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert compose.interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET} $$HOME", env) == "x d  d  $HOME"


# --- Kubernetes -----------------------------------------------------------------------------------------------------


def test_kubernetes_manifests_match_their_schemas() -> None:
    checked = []
    for _path, doc in k8s_documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # custom resources: checked field by field below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.append(f"{doc['kind']}/{doc['metadata']['name']}")
    assert sorted(checked) == sorted([
        "Namespace/sdqueue", "ConfigMap/sdqueue-config", "Secret/sdqueue-secrets", "Service/redis",
        "StatefulSet/redis", "Deployment/sdqueue-api", "Service/sdqueue-api", "PersistentVolumeClaim/sdqueue-models",
        "Deployment/sdqueue-worker", "Deployment/sdqueue-webhooks",
    ])


def test_kubernetes_schema_rejects_a_broken_manifest() -> None:
    worker = next(doc for _, doc in k8s_documents() if doc["metadata"]["name"] == "sdqueue-worker"
                  and doc["kind"] == "Deployment")
    worker["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["gpus"] = {"count": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)


def test_worker_deployment_requests_a_gpu_and_matches_the_settings() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}
    worker = docs[("Deployment", "sdqueue-worker")]["spec"]["template"]["spec"]
    [container] = worker["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    metrics_port = Settings.model_fields["worker_metrics_port"].default
    assert container["ports"] == [{"name": "metrics", "containerPort": metrics_port}]
    config = docs[("ConfigMap", "sdqueue-config")]["data"]
    Settings.model_validate({k[4:].lower(): v for k, v in config.items() if v != ""})
    assert config["SDQ_STORAGE"] == "s3"
    for name in ("sdqueue-api", "sdqueue-worker", "sdqueue-webhooks"):
        pod = docs[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert [e["configMapRef"]["name"] if "configMapRef" in e else e["secretRef"]["name"]
                for e in pod["containers"][0]["envFrom"]] == ["sdqueue-config", "sdqueue-secrets"]


def test_keda_scales_workers_on_the_rq_queue_lists() -> None:
    docs = {d["kind"]: d for _, d in k8s_documents() if d["apiVersion"] == "keda.sh/v1alpha1"}
    scaled = docs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "sdqueue-worker"
    triggers = scaled["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    # RQ keeps the waiting job ids of queue <name> in the list rq:queue:<name>; the workers scale on every queue
    # they listen on: their model's (named in the config map) and the shared ones
    model = next(d for _, d in k8s_documents() if d["kind"] == "ConfigMap")["data"]["SDQ_MODEL_NAME"]
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(
        f"rq:queue:{q}" for q in Keys().worker_queues(model))
    assert scaled["advanced"]["scalingModifiers"]["formula"] == " + ".join(t["name"] for t in triggers)
    auth = docs["TriggerAuthentication"]
    assert all(t["authenticationRef"]["name"] == auth["metadata"]["name"] for t in triggers)
    secret = next(d for _, d in k8s_documents() if d["kind"] == "Secret")
    assert auth["spec"]["secretTargetRef"][0]["key"] in secret["stringData"]


def test_kustomization_lists_every_manifest_but_the_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", "secret.example.yaml"))
    assert sorted(kustomization["resources"]) == expected


# --- Prometheus, Grafana, S3 lifecycle ------------------------------------------------------------------------------


def test_prometheus_scrapes_the_ports_the_services_listen_on() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (job["dns_sd_configs"][0]["names"], job["dns_sd_configs"][0]["port"])
        for job in config["scrape_configs"]
    }
    services = compose.load(COMPOSE_DEFAULTS)["services"]
    assert targets["sdqueue-api"] == (["api"], int(services["api"]["command"][-1]))
    assert targets["sdqueue-worker"] == (["worker"], int(services["worker"]["environment"]["SDQ_WORKER_METRICS_PORT"]))
    webhooks_port = int(services["webhooks"]["environment"]["SDQ_WEBHOOK_METRICS_PORT"])
    assert targets["sdqueue-webhooks"] == (["webhooks"], webhooks_port)
    k8s = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-k8s.yml").read_text())
    keep = next(r for r in k8s["scrape_configs"][0]["relabel_configs"] if r.get("action") == "keep")
    port_names = {p["name"] for _, d in k8s_documents() if d["kind"] == "Deployment"
                  for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert all(re.fullmatch(keep["regex"], name) for name in port_names)


def test_grafana_dashboard_uses_only_metrics_the_code_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "sdqueue-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name) for e in exprs for name in re.findall(r"sdq_[a-z0-9_]+", e)}
    missing = used - metric_names_in_code()
    assert not missing, f"dashboard queries metrics no code exports: {sorted(missing)}"
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("queue depth", "jobs / s by outcome", "p50 / p95", "batch size", "steps / s", "gpu busy"):
        assert topic in titles
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_s3_lifecycle_example_is_accepted_by_an_s3_server() -> None:
    rules = json.loads((DEPLOY / "s3-lifecycle.json").read_text())
    server = S3Server()
    try:
        client = server.client()
        bucket = f"lifecycle-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rules)
        stored = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    finally:
        server.stop()
    assert stored[0]["Expiration"]["Days"] == 7
    assert stored[0]["Status"] == "Enabled"
