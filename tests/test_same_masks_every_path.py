"""The same (image, seed, k) gives byte-identical masks whichever way it is served: the in-process
queue, Redis with one worker, Redis with two worker processes, each batching the requests
differently. The bundled default model on real LIDC crops, so the masks are not trivial."""

import asyncio
import time

import httpx
import numpy as np
import pytest

from service.config import REPO_MODELS, Settings
from tests.embedded import EmbeddedServer, free_port, wait_ready
from tests.queue_backends import worker_process
from tests.service_fixtures import decode_png

# 12 requests: 4 crops x 3 (seed, k), sent at once so that each path batches them its own way
REQUESTS = [(crop, seed, k) for crop in range(4) for seed, k in ((3, 1), (11, 8), (12345, 5))]


def crops(lidc_root) -> list[bytes]:
    return [p.read_bytes() for p in sorted((lidc_root / "testing").glob("*/image_*.jpg"))[:4]]


def masks_from(url: str, images: list[bytes]) -> list[list[str]]:
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(crop, seed, k):
                r = await client.post(f"{url}/v1/models/default/samples", files={"image": ("x.jpg", images[crop])},
                                      params={"k": k, "seed": seed})
                assert r.status_code == 200, r.text
                return r.json()["masks"]
            return await asyncio.gather(*(one(*request) for request in REQUESTS))

    return asyncio.run(run())


def worker_jobs_done(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith('carseg_jobs_total{outcome="done"}'))


def wait_for_workers(url: str, workers: int, timeout_s: float = 60.0) -> None:
    """Ready needs one live worker; this needs all of them, as the API's gauge counts them."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        alive = [float(line.split()[-1]) for line in text.splitlines() if line.startswith('carseg_workers_alive{model="default"}')]
        if alive and alive[0] >= workers:
            return
        assert time.monotonic() < deadline, f"{workers} workers never alive: {alive}"
        time.sleep(0.05)  # polling interval


@pytest.fixture(scope="module")
def local_masks(lidc_root):
    with EmbeddedServer(Settings(model_dir=REPO_MODELS, device="cpu", batch_max_delay_ms=20)) as api:
        return masks_from(api.url, crops(lidc_root))


@pytest.mark.parametrize("workers", [1, 2])
def test_redis_with_one_or_two_workers_gives_the_in_process_masks(local_masks, lidc_root, redis_url, tmp_path, workers):
    ports = [free_port() for _ in range(workers)]
    procs = [worker_process(REPO_MODELS, redis_url, tmp_path / f"w{i}.log", "--metrics-port", str(port))
             for i, port in enumerate(ports)]
    try:
        settings = Settings(model_dir=REPO_MODELS, queue="redis", redis_url=redis_url, heartbeat_ttl_s=5.0)
        with EmbeddedServer(settings) as api:
            wait_ready(api.url, timeout=60)
            wait_for_workers(api.url, workers)
            got = masks_from(api.url, crops(lidc_root))
            done = [worker_jobs_done(port) for port in ports]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    assert sum(done) == len(REQUESTS) and all(n > 0 for n in done), done  # every worker served some
    assert got == local_masks  # the PNG bytes, mask by mask
    # k = 8 distinct samples, not one mask 8 times, where a crop is in doubt (on the first crop, where
    # one grader of four marked a speck, default v4 rightly marks nothing in all 8)
    eights = [[decode_png(m) for m in masks] for masks, (_, _, k) in zip(got, REQUESTS, strict=True) if k == 8]
    assert [len(masks) for masks in eights] == [8] * 4 and any(len({d.tobytes() for d in masks}) > 1 for masks in eights)
    assert all(np.isin(d, (0, 1)).all() for masks in eights for d in masks)
