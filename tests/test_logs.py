"""The service's logs, as a real `carseg serve` process writes them: one JSON object per line, the
request id on the request's lines and in its response header, model, k, status and timings on the
access line, and nothing of what the client sent: no file name, no pixels, no raw path or query."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.embedded import free_port, wait_ready
from tests.queue_backends import REPO
from tests.service_fixtures import grey, png, write_tiny_model

FILE_NAME = "DOE^JANE_1.2.840.113619.2.55.3.png"  # what a viewer export names a file: a patient's name and a study UID


@pytest.fixture(scope="module")
def served_log(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    write_tiny_model(root / "models", "tiny")
    port, log_path = free_port(), root / "serve.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CARSEG_")}, "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "carseg", "serve", "--port", str(port), "--model-dir", str(root / "models")],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    image = png(grey(40, 40))
    try:
        wait_ready(url, timeout=60)
        multipart = httpx.post(f"{url}/v1/models/tiny/samples", files={"image": (FILE_NAME, image)}, params={"k": 3, "seed": 11},
                               headers={"X-Request-ID": "viewer-7"}, timeout=30)
        as_json = httpx.post(f"{url}/v1/models/tiny/uncertainty", json={"image": base64.b64encode(image).decode(), "k": 2}, timeout=30)
        refused = httpx.post(f"{url}/v1/models/tiny/samples?k=999", files={"image": (FILE_NAME, image)}, timeout=30)
    finally:
        proc.terminate()
        proc.wait(30)
    return log_path.read_text(), (multipart, as_json, refused), image


def test_every_line_is_json_and_the_access_line_says_what_happened(served_log):
    text, (multipart, as_json, refused), _ = served_log
    assert multipart.status_code == 200 and as_json.status_code == 200 and refused.status_code == 422
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    access = [e for e in lines if e["logger"] == "carseg.access"]
    first = next(e for e in access if e.get("request_id") == "viewer-7")
    assert multipart.headers["x-request-id"] == "viewer-7"
    assert first["route"] == "/v1/models/{name}/samples" and first["status"] == 200 and first["model"] == "tiny"
    assert first["k"] == 3 and first["seconds"] > 0 and first["caller"] == "anonymous"
    second = next(e for e in access if e.get("request_id") == as_json.headers["x-request-id"])
    assert second["route"] == "/v1/models/{name}/uncertainty" and second["k"] == 2
    third = next(e for e in access if e.get("request_id") == refused.headers["x-request-id"])
    assert third["status"] == 422 and third["error"] == "invalid_parameter"


def test_no_file_name_pixels_or_query_reach_the_log(served_log):
    text, _, image = served_log
    for secret in (FILE_NAME, "DOE^JANE", "1.2.840.113619", "k=999", base64.b64encode(image).decode()[:40]):
        assert secret not in text, secret


def test_the_server_runs_on_httptools_and_uvloop(served_log):
    # the service's dependencies; without them uvicorn falls back to h11 and asyncio's loop, slower
    text, _, _ = served_log
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any("httptools parser, uvloop event loop" in e["message"] for e in lines), [e["message"] for e in lines]
