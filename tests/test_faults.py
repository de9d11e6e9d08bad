"""Faults under concurrent load, against a real redis-server and real `carseg worker` processes,
with the default heartbeat and visibility settings. Each test counts what its clients saw: sent,
answered correctly, failed with a clear error, lost (no HTTP answer), and the slowest answer.

- a worker killed with SIGKILL while it holds jobs: its jobs move once its heartbeat is stale
  (seconds), and every request is answered;
- Redis stopped and started again on its append-only file: the API and the workers wait it out,
  and every request is answered;
- the API killed with SIGKILL: its clients see a connection error, the workers still answer every
  job, and nothing is left in Redis once the results' TTL has passed;
- a model whose every job raises: its jobs are dead-lettered after max_deliveries, their clients
  get a clear 500, and the other model's requests are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from service.config import Settings
from service.queue.redis_protocol import GROUP, Keys
from tests.conftest import RedisProcess
from tests.embedded import EmbeddedServer, free_port, wait_ready
from tests.queue_backends import REPO, worker_process
from tests.service_fixtures import grey, png, write_tiny_model

pytestmark = pytest.mark.slow
KEYS = Keys("carseg")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root, "tiny")
    # a model whose manifest says 1 channel while its networks take 2: every job raises in the sampler
    folder = write_tiny_model(root, "broken", channels=2)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "in_channels": 1}))
    return root


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (connection error)
    seconds: float
    body: dict | None = None


@dataclass
class Tally:
    sent: int
    ok: int
    failed: int  # an HTTP error with a JSON {"error", "detail"} body
    lost: int  # no answer at all
    slowest_s: float

    def __str__(self) -> str:
        return f"sent {self.sent}, answered {self.ok}, failed {self.failed}, lost {self.lost}, slowest {self.slowest_s:.1f} s"


def tally(outcomes: list[Outcome], k: int) -> Tally:
    ok = sum(1 for o in outcomes if o.status == 200 and o.body is not None and len(o.body.get("masks", [])) == k)
    failed = sum(1 for o in outcomes if o.status not in (None, 200) and o.body is not None and {"error", "detail"} <= set(o.body))
    lost = sum(1 for o in outcomes if o.status is None)
    return Tally(len(outcomes), ok, failed, lost, max((o.seconds for o in outcomes), default=0.0))


class Load:
    """``n`` concurrent POSTs of ``image`` at ``k`` from a thread of their own; ``outcomes`` once joined."""

    def __init__(self, url: str, n: int, image: bytes, k: int, model: str = "tiny", timeout_s: float = 120) -> None:
        self.outcomes: list[Outcome] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(url, n, image, k, model, timeout_s)), daemon=True)
        self._thread.start()

    async def _run(self, url: str, n: int, image: bytes, k: int, model: str, timeout_s: float) -> None:
        async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=n)) as client:
            async def one(seed: int) -> Outcome:
                started = time.monotonic()
                try:
                    r = await client.post(f"{url}/v1/models/{model}/samples", files={"image": ("x.png", image)}, params={"k": k, "seed": seed})
                except httpx.HTTPError:
                    return Outcome(None, time.monotonic() - started)
                return Outcome(r.status_code, time.monotonic() - started, r.json())

            self.outcomes = list(await asyncio.gather(*(one(i) for i in range(n))))

    def join(self, timeout_s: float = 180) -> list[Outcome]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the clients did not finish"
        return self.outcomes


def start_workers(model_dir: Path, url: str, tmp_path: Path, n: int = 2, **settings: object) -> list[subprocess.Popen]:
    workers = [worker_process(model_dir, url, tmp_path / f"worker{i}.log", **settings) for i in range(n)]
    client, deadline = redis.Redis.from_url(url), time.monotonic() + 90
    while client.zcount(KEYS.heartbeats("tiny"), time.time() - 2, "+inf") < n:
        assert time.monotonic() < deadline, "the workers did not start"
        assert all(w.poll() is None for w in workers), "a worker exited during start-up"
        time.sleep(0.05)  # polling for their first heartbeats
    return workers


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@contextmanager
def served(model_dir: Path, url: str, tmp_path: Path) -> Iterator[str]:
    """Two worker processes and an API with the default settings over the Redis at ``url``; yields the API's URL."""
    workers = start_workers(model_dir, url, tmp_path)
    try:
        with EmbeddedServer(Settings(model_dir=model_dir, queue="redis", redis_url=url)) as api:
            wait_ready(api.url)
            yield api.url
    finally:
        stop_all(workers)


