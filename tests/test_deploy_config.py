"""What can be checked of docker/ and docker-compose.yml without a Docker engine: the compose file's
services and mounts, Prometheus's config (promtool), the dashboard's PromQL against the metrics the
service really exports, a real Prometheus scraping a running service, and the secure defaults:
loopback-only ports, Grafana behind a login, Redis behind a password, API keys required, no secret
written in the compose file (`docker compose config` checks the file itself where Compose is installed)."""

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
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
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


# The variables compose must be given; each is required (${NAME:?message}) where it is used.
SECRETS = ("REDIS_PASSWORD", "CARSEG_API_KEYS", "GRAFANA_ADMIN_PASSWORD")


def _compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _required(value, name: str) -> bool:
    """Whether a compose value is exactly a required variable, ${NAME:?message}."""
    return re.fullmatch(r"\$\{" + name + r":\?[^}]+\}", str(value)) is not None


def test_every_published_port_defaults_to_loopback():
    services = _compose()["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert {"api", "prometheus", "grafana"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str), f"{name}: write ports as strings with an explicit address: {port}"
            assert port.startswith(("${CARSEG_BIND_ADDRESS:-127.0.0.1}:", "127.0.0.1:")), f"{name} publishes {port} on all interfaces"
    # Prometheus has no login: the bind-address switch must not expose it.
    assert all(p.startswith("127.0.0.1:") for p in published["prometheus"])
    for name in ("worker", "worker-cpu", "redis"):
        assert not services[name].get("ports"), f"{name} has no auth to publish behind"


def test_grafana_requires_a_login_with_a_password_from_the_environment():
    env = _compose()["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    if "GF_SECURITY_ADMIN_PASSWORD__FILE" in env:
        assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    else:
        assert _required(env["GF_SECURITY_ADMIN_PASSWORD"], "GRAFANA_ADMIN_PASSWORD")


def test_redis_requires_a_password_from_the_environment_and_keeps_aof():
    services = _compose()["services"]
    redis = services["redis"]
    assert _required(redis["environment"]["REDIS_PASSWORD"], "REDIS_PASSWORD")
    shell, flag, script = redis["command"]
    assert (shell, flag) == ("sh", "-c")
    assert re.search(r'--requirepass "\$\$REDIS_PASSWORD"', script)
    assert "--appendonly yes" in script
    # The image's entrypoint drops root only for a command starting with redis-server.
    assert script.startswith("exec docker-entrypoint.sh redis-server ")
    check = " ".join(redis["healthcheck"]["test"])
    assert '-a "$$REDIS_PASSWORD"' in check and "grep -q PONG" in check  # redis-cli exits 0 on NOAUTH
    for name in ("api", "worker", "worker-cpu"):
        url = services[name]["environment"]["CARSEG_REDIS_URL"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD(:\?[^}]+)?\}@redis:6379/\d+", url), f"{name}: {url}"


def test_the_api_gets_its_keys_from_a_required_variable_and_metrics_stay_scrapable():
    api = _compose()["services"]["api"]
    assert "0.0.0.0" in api["command"]  # why keys are required at all
    assert _required(api["environment"]["CARSEG_API_KEYS"], "CARSEG_API_KEYS")
    # Prometheus scrapes without a key; it is itself reachable on 127.0.0.1 only.
    assert str(api["environment"].get("CARSEG_METRICS_REQUIRE_KEY", "false")).lower() == "false"
    for name in ("worker", "worker-cpu"):  # workers take jobs from Redis, never requests: no keys
        assert "CARSEG_API_KEYS" not in _compose()["services"][name]["environment"]


def test_no_literal_secret_in_the_compose_file():
    text = (REPO / "docker-compose.yml").read_text()
    assert not re.search(r"(?i)password=(?!\$)", text), "a password= with a literal value"
    assert not re.search(r"requirepass\s+(?!\\?[\"']?\$)", text), "requirepass with a literal value"
    assert not re.search(r"redis://[^:/@\s]*:(?!\$)[^@\s]+@", text), "a literal password in a Redis URL"
    secretish = re.compile(r"(?i)(password|secret|token|api_keys)(?!__file)")
    for name, service in _compose()["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        for key, value in env.items():
            if secretish.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key} is not a required variable"


def test_env_example_names_every_required_variable_left_empty_and_env_is_ignored():
    required = set(re.findall(r"\$\{([A-Z_]+):\?", (REPO / "docker-compose.yml").read_text()))
    assert required == set(SECRETS)
    text = (REPO / ".env.example").read_text()
    example = dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    assert required | {"CARSEG_BIND_ADDRESS"} <= set(example)
    for name in required:  # empty, so `:?` refuses a copied example instead of running on known secrets
        assert example[name] == "", f"{name} has a value in .env.example"
        assert re.search(rf"^# e\.g\. {name}=.*change-me", text, re.M), f"{name} has no placeholder comment"
    assert example["CARSEG_BIND_ADDRESS"] == "127.0.0.1"
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


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
