"""Kubernetes manifests: valid against the Kubernetes schemas, consistent with each other."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.observability.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VARIANTS = ["base", "overlays/gpu", "overlays/tls"]
K8S_VERSION = "1.30.0"


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = by_kind(docs)[("Deployment", "evalstream")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_kubernetes_schemas(variant: str) -> None:
    docs = render(K8S / variant)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "ServiceMonitor"} <= kinds
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Service below instead
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_refer_to_each_other(variant: str) -> None:
    docs = render(K8S / variant)
    objs = by_kind(docs)
    dep = objs[("Deployment", "evalstream")]
    svc = objs[("Service", "evalstream")]
    mon = objs[("ServiceMonitor", "evalstream")]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["metadata"]["labels"]["release"] == "prometheus"  # what kube-prometheus-stack selects on
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    svc_ports = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
    assert svc_ports == {"grpc": "grpc", "metrics": "metrics"}
    assert {e["port"] for e in mon["spec"]["endpoints"]} == {"metrics"}
    # The settings file the container reads binds both ports the pod declares.
    config = yaml.safe_load(objs[("ConfigMap", "evalstream-config")]["data"]["evalstream.yaml"])
    assert config["grpc_address"].endswith(f":{ports['grpc']}")
    assert config["metrics_address"].endswith(f":{ports['metrics']}")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert config["data_dir"] == mounts["data"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] in {
        n for k, n in objs if k == "PersistentVolumeClaim"
    }
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert env["EVALSTREAM_CONFIG"] == f"{mounts['config']}/evalstream.yaml"
    # Probes: native gRPC on the gRPC port, except under TLS, which kubelet probes cannot speak.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if variant == "overlays/tls":
            assert c[probe]["exec"]["command"] == ["evalstream-healthcheck"] and "grpc" not in c[probe]
        else:
            assert c[probe]["grpc"]["port"] == ports["grpc"]
    # The dashboard ConfigMap carries the very file Grafana provisions in docker-compose.
    dash = objs[("ConfigMap", "evalstream-grafana-dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (ROOT / "deploy" / "grafana" / "dashboards" / "evalstream.json").read_text()
    assert json.loads(dash["data"]["evalstream.json"]) == json.loads(source)


def test_gpu_overlay_requests_a_gpu() -> None:
    c = container(render(K8S / "overlays/gpu"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "EVALSTREAM_DEVICE", "value": "cuda"} in c["env"]
    assert c["image"].endswith("-cuda")


def test_tls_overlay_points_settings_at_the_secret_volume() -> None:
    docs = render(K8S / "overlays/tls")
    c = container(docs)
    secret_mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "secrets")
    env = {e["name"]: e["value"] for e in c["env"]}
    for name in (
        "EVALSTREAM_TLS_CERT_FILE",
        "EVALSTREAM_TLS_KEY_FILE",
        "EVALSTREAM_TLS_CLIENT_CA_FILE",
        "EVALSTREAM_AUTH_TOKENS_FILE",
        "EVALSTREAM_AUTH_READ_ONLY_TOKENS_FILE",
    ):
        assert env[name].startswith(secret_mount + "/")
    dep = by_kind(docs)[("Deployment", "evalstream")]
    secret = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")
    assert secret["secret"]["optional"] is False


def test_settings_names_exist() -> None:
    """Every EVALSTREAM_* variable and config key in the manifests is a real setting."""
    settings = pytest.importorskip("evalstream.service.settings")
    fields = {f for f, _, _ in settings.Settings.describe()}
    for variant in VARIANTS:
        docs = render(K8S / variant)
        config = yaml.safe_load(by_kind(docs)[("ConfigMap", "evalstream-config")]["data"]["evalstream.yaml"])
        assert set(config) <= fields
        for e in container(docs).get("env", []):
            if not e["name"].startswith("EVALSTREAM_"):
                continue  # another program's variable (TORCHINDUCTOR_CACHE_DIR)
            name = e["name"].removeprefix("EVALSTREAM_").lower()
            assert name in fields or name in {"config", "healthcheck_ca_file"}, e["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_kernels_are_cached_on_the_data_volume(variant: str) -> None:
    """The root filesystem is read-only and /tmp an emptyDir, so inductor's default cache
    (/tmp/torchinductor_$USER) would be lost with the pod: every restart would compile from scratch."""
    c = container(render(K8S / variant))
    env = {e["name"]: e["value"] for e in c["env"]}
    data = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "data")
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(data.rstrip("/") + "/")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_renderer_agrees_with_kubectl(variant: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the Python renderer alone is used")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    theirs = by_kind([d for d in yaml.safe_load_all(out) if d])
    assert theirs == by_kind(render(K8S / variant))
