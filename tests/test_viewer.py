"""The viewer page at ``/``: its files are served (open, same-origin only), and in a real browser
(Debian's chromium driven by Playwright) it segments an LIDC crop and draws k sample canvases.
The browser test leaves a screenshot of the bundled model at work in docs/viewer.png."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.server import open_queue
from tests.conftest import require_binary
from tests.embedded import EmbeddedServer
from tests.queue_backends import REPO
from training.data.lidc_sample import LidcSample

STATIC = REPO / "service" / "api" / "static"
SCREENSHOT = REPO / "docs" / "viewer.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
K, SEED = 8, 7


@pytest.fixture(scope="module")
def client(model_dir):
    # no lifespan (no ``with``): the page's routes need neither models nor a queue. Keys are
    # required, to show that the page itself is open (it asks for the key and sends it)
    return TestClient(create_app(Settings(model_dir=model_dir, api_keys="viewer-test-key"), open_queue))


def test_the_page_and_its_files_are_served_without_a_key(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "static/viewer.js" in page.text and "static/viewer.css" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, media_type in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media_type), name
    for path in ("/static/index.html.bak", "/static/..%2Fapp.py", "/static/../routes/viewer.py"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"] == "not_found", path
    assert client.get("/v1/models").status_code == 401  # the API behind it still asks for the key
    assert "/" not in client.get("/openapi.json", headers={"Authorization": "Bearer viewer-test-key"}).json()["paths"]


def test_the_viewer_references_no_other_host(client):
    # no CDN, no font service, no analytics: the page works where nothing else can be reached
    served = {path: client.get(path).text for path in ("/", "/static/viewer.js", "/static/viewer.css")}
    assert set(served) == {"/", *(f"/static/{p.name}" for p in STATIC.iterdir() if p.name != "index.html")}
    for path, text in served.items():
        assert re.findall(r"https?://", text) == [], path
        assert re.findall(r"//[a-z0-9-]+(?:\.[a-z0-9-]+)+[/:]", text, flags=re.IGNORECASE) == [], path  # protocol-relative


def lidc_crop_every_grader_marked(lidc_root) -> str:
    """The first test crop (by number) in which all four graders marked a nodule: on the first one of
    all, where one grader marked a speck, a model may rightly mark nothing."""
    dataset = LidcSample(lidc_root, "test")
    for index in range(len(dataset)):
        case = dataset[index]
        if len(case.labels) == 4 and all(label.sum() >= 10 for label in case.labels):
            return str(dataset.image_path(index))
    raise AssertionError(f"no test crop in {lidc_root} that every grader marked")


# per canvas: how many distinct colours it holds, and whether any pixel carries the overlay's tint
CANVAS_STATS = """
(selector) => [...document.querySelectorAll(selector)].map((canvas) => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  let tinted = 0;
  for (let i = 0; i < data.length; i += 4) {
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    if (data[i] > data[i + 2] + 40) tinted++;
  }
  return { width: canvas.width, height: canvas.height, colours: colours.size, tinted };
})
"""


def test_the_viewer_segments_an_lidc_crop_in_a_real_browser(lidc_root):
    chromium = require_binary("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    crop = lidc_crop_every_grader_marked(lidc_root)
    # the bundled models, so that the screenshot shows a trained model's samples
    with EmbeddedServer(Settings(model_dir=REPO / "models")) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 920})
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
            page.goto(server.url, wait_until="domcontentloaded")
            # functions, not expressions: the page's CSP forbids eval, which an expression would need
            page.wait_for_function("() => document.querySelector('#model').value === 'default'", timeout=10_000)

            page.set_input_files("#file", crop)
            page.fill("#k", str(K))
            page.fill("#seed", str(SEED))
            page.click("#run")
            page.wait_for_function(f"() => document.querySelectorAll('#samples canvas').length === {K}", timeout=20_000)
            page.wait_for_function("() => !document.querySelector('#download').disabled", timeout=5_000)

            assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
            samples = page.evaluate(CANVAS_STATS, "#samples canvas")
            assert len(samples) == K
            assert all((s["width"], s["height"]) == (128, 128) and s["colours"] > 50 for s in samples), samples
            assert any(s["tinted"] > 0 for s in samples), "no sample marks a nodule on an LIDC crop that has one"
            (contours,) = page.evaluate(CANVAS_STATS, "#contours")
            assert contours["width"] >= 512 and contours["colours"] > 50, contours
            assert page.evaluate("() => document.querySelector('#heat').naturalWidth") == 128
            assert f"seed {SEED}" in page.locator("#summary").text_content()
            assert problems == []

            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            with page.expect_download(timeout=5_000) as download:
                page.click("#download")
            saved = json.loads(Path(download.value.path()).read_text())
            assert {"samples", "contours", "uncertainty"} <= set(saved) and len(saved["samples"]["masks"]) == K
            assert saved["samples"]["seed"] == saved["contours"]["seed"] == saved["uncertainty"]["seed"] == SEED

            # a refusal is shown as the service's {"error", "detail"} (the browser logs the 415 itself)
            page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
            page.click("#run")
            page.locator("#error").wait_for(state="visible", timeout=10_000)
            assert page.locator("#error").text_content().startswith("unsupported_media_type: the image must be")
        finally:
            browser.close()
