"""The Redis path end to end, against real redis-server processes: HTTP through the API to worker
threads and worker processes, crash recovery, dead letters, deadlines and backpressure."""

import asyncio
import threading

import httpx
import pytest
import redis
import torch

from service.config import Settings
from service.queue.redis_protocol import GROUP, Keys, job_fields
from service.registry import ModelRegistry
from service.worker import Worker
from tests.conftest import RedisProcess
from tests.embedded import EmbeddedServer, wait_ready
from tests.queue_backends import fake_heartbeat, make_job
from tests.service_fixtures import grey, png

FAST = {"visibility_timeout_s": 2.0, "heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 1.0, "worker_block_ms": 50}


def settings_for(model_dir, url, **overrides):
    return Settings(model_dir=model_dir, queue="redis", redis_url=url, **{**FAST, **overrides})


class WorkerThread:
    def __init__(self, settings, name="thread-worker"):
        self.worker = Worker(settings, ModelRegistry(settings.model_dir), torch.device("cpu"), name=name)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.worker

    def __exit__(self, *exc):
        self.worker.stop()
        self.thread.join(10)


def post(url, data, **params):
    return httpx.post(f"{url}/v1/models/tiny/samples", files={"image": ("x", data)}, params=params, timeout=60)


def test_http_through_redis_to_a_worker_and_readiness_follows_the_worker(model_dir, redis_url):
    settings = settings_for(model_dir, redis_url)
    with EmbeddedServer(settings) as api:
        r = httpx.get(f"{api.url}/health/ready")
        assert r.status_code == 503 and "no live worker" in r.json()["detail"]
        assert post(api.url, png(grey())).status_code == 503
        with WorkerThread(settings):
            wait_ready(api.url)
            r = post(api.url, png(grey(30, 20)), k=3, seed=5)
            assert r.status_code == 200, r.text
            assert len(r.json()["masks"]) == 3 and r.json()["height"] == 30
            metrics = httpx.get(f"{api.url}/metrics").text
            assert 'carseg_workers_alive{model="tiny"} 1.0' in metrics
            assert 'carseg_queue_depth{model="tiny"} 0.0' in metrics
        wait_ready(api.url, expect=503)  # the worker withdrew its heartbeat on stop


def test_deadline_and_backlog_map_to_504_and_503(model_dir, redis_url):
    settings = settings_for(
        model_dir, redis_url, request_timeout_s=0.5, max_queued_jobs=1, visibility_timeout_s=0.45, heartbeat_ttl_s=0.4, heartbeat_interval_s=0.1,
    )
    fake_heartbeat(redis_url, settings)
    with EmbeddedServer(settings) as api:
        stream = redis.Redis.from_url(redis_url)

        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.create_task(client.post(f"{api.url}/v1/models/tiny/samples", files={"image": ("x", png(grey()))}))
                while stream.xlen(Keys("carseg").stream("tiny")) < 1:  # polling: the first job is on the stream
                    assert not first.done(), (await first).text
                    await asyncio.sleep(0.01)
                second = await client.post(f"{api.url}/v1/models/tiny/samples", files={"image": ("x", png(grey()))})
                return await first, second

        first, second = asyncio.run(main())
    assert first.status_code == 504 and first.json()["error"] == "deadline_exceeded"
    assert second.status_code == 503 and second.json()["error"] == "queue_full" and second.headers["retry-after"]


def test_worker_skips_expired_jobs(model_dir, redis_url):
    settings = settings_for(model_dir, redis_url)
    client = redis.Redis.from_url(redis_url)
    job = make_job(timeout_s=-1.0)
    client.xgroup_create(Keys("carseg").stream("tiny"), GROUP, id="0", mkstream=True)
    client.xadd(Keys("carseg").stream("tiny"), job_fields(job))
    counts = Worker(settings, ModelRegistry(model_dir), torch.device("cpu")).run(burst=True)
    assert counts["expired"] == 1 and counts["done"] == 0
    assert client.xlen(Keys("carseg").stream("tiny")) == 0
    assert client.blpop([Keys("carseg").result(job.id)], timeout=1)[1].startswith(b"E")


def test_poison_job_goes_to_dead_letter_and_the_others_are_fine(model_dir, redis_url):
    settings = settings_for(model_dir, redis_url, visibility_timeout_s=1.2, max_deliveries=2)
    keys = Keys("carseg")
    client = redis.Redis.from_url(redis_url)
    with EmbeddedServer(settings) as api, WorkerThread(settings) as worker:
        wait_ready(api.url)
        poison = job_fields(make_job())
        poison["id"], poison["shape"] = "poison", "1,99,99"  # the pixels do not fit the shape
        client.xadd(keys.stream("tiny"), poison)
        answers = [post(api.url, png(grey(seed=i)), k=2, seed=i) for i in range(4)]
        reply = client.blpop([keys.result("poison")], timeout=15)
    assert all(r.status_code == 200 for r in answers)
    assert reply is not None and b"dead-lettered" in reply[1]
    dead = client.xrange(keys.dead("tiny"))
    assert len(dead) == 1 and dead[0][1][b"id"] == b"poison" and b"image" not in dead[0][1]
    assert int(client.hget(keys.stats, "dead_letters")) == 1 and worker.counts["dead_lettered"] == 1
    assert client.xlen(keys.stream("tiny")) == 0


def test_redis_restart_while_idle_recovers(model_dir):
    server = RedisProcess().start()
    try:
        settings = settings_for(model_dir, server.url)
        with EmbeddedServer(settings) as api, WorkerThread(settings):
            wait_ready(api.url)
            assert post(api.url, png(grey()), k=1).status_code == 200
            server.stop()
            wait_ready(api.url, expect=503)
            detail = httpx.get(f"{api.url}/health/ready").json()["detail"]
            assert detail.startswith("Redis unavailable") and "127.0.0.1" not in detail and str(server.port) not in detail
            server.start()
            wait_ready(api.url, timeout=30)
            r = post(api.url, png(grey()), k=2)
            assert r.status_code == 200, r.text
    finally:
        server.stop()


def test_settings_keep_the_visibility_timeout_inside_the_deadline():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(visibility_timeout_s=60.0, request_timeout_s=60.0)  # a reclaimed job would have no time left
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(heartbeat_ttl_s=30.0, visibility_timeout_s=30.0)
    with pytest.raises(ValidationError, match="twice heartbeat_interval_s"):
        Settings(heartbeat_interval_s=3.0, heartbeat_ttl_s=4.0)
    defaults = Settings()
    assert defaults.heartbeat_ttl_s < defaults.visibility_timeout_s < defaults.request_timeout_s
