"""Static checks of deploy/: promtool on the Prometheus files, the dashboard's structure,
Grafana provisioning, docker-compose and the Dockerfile, and the image's health check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evalstream.service.engine.registry import metric_infos
from evalstream.service.exporter import QualityCollector
from evalstream.service.status import FinalizedView, SeriesKey, ShardProgress
from evalstream.service.telemetry import Telemetry
from tests.observability import dashboard
from tests.observability.promtools import promtool
from tests.observability.sources import MemoryFinalized, MemoryProgress, make_result

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROM = DEPLOY / "prometheus"


def test_promtool_check_config_and_rules() -> None:
    proc = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout
    proc = promtool("check", "rules", str(PROM / "evalstream.rules.yml"))
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests() -> None:
    proc = promtool("test", "rules", str(PROM / "rules_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def exported_names() -> set[str]:
    """Every sample name the server can export: telemetry plus a fully populated collector."""
    telemetry = Telemetry()
    telemetry.rpc_errors.labels(method="GetEvaluation", code="NOT_FOUND")
    result = make_result()
    for name in metric_infos((1, 5)):
        result.metrics[name] = 0.5
    finalized = MemoryFinalized()
    key = SeriesKey("r", "m", "validation")
    finalized.put(FinalizedView(key, 1, 1.0, result))
    progress = MemoryProgress([ShardProgress(key, 2, 0, 2, 0, 10, 5.0, 5, 1.0)])
    telemetry.registry.register(QualityCollector(finalized=finalized, progress=progress))
    text = generate_latest(telemetry.registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(evalstream_[a-z0-9_]+)\b", expr))


def test_every_metric_the_dashboard_and_rules_use_is_exported() -> None:
    names = exported_names()
    exprs = [q.expr for q in dashboard.queries()]
    exprs += [v["definition"] for v in dashboard.variables().values() if v["type"] == "query"]
    rules = yaml.safe_load((PROM / "evalstream.rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metric_names_in(e) for e in exprs))
    selectors = set().union(*(re.findall(r'__name__=~"([^"]+)"', e) for e in exprs))
    assert len(used) > 30
    assert used <= names, sorted(used - names)
    for pattern in selectors:
        assert any(re.fullmatch(pattern, n) for n in names), pattern


def test_dashboard_is_ready_for_file_provisioning() -> None:
    dash = dashboard.load()
    text = dashboard.DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in dash  # import placeholders fail under file provisioning
    variables = dashboard.variables(dash)
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (prom,) = datasources["datasources"]
    assert ds["current"]["value"] == prom["uid"] and prom["type"] == "prometheus"
    assert {"run", "model", "split"} <= variables.keys()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            dashboard.substitute(t["expr"], {"run": "r", "model": "m", "split": "s"})  # no unknown variables
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in (
        "loss",
        "accuracy",
        "calibration",
        "reliability",
        "head / torso / tail",
        "throughput",
        "latency",
        "rejected",
        "rpc errors",
        "ranks closed",
    ):
        assert needed in titles, needed


def test_dashboard_provider_points_where_compose_mounts_the_dashboards() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/evalstream.yml").read_text())
    (p,) = provider["providers"]
    assert p["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1)
        for v in compose["services"]["grafana"]["volumes"]
        if v.startswith("./")
    )
    assert mounts["./grafana/dashboards"] == p["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_compose_stack_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"evalstream", "prometheus", "grafana"}
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), vol
            else:
                assert src in compose["volumes"], vol
    build = services["evalstream"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    env = services["evalstream"]["environment"]
    prom_cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = prom_cfg["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"evalstream:{env['EVALSTREAM_METRICS_ADDRESS'].rsplit(':', 1)[1]}"
    # Compiled kernels survive a restart: inductor's cache on the data volume, where the image puts it.
    data_mount = next(
        v.split(":")[1] for v in services["evalstream"]["volumes"] if v.startswith("evalstream-data:")
    )
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(data_mount + "/")
    image_env = re.search(r"TORCHINDUCTOR_CACHE_DIR=(\S+)", (DEPLOY / "Dockerfile").read_text())
    assert image_env and image_env.group(1) == env["TORCHINDUCTOR_CACHE_DIR"]
    # Prometheus reads its rules next to its config: compose mounts the folder at /etc/prometheus.
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_dockerfile_runs_unprivileged_with_a_grpc_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD \[\"evalstream-healthcheck\"\]", text, re.M)
    assert "-slim" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    copies = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.M)
    assert len(copies) >= 5
    for src in copies:
        for path in src.split():
            assert (DEPLOY.parent / path).exists(), path
            assert f"!{path}" in ignore or f"!{path}/" in ignore, f"{path} is excluded from the build context"


def test_healthcheck_script_against_a_real_server(tmp_path: Path) -> None:
    server_mod = pytest.importorskip("evalstream.service.server")
    settings_mod = pytest.importorskip("evalstream.service.settings")
    settings = settings_mod.Settings.load(
        env={},
        grpc_address="127.0.0.1:0",
        metrics_address="",
        data_dir=str(tmp_path / "d"),
        device="cpu",
        engine_backend=os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager"),
    )
    script = str(DEPLOY / "docker" / "healthcheck.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}
    with server_mod.BackgroundServer(settings) as srv:
        env["EVALSTREAM_HEALTHCHECK_ADDRESS"] = srv.target
        ok = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stdout + ok.stderr
    down = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "unhealthy" in down.stderr
