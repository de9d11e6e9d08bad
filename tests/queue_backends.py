"""Both JobQueue backends behind one async context manager, for the contract suite, assembled the
way the processes assemble them (``service.server`` for the in-process queue, ``Worker`` for Redis)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import redis
import torch

from service.config import Settings
from service.jobs import Job, Output
from service.metrics import Metrics
from service.queue.base import JobQueue
from service.queue.redis_protocol import Keys
from service.queue.redis_queue import RedisQueue
from service.registry import ModelRegistry
from service.server import local_queue
from service.worker import Worker

REPO = Path(__file__).resolve().parents[1]
ALL_OUTPUTS = frozenset(Output)


def make_job(k: int = 3, seed: int = 0, side: int = 16, timeout_s: float = 20.0, model: str = "tiny", image_seed: int = 0,
             outputs: frozenset[Output] = ALL_OUTPUTS) -> Job:
    image = np.random.default_rng(image_seed).integers(0, 256, (side, side, 1), dtype=np.uint8)
    return Job(model=model, version="1", image=image, k=k, seed=seed, deadline=time.time() + timeout_s, outputs=outputs)


def fake_heartbeat(url: str, settings: Settings, model: str = "tiny") -> None:
    """A worker that is alive but takes nothing: what the API sees of a stuck worker."""
    redis.Redis.from_url(url).zadd(Keys(settings.redis_prefix).heartbeats(model), {"stuck-worker": time.time() + 3600})


def worker_process(model_dir: Path, redis_url: str, log: Path, *args: str, **settings: object) -> subprocess.Popen:
    """``carseg worker`` as its own process, one torch thread, its log in ``log``; ``settings`` become CARSEG_ variables."""
    env = {**os.environ, "CARSEG_MODEL_DIR": str(model_dir), "CARSEG_REDIS_URL": redis_url, "PYTHONPATH": str(REPO),
           **{f"CARSEG_{k.upper()}": str(v) for k, v in settings.items()}}
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, "-m", "carseg", "worker", "--threads", "1", "--device", "cpu", *args], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    """Poll ``check`` every 10 ms until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not true within {timeout_s} s"
        await asyncio.sleep(0.01)  # polling interval


async def depth(queue: JobQueue, metrics: Metrics) -> float:
    """Jobs waiting, as the queue reports them to Prometheus."""
    await queue.observe()
    return sum(s.value for m in metrics.registry.collect() if m.name == "carseg_queue_depth" for s in m.samples)


async def ready(queue: JobQueue, models: list[str]) -> bool:
    return (await queue.ready(models))[0]


@asynccontextmanager
async def open_backend(kind: str, model_dir, redis_url: str | None = None, consumer: bool = True, **overrides):
    settings = Settings(
        model_dir=model_dir, queue=kind, redis_url=redis_url or "redis://127.0.0.1:1/0", visibility_timeout_s=2.0,
        heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0, worker_block_ms=50, device="cpu", **overrides,
    )
    metrics, registry = Metrics(), ModelRegistry(model_dir)
    worker, thread = None, None
    if kind == "local":
        queue = local_queue(settings, registry, metrics, consumer=consumer)
        await queue.start()
    else:
        queue = RedisQueue(settings, metrics, registry.names())
        await queue.start()
        if consumer:
            worker = Worker(settings, registry, torch.device("cpu"), name="test-worker")
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            await wait_until(lambda: ready(queue, registry.names()))  # the worker's first heartbeat
        else:
            fake_heartbeat(settings.redis_url, settings)
    try:
        yield queue, settings, metrics
    finally:
        if worker is not None:
            worker.stop()
            await asyncio.to_thread(thread.join, 10)
        await queue.stop()
