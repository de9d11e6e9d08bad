"""Who gets in and what a request may cost: API keys, CORS, the refusal to bind beyond loopback
without keys, the rate limit and in-flight caps, admission before the body is read, the cost limit
(pixels x k) before any pixel is decoded, the bounds stated in the OpenAPI schema, 405 with Allow,
and the request id."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.admission import Admission
from service.api.app import create_app
from service.api.auth import ApiKeys, check_bind, is_loopback, parse_keys
from service.config import Settings, masked_url
from service.errors import QueueFull, RateLimited, Unavailable
from service.server import open_queue
from tests.embedded import EmbeddedServer
from tests.queue_backends import REPO
from tests.service_fixtures import grey, png

KEY = "k3y-for-tests"


@pytest.fixture(scope="module")
def keyed(model_dir):
    digest = hashlib.sha256(b"second-key").hexdigest()
    settings = Settings(model_dir=model_dir, api_keys=f"{KEY},sha256:{digest}", cors_origins="https://viewer.example")
    with EmbeddedServer(settings) as srv:
        yield srv


def post(url, headers=None, **params):
    return httpx.post(f"{url}/v1/models/tiny/samples", files={"image": ("x.png", png(grey()))}, params={"k": 2, **params},
                      headers=headers or {}, timeout=30)


def test_keys_are_required_and_compared_by_digest(keyed):
    assert post(keyed.url).status_code == 401
    r = post(keyed.url, {"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
    assert post(keyed.url, {"Authorization": f"Basic {KEY}"}).status_code == 401
    assert post(keyed.url, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert post(keyed.url, {"Authorization": "Bearer second-key"}).status_code == 200  # configured as sha256:<hex> only
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    assert httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    # health and metrics stay open (metrics_require_key is off by default)
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 200, path


def test_cors_lets_the_configured_origin_in_only(keyed):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(f"{keyed.url}/v1/models/tiny/samples", headers={"Origin": "https://viewer.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://viewer.example"
    other = httpx.options(f"{keyed.url}/v1/models/tiny/samples", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_metrics_can_require_a_key(model_dir):
    app = create_app(Settings(model_dir=model_dir, api_keys=KEY, metrics_require_key=True), open_queue)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_key_parsing_and_loopback():
    digest = hashlib.sha256(b"abc").digest()
    assert parse_keys(["abc", f"sha256:{digest.hex().upper()}", "", "# a comment"]) == [digest, digest]
    with pytest.raises(ValueError):
        parse_keys(["sha256:1234"])
    assert ApiKeys([]).caller(None).id == "anonymous"
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))


def test_serving_beyond_loopback_without_keys_refuses_to_start(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEG_")}
    cmd = [sys.executable, "-m", "carseg", "serve", "--host", "0.0.0.0", "--port", "1", "--model-dir", str(model_dir)]
    r = subprocess.run(cmd, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "refusing to listen on 0.0.0.0" in r.stderr and "CARSEG_API_KEYS" in r.stderr
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY}\n")
    check_bind(Settings(host="0.0.0.0", api_keys_file=keys_file), ApiKeys.from_settings(Settings(api_keys_file=keys_file)))
    check_bind(Settings(host="127.0.0.1"), ApiKeys([]))  # loopback: keys optional


def test_urls_are_logged_with_the_password_masked():
    assert masked_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert masked_url("redis://user:s3cret@host/0") == "redis://user:***@host/0"
    assert masked_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_rate_limit_and_in_flight_caps():
    settings = Settings(rate_limit_per_s=1.0, rate_limit_burst=2, max_in_flight=3, max_in_flight_per_key=2)

    async def main():
        admission = Admission(settings)
        for _ in range(2):  # the burst
            async with admission.slot("a"):
                pass
        with pytest.raises(RateLimited) as limited:
            async with admission.slot("a"):
                pass
        assert limited.value.status == 429 and limited.value.headers["Retry-After"] == "1"
        async with admission.slot("b"):  # each key has its own bucket
            pass
        admission = Admission(settings.model_copy(update={"rate_limit_per_s": 0.0}))
        async with admission.slot("a"), admission.slot("a"):
            with pytest.raises(RateLimited, match="in flight"):  # the per-key cap
                async with admission.slot("a"):
                    pass
            async with admission.slot("b"):
                with pytest.raises(Unavailable, match="in flight"):  # the total cap
                    async with admission.slot("c"):
                        pass
        assert admission._total == 0 and admission._in_flight == {}

    asyncio.run(main())


def test_rate_limit_answers_429_with_retry_after(model_dir):
    settings = Settings(model_dir=model_dir, rate_limit_per_s=0.5, rate_limit_burst=1)
    with EmbeddedServer(settings) as srv:
        assert post(srv.url).status_code == 200
        r = post(srv.url)
        assert r.status_code == 429 and r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) >= 1


class _FullQueue:
    async def start(self): ...
    async def stop(self): ...
    async def ready(self, models): return True, "ok"
    async def observe(self): ...
    async def admit(self, model, deadline): raise QueueFull("full")
    async def submit(self, job): raise AssertionError("a refused request reached submit")


def test_a_full_queue_refuses_before_the_body_is_read(model_dir):
    app = create_app(Settings(model_dir=model_dir), lambda settings, registry, metrics: _FullQueue())
    read = []

    def body():
        read.append(True)
        yield b"x" * 1024

    with TestClient(app) as client:
        r = client.post("/v1/models/tiny/samples", content=body(), headers={"Content-Type": "application/json"})
    assert r.status_code == 503 and r.json()["error"] == "queue_full"
    assert not read, "the body was read although the request was refused"


def test_cost_is_pixels_times_k_and_refused_before_decoding(model_dir):
    settings = Settings(model_dir=model_dir, max_pixel_samples=64 * 64 * 8)
    with EmbeddedServer(settings) as srv:
        assert post_image(srv.url, grey(64, 64), k=8).status_code == 200
        r = post_image(srv.url, grey(64, 64), k=9)
        assert r.status_code == 413 and "pixel-samples" in r.json()["detail"] and "at most 8" in r.json()["detail"]
        assert post_image(srv.url, grey(128, 128), k=2).status_code == 200
        assert post_image(srv.url, grey(128, 128), k=3).status_code == 413


def post_image(url, image, **params):
    return httpx.post(f"{url}/v1/models/tiny/samples", files={"image": ("x.png", png(image))}, params=params, timeout=30)


def test_openapi_states_the_bounds_and_405_names_allow(model_dir):
    app = create_app(Settings(model_dir=model_dir, max_k=32), open_queue)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        samples = schema["paths"]["/v1/models/{name}/samples"]["post"]
        k = next(p for p in samples["parameters"] if p["name"] == "k")["schema"]["anyOf"][0]
        seed = next(p for p in samples["parameters"] if p["name"] == "seed")["schema"]["anyOf"][0]
        assert (k["minimum"], k["maximum"]) == (1, 32) and (seed["minimum"], seed["maximum"]) == (0, 2**63 - 1)
        body_k = samples["requestBody"]["content"]["application/json"]["schema"]["properties"]["k"]["anyOf"][0]
        assert body_k["maximum"] == 32
        assert set(samples["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
        assert {"401", "413", "429", "503", "504"} <= set(samples["responses"])
        metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert "application/json" not in metrics and "text/plain" in metrics
        r = client.get("/v1/models/tiny/samples")
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_request_id_is_returned_and_a_plain_client_id_is_kept(model_dir):
    app = create_app(Settings(model_dir=model_dir), open_queue)
    with TestClient(app) as client:
        made = client.get("/health/live").headers["x-request-id"]
        assert len(made) == 32
        assert client.get("/health/live", headers={"X-Request-ID": "viewer-42"}).headers["x-request-id"] == "viewer-42"
        forged = client.get("/health/live", headers={"X-Request-ID": "a\"}\n{evil"}).headers["x-request-id"]
        assert forged != "a\"}\n{evil" and len(forged) == 32


def test_query_bounds_hold_even_where_the_json_body_overrides_them(model_dir):
    # found by schemathesis: the body's k and seed won, so the query's k=-2703 went unchecked
    app = create_app(Settings(model_dir=model_dir), open_queue)
    body = {"image": base64.b64encode(png(grey(16, 16))).decode(), "k": 2, "seed": 1}
    with TestClient(app) as client:
        assert client.post("/v1/models/tiny/samples", params={"k": -2703}, json=body).status_code == 422
        assert client.post("/v1/models/tiny/samples", params={"seed": 2**64}, json=body).status_code == 422
        assert client.post("/v1/models/tiny/samples", params={"k": 3}, json=body).json()["k"] == 2