def holder(client: redis.Redis, timeout_s: float = 60) -> str:
    """The name of a consumer holding jobs, as soon as one does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.exists(KEYS.stream("tiny")):
            for consumer in client.xinfo_consumers(KEYS.stream("tiny"), GROUP):
                if consumer["pending"] > 0:
                    return consumer["name"].decode()
        time.sleep(0.01)  # polling for a worker holding jobs
    raise AssertionError("no worker took jobs")


def drained(client: redis.Redis, timeout_s: float = 60) -> None:
    """Wait until every job of the stream is answered: none queued, none pending."""
    deadline = time.monotonic() + timeout_s
    while client.xlen(KEYS.stream("tiny")) or client.xpending(KEYS.stream("tiny"), GROUP)["pending"]:
        assert time.monotonic() < deadline, "jobs were left in the stream"
        time.sleep(0.05)  # polling


def test_worker_killed_mid_batch_costs_seconds_not_the_deadline(model_dir, redis_url, tmp_path):
    settings = Settings()  # the defaults the service runs with: 4 s heartbeat TTL, 30 s visibility timeout
    client = redis.Redis.from_url(redis_url)
    with served(model_dir, redis_url, tmp_path) as url:
        load = Load(url, 40, png(grey(128, 128)), k=8)
        victim = holder(client)
        os.kill(int(victim.split("-")[-2]), signal.SIGKILL)
        killed = time.monotonic()
        while not client.hget(KEYS.stats, "redeliveries"):
            assert time.monotonic() - killed < settings.visibility_timeout_s, "the dead worker's jobs were not reclaimed"
            time.sleep(0.05)  # polling for the reclaim
        moved_after_s = time.monotonic() - killed
        result = tally(load.join(), k=8)
    reclaimed = int(client.hget(KEYS.stats, "redeliveries") or 0)
    print(f"\nworker SIGKILL: {result}, {reclaimed} jobs reclaimed {moved_after_s:.1f} s after the kill")
    assert (result.ok, result.failed, result.lost) == (40, 0, 0), result
    # the dead worker's jobs moved at its heartbeat's TTL (4 s) plus a scan, not at the visibility timeout (30 s)
    assert moved_after_s < settings.heartbeat_ttl_s + 4 * settings.heartbeat_interval_s, moved_after_s


def test_redis_restart_on_its_aof_loses_nothing(model_dir, tmp_path):
    server = RedisProcess(aof_dir=str(tmp_path)).start()
    try:
        with served(model_dir, server.url, tmp_path) as url:
            load = Load(url, 30, png(grey(256, 256)), k=8)
            holder(redis.Redis.from_url(server.url))
            server.stop()  # SIGTERM: Redis writes its AOF and exits, with jobs queued and in hand
            time.sleep(2.0)  # Redis away for two seconds: a restart, not an outage
            server.start()
            result = tally(load.join(), k=8)
    finally:
        server.stop()
    print(f"\nRedis restart (AOF): {result}")
    assert (result.ok, result.failed, result.lost) == (30, 0, 0), result


def test_worker_drains_on_sigterm(model_dir, redis_url, tmp_path):
    """What Kubernetes does to a worker on a scale-in or a node drain: SIGTERM. The worker stops
    reading, runs and acknowledges the jobs it holds, withdraws its heartbeat and exits 0, well
    inside its pod's grace (deploy/kubernetes/base/worker.yaml); nothing is reclaimed from it, the
    jobs it never took stay queued for the other worker, and every request is answered."""
    client = redis.Redis.from_url(redis_url)
    workers = start_workers(model_dir, redis_url, tmp_path)
    try:
        with EmbeddedServer(Settings(model_dir=model_dir, queue="redis", redis_url=redis_url)) as api:
            wait_ready(api.url)
            load = Load(api.url, 40, png(grey(128, 128)), k=8)
            victim = holder(client)
            process = next(w for w in workers if w.pid == int(victim.split("-")[-2]))
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rc = process.wait(30)
            exited_after_s = time.monotonic() - signalled
            consumers = {c["name"].decode(): c for c in client.xinfo_consumers(KEYS.stream("tiny"), GROUP)}
            left_for_the_other = client.xlen(KEYS.stream("tiny"))
            heartbeat = client.zscore(KEYS.heartbeats("tiny"), victim)
            result = tally(load.join(), k=8)
    finally:
        stop_all(workers)
    reclaimed = int(client.hget(KEYS.stats, "redeliveries") or 0)
    print(f"\nworker SIGTERM: exit {rc} after {exited_after_s:.2f} s, {left_for_the_other} jobs left in the stream; {result}")
    assert rc == 0 and consumers[victim]["pending"] == 0 and heartbeat is None
    assert exited_after_s < 10  # a batch, not the queue: the grace period (90 s) is never reached
    assert left_for_the_other > 0, "the victim drained the whole queue instead of stopping reading"
    assert reclaimed == 0, "the stopping worker left jobs to be reclaimed"
    assert (result.ok, result.failed, result.lost) == (40, 0, 0), result


def test_api_killed_leaves_nothing_behind(model_dir, redis_url, tmp_path):
    port = free_port()
    env = {**os.environ, "CARSEG_MODEL_DIR": str(model_dir), "CARSEG_REDIS_URL": redis_url, "CARSEG_RESULT_TTL_S": "3",
           "PYTHONPATH": str(REPO)}

    def api() -> subprocess.Popen:
        with (tmp_path / "api.log").open("ab") as log:
            return subprocess.Popen([sys.executable, "-m", "carseg", "serve", "--queue", "redis", "--port", str(port)], env=env, cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=log)

    client = redis.Redis.from_url(redis_url)
    workers = start_workers(model_dir, redis_url, tmp_path, result_ttl_s=3)
    procs = [*workers]
    try:
        url = f"http://127.0.0.1:{port}"
        first = api()
        procs.append(first)
        wait_ready(url, timeout=60)
        load = Load(url, 20, png(grey(256, 256)), k=8)
        holder(client)
        first.kill()
        first.wait(10)
        killed = tally(load.join(), k=8)
        second = api()
        procs.append(second)
        wait_ready(url, timeout=60)
        after = tally(Load(url, 8, png(grey(64, 64)), k=4).join(), k=4)
        drained(client)  # the workers answered every job, the dead API's included
        time.sleep(3.5)  # past the results' TTL
        left = client.keys("carseg:result:*") + client.keys("carseg:answered:*")
    finally:
        stop_all(procs)
    print(f"\nAPI SIGKILL: before the kill {killed}; after the restart {after}; keys left after the TTL: {len(left)}")
    assert killed.lost + killed.ok == 20 and killed.failed == 0 and killed.lost >= 1, killed
    assert (after.ok, after.failed, after.lost) == (8, 0, 0), after
    assert left == []


def test_a_job_that_always_fails_is_dead_lettered_and_the_others_are_served(model_dir, redis_url, tmp_path):
    settings = Settings()
    client = redis.Redis.from_url(redis_url)
    with served(model_dir, redis_url, tmp_path) as url:
        healthy = Load(url, 24, png(grey(128, 128)), k=4)
        poison = Load(url, 3, png(grey(32, 32)), k=2, model="broken")
        healthy_result, poisoned = tally(healthy.join(), k=4), poison.join()
    poison_result = tally(poisoned, k=2)
    print(f"\npoison jobs: {poison_result}; the other model's: {healthy_result}")
    assert (healthy_result.ok, healthy_result.failed, healthy_result.lost) == (24, 0, 0), healthy_result
    assert (poison_result.failed, poison_result.lost) == (3, 0), poison_result
    for o in poisoned:
        assert o.status == 500 and o.body["error"] == "inference_failed" and "dead-lettered" in o.body["detail"], o
    assert poison_result.slowest_s < settings.visibility_timeout_s, poison_result  # retried at once, not after the timeout
    dead = client.xrange(KEYS.dead("broken"))
    assert len(dead) == 3 and all(b"image" not in fields for _, fields in dead)
    assert client.xlen(KEYS.stream("broken")) == 0 and client.xlen(KEYS.stream("tiny")) == 0
