"""What can be checked of docker/ and docker-compose.yml without a Docker engine: the compose file's
services and mounts, Prometheus's config (promtool), the dashboard's PromQL against the metrics the
service really exports, and a real Prometheus scraping a running service."""

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from service.config import Settings
from service.metrics import Metrics
from tests.conftest import require_binary
from tests.embedded import EmbeddedServer, free_port
from tests.service_fixtures import grey, png, write_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_compose_services_and_mounts():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "worker", "worker-cpu", "prometheus", "grafana"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "redis" in services["api"]["command"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        build = service.get("build")
        if build:
            dockerfile = (REPO / build["context"] / build["dockerfile"]).read_text()
            assert f"AS {build['target']}" in dockerfile


def _stages(dockerfile: str) -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (its base, its instructions), from the FROM ... AS ... lines."""
    stages: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            current = []
            stages[words[3] if len(words) > 3 else words[1]] = (words[1], current)
        elif words:
            current.append(line)
    return stages


def _run_as(stages, name) -> str:
    """The user a stage's container runs as: its last USER, else its base stage's, else root."""
    base, lines = stages[name]
    users = [line.split()[1] for line in lines if line.split()[0] == "USER"]
    return users[-1] if users else _run_as(stages, base) if base in stages else "root"


def test_every_image_compose_builds_runs_as_a_user_the_image_creates():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    stages = _stages((REPO / "docker" / "Dockerfile").read_text())
    targets = {s["build"]["target"] for s in compose["services"].values() if "build" in s}
    assert targets == {"cpu", "cuda"}
    for target in targets:
        user = _run_as(stages, target)
        assert user not in ("root", "0"), f"{target} runs as root"
        created, stage = False, target
        while stage in stages:  # the user must be created in the stage or one it builds on
            base, lines = stages[stage]
            created |= any("useradd" in line and line.split()[-1] == user for line in lines)
            stage = base
        assert created, f"{target} runs as {user}, which no stage creates"


def test_prometheus_config_passes_promtool():
    result = subprocess.run([require_binary("promtool", "prometheus"), "check", "config", str(REPO / "docker/prometheus/prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_a_fixed_datasource_uid():
    ds = yaml.safe_load((REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["uid"] == "carseg-prometheus" and ds["type"] == "prometheus"
    dashboard = json.loads((REPO / "docker/grafana/dashboards/carseg.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"]


def _exported_metric_names():
    names = set()
    for family in Metrics().registry.collect():
        kind = family.type
        names.add(family.name + ("_total" if kind == "counter" else ""))
        if kind == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
    return names


def test_every_dashboard_expression_names_exported_metrics():
    exported = _exported_metric_names()
    dashboard = json.loads((REPO / "docker/grafana/dashboards/carseg.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert any("p99" in t for t in titles) and any("Queue depth" in t for t in titles) and any("Batch size" in t for t in titles)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"\bcarseg_[a-z_]+", target["expr"]))
            assert used, f"{panel['title']}: no carseg metric in {target['expr']}"
            assert used <= exported, f"{panel['title']}: {used - exported} not exported"


def test_a_real_prometheus_scrapes_the_service_and_answers_a_latency_quantile(tmp_path):
    binary = require_binary("prometheus", "prometheus")
    write_tiny_model(tmp_path / "models", "tiny")
    with EmbeddedServer(Settings(model_dir=tmp_path / "models")) as api:
        config = tmp_path / "prometheus.yml"
        target = api.url.removeprefix("http://")
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "carseg", "static_configs": [{"targets": [target]}]}],
        }))
        port = free_port()
        prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            query = ('histogram_quantile(0.5, sum by (le) (rate(carseg_request_duration_seconds_bucket'
                     '{route="/v1/models/{name}/samples"}[30s])))')
            deadline = time.monotonic() + 60
            value = None
            while time.monotonic() < deadline and value is None:
                httpx.post(f"{api.url}/v1/models/tiny/samples", files={"image": ("x", png(grey()))}, params={"k": 2})
                try:
                    result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
                    rows = result["data"]["result"]
                    if rows and rows[0]["value"][1] not in ("NaN", "+Inf"):
                        value = float(rows[0]["value"][1])
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.5)  # the scrape interval is 1 s; poll, bounded by the deadline
        finally:
            prom.terminate()
            prom.wait(10)
    assert value is not None, "Prometheus never produced the quantile"
    assert 0 < value < 120
