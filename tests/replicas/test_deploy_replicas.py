"""The replica deployments: the kustomize overlays and the compose stack, valid and consistent.

The base (one pod, SQLite on a volume) stays the embedded default; the ``replicas`` overlay
turns it into three stateless pods on PostgreSQL, and the ``cloudnative-pg`` overlay adds the
database itself, a CloudNativePG ``Cluster`` whose application Secret gives the store URL.
Checked against the Kubernetes schemas with ``kubernetes-validate`` like the other variants
(tests/observability/test_k8s.py); custom resources, which it has no schema for, by name.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from evalstream.service.settings import ENV_PREFIX, Settings
from evalstream.service.store.postgres import DEFAULT_POOL_SIZE
from tests.observability.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "replicas"
K8S_VERSION = "1.30.0"


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render(OVERLAY)}


def test_overlay_validates_against_kubernetes_schemas() -> None:
    for doc in objects().values():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD (the ServiceMonitor of the base)
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_three_stateless_replicas_on_the_secret_connection_string() -> None:
    objs = objects()
    assert ("PersistentVolumeClaim", "evalstream-data") not in objs  # no local state
    dep = objs[("Deployment", "evalstream")]
    spec = dep["spec"]
    assert spec["replicas"] == 3 and spec["strategy"]["type"] == "RollingUpdate"
    pod = spec["template"]["spec"]
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["EVALSTREAM_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "evalstream-postgres",
        "key": "url",
    }
    settings = {f.name for f in Settings.__dataclass_fields__.values()}
    for name in env:
        if name.startswith(ENV_PREFIX) and name != "EVALSTREAM_CONFIG":
            assert name[len(ENV_PREFIX) :].lower() in settings, name
    # Readiness is the gRPC health check, so the headless Service lists only serving replicas.
    assert container["readinessProbe"]["grpc"]["port"] == 50051


def test_headless_service_and_disruption_budget_select_the_pods() -> None:
    objs = objects()
    pod_labels = objs[("Deployment", "evalstream")]["spec"]["template"]["metadata"]["labels"]
    headless = objs[("Service", "evalstream-replicas")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    pdb = objs[("PodDisruptionBudget", "evalstream")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_compose_replicas_share_postgres_and_prometheus_scrapes_both() -> None:
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.replicas.yml").read_text())
    services = compose["services"]
    replicas = [name for name in services if name.startswith("evalstream")]
    assert len(replicas) == 2 and "postgres" in services
    urls = {services[r]["environment"]["EVALSTREAM_STORE_URL"] for r in replicas}
    assert len(urls) == 1 and urls.pop().startswith("postgresql://")
    for r in replicas:
        Settings.load(env=services[r]["environment"])  # every variable is a valid setting
        assert services[r]["depends_on"]["postgres"]["condition"] == "service_healthy"
    published = [p for r in replicas for p in services[r]["ports"]]
    assert all(p.startswith("127.0.0.1:") for p in published) and len(set(published)) == 2
    prom = yaml.safe_load((deploy / "prometheus" / "prometheus.replicas.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert sorted(job["static_configs"][0]["targets"]) == sorted(f"{r}:9464" for r in replicas)
    assert prom["rule_files"] == ["evalstream.rules.yml"]


def test_prometheus_accepts_the_replicas_config(tmp_path: Path) -> None:
    from tests.observability.promtools import binary

    promtool = binary("promtool")
    deploy = ROOT / "deploy" / "prometheus"
    out = subprocess.run(
        [promtool, "check", "config", str(deploy / "prometheus.replicas.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.fail(out.stdout + out.stderr)


# -- the CloudNativePG overlay -----------------------------------------------------------------

CNPG = ROOT / "deploy" / "k8s" / "overlays" / "cloudnative-pg"
# Objects of custom resource kinds, which kubernetes-validate has no schema for: each is checked
# by a test of its own (the ServiceMonitor in tests/observability/test_k8s.py, the Cluster below).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("postgresql.cnpg.io/v1", "Cluster")}
# A Kubernetes resource quantity, as the Cluster's storage size must be.
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def cnpg_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render(CNPG)}


def test_cloudnative_pg_overlay_validates_and_names_its_custom_resources() -> None:
    custom = set()
    for doc in cnpg_objects().values():
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            custom.add((doc["apiVersion"], doc["kind"]))
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert custom == CUSTOM_KINDS  # nothing else skipped the schema check


def test_cloudnative_pg_cluster_feeds_the_replicas_store_url() -> None:
    objs = cnpg_objects()
    clusters = [d for (kind, _), d in objs.items() if kind == "Cluster"]
    (cluster,) = clusters
    spec = cluster["spec"]
    # The fields the operator requires, with the types its CRD gives them.
    assert isinstance(spec["instances"], int) and spec["instances"] == 3
    assert QUANTITY.match(spec["storage"]["size"]), spec["storage"]["size"]
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] == initdb["owner"] == "evalstream"
    assert all(isinstance(v, str) for v in spec["postgresql"]["parameters"].values())
    # The store URL is the "uri" key of the Secret the operator writes for the database owner.
    dep = objs[("Deployment", "evalstream")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["EVALSTREAM_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{cluster['metadata']['name']}-app",
        "key": "uri",
    }
    assert "namespace" not in cluster["metadata"] and "namespace" not in dep["metadata"]  # one namespace
    # Every replica's connections (its pool, its listener, its exporter lease) fit, a surge pod included.
    replicas = dep["spec"]["replicas"] + dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert replicas * (DEFAULT_POOL_SIZE + 2) < int(spec["postgresql"]["parameters"]["max_connections"])
    # Everything else is the replicas overlay.
    assert {k for k in objs if k[0] != "Cluster"} == set(objects())


def test_cloudnative_pg_overlay_renders_as_kubectl_does() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the Python renderer alone is used")
    out = subprocess.run(
        [kubectl, "kustomize", str(CNPG)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    assert theirs == cnpg_objects()
