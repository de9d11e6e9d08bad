"""A corpus of hostile and odd uploads against a real `carseg serve` process: each gets its expected
status with a JSON error body (never a 5xx or a traceback), nothing is unpickled, and the service's
RSS is read after each one: no upload may cost it more than a bounded amount, and it keeps serving."""

from __future__ import annotations

import base64
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.embedded import free_port, wait_ready
from tests.queue_backends import REPO
from tests.service_fixtures import grey, npy, png, write_tiny_model

MARKER = Path("/tmp/carseg-hostile-npy-was-unpickled")
RSS_HEADROOM = 600 * 2**20  # what one request may add to the service's resident memory, at most


def _bomb_png(side: int) -> bytes:
    """A valid PNG header of side x side 8-bit grey with a tiny compressed body of zeros."""
    raw = zlib.compress(b"\x00" * (side + 1) * 64)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _pil(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt) if mode else Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


class _Payload:
    """Unpickling this runs a shell command: a .npy with object dtype carrying it must never be loaded."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _pickle_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload()], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _rgba(grey_alpha: bool) -> np.ndarray:
    g = grey(24, 24)
    rgb = np.stack([g, g, g], axis=2) if grey_alpha else np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    return np.concatenate([rgb, np.full((24, 24, 1), 255, np.uint8)], axis=2)


def file(data: bytes, **params):
    return {"files": {"image": ("upload.bin", data)}, "params": params}


# (id, request, expected status, expected error reason or None for 200)
CORPUS = [
    ("png-8bit", file(png(grey(32, 32)), k=2), 200, None),
    ("png-16bit", file(png(grey(32, 32).astype(np.uint16) * 257), k=2), 200, None),
    ("npy-float32", file(npy(grey(32, 32).astype(np.float32) / 255), k=2), 200, None),
    ("npy-float64", file(npy(grey(32, 32).astype(np.float64) / 255), k=2), 200, None),
    ("npy-uint16-big-endian", file(npy(grey(32, 32).astype(">u2")), k=2), 200, None),
    ("jpeg", file(_pil(grey(32, 32), "JPEG"), k=2), 200, None),
    ("png-1x1", file(png(grey(1, 1)), k=2), 200, None),
    ("rgba-grey", file(_pil(_rgba(True), "PNG"), k=2), 200, None),
    ("rgba-colour", file(_pil(_rgba(False), "PNG"), k=2), 422, "invalid_parameter"),
    ("png-truncated", file(png(grey(32, 32))[:60]), 400, "invalid_image"),
    ("png-bomb-60000", file(_bomb_png(60000)), 413, "payload_too_large"),
    ("npy-object-pickle", file(_pickle_npy()), 422, "invalid_parameter"),
    ("npy-nan", file(npy(np.full((8, 8), np.nan, np.float32))), 422, "invalid_parameter"),
    ("npy-inf", file(npy(np.full((8, 8), np.inf, np.float32))), 422, "invalid_parameter"),
    ("npy-0x0", file(npy(np.zeros((0, 0), np.uint8))), 400, "invalid_image"),
    ("npy-3d-5-channels", file(npy(np.zeros((8, 8, 5), np.uint8))), 422, "invalid_parameter"),
    ("npy-4d", file(npy(np.zeros((2, 8, 8, 1), np.uint8))), 422, "invalid_parameter"),
    ("npy-int64", file(npy(np.zeros((8, 8), np.int64))), 422, "invalid_parameter"),
    ("npy-truncated", file(npy(np.zeros((8, 8), np.float32))[:-10]), 400, "invalid_image"),
    ("gif", file(_pil(grey(16, 16), "GIF")), 415, "unsupported_media_type"),
    ("tiff", file(_pil(grey(16, 16), "TIFF")), 415, "unsupported_media_type"),
    ("bmp", file(_pil(grey(16, 16), "BMP")), 415, "unsupported_media_type"),
    ("empty-file", file(b""), 400, "invalid_image"),
    ("empty-body", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "invalid_parameter"),
    ("no-content-type", {"content": png(grey(8, 8))}, 415, "unsupported_media_type"),
    ("bad-base64", {"json": {"image": "not*base64!"}}, 400, "invalid_request"),
    ("base64-of-garbage", {"json": {"image": base64.b64encode(b"garbage").decode()}}, 415, "unsupported_media_type"),
    ("k-0", file(png(grey(8, 8)), k=0), 422, "invalid_parameter"),
    ("k-text", file(png(grey(8, 8)), k="many"), 422, "invalid_parameter"),
    ("seed-negative", file(png(grey(8, 8)), seed=-1), 422, "invalid_parameter"),
    ("json-k-out-of-range", {"json": {"image": base64.b64encode(png(grey(8, 8))).decode(), "k": 65}}, 422, "invalid_parameter"),
    ("1024x1024-k8", file(png(grey(1024, 1024)), k=8), 200, None),
    ("json-1024x1024-float64", {"json": {"image": base64.b64encode(npy(np.random.default_rng(3).random((1024, 1024)))).decode(), "k": 1}}, 200, None),
    ("1024x1024-k64", file(png(grey(1024, 1024)), k=64), 413, "payload_too_large"),
    ("1025-wide", file(png(grey(4, 1025)), k=1), 413, "payload_too_large"),
    ("over-upload-limit", file(b"\x89PNG\r\n\x1a\n" + os.urandom(33 * 2**20)), 413, "payload_too_large"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    write_tiny_model(root / "models", "tiny")
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CARSEG_")}, "PYTHONPATH": str(REPO), "CARSEG_RATE_LIMIT_PER_S": "0"}
    with (root / "serve.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "carseg", "serve", "--port", str(port), "--model-dir", str(root / "models"), "--threads", "1"],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=60)
        httpx.post(f"{url}/v1/models/tiny/samples", **file(png(grey(64, 64)), k=4), timeout=60)  # warm up
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_every_hostile_file_gets_its_status_and_costs_bounded_memory(service):
    url, pid = service
    MARKER.unlink(missing_ok=True)
    baseline = rss(pid)
    rows = []
    for name, request, status, reason in CORPUS:
        r = httpx.post(f"{url}/v1/models/tiny/samples", timeout=60, **request)
        after = rss(pid)
        rows.append((name, r.status_code, (after - baseline) / 2**20))
        assert r.status_code == status, (name, r.text[:300])
        if reason is not None:
            assert r.json()["error"] == reason and r.json()["detail"] and "Traceback" not in r.text, (name, r.text[:300])
        assert after - baseline < RSS_HEADROOM, (name, after - baseline)
    print("\n" + "\n".join(f"{name:24s} {code}  RSS {growth:+7.1f} MB" for name, code, growth in rows))
    assert not MARKER.exists(), "an uploaded .npy was unpickled"
    assert httpx.post(f"{url}/v1/models/tiny/samples", **file(png(grey(16, 16)), k=1), timeout=30).status_code == 200
