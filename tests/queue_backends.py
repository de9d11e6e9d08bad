"""Both JobQueue backends behind one async context manager, for the contract suite."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager

import numpy as np
import redis
import torch

from service.config import Settings
from service.inference import Job
from service.metrics import Metrics
from service.queue.local import LocalQueue
from service.queue.redis_protocol import Keys
from service.queue.redis_queue import RedisQueue
from service.registry import ModelRegistry
from service.worker import Worker


def make_job(k: int = 3, seed: int = 0, side: int = 16, timeout_s: float = 20.0, model: str = "tiny", image_seed: int = 0) -> Job:
    image = np.random.default_rng(image_seed).uniform(-1, 1, (1, side, side)).astype(np.float32)
    return Job(model=model, version="1", image=image, k=k, seed=seed, deadline=time.time() + timeout_s)


def fake_heartbeat(url: str, settings: Settings, model: str = "tiny") -> None:
    """A worker that is alive but takes nothing: what the API sees of a stuck worker."""
    redis.Redis.from_url(url).zadd(Keys(settings.redis_prefix).heartbeats(model), {"stuck-worker": time.time() + 3600})


@asynccontextmanager
async def open_backend(kind: str, model_dir, redis_url: str | None = None, consumer: bool = True, **overrides):
    settings = Settings(
        model_dir=model_dir, queue=kind, redis_url=redis_url or "redis://127.0.0.1:1/0", visibility_timeout_s=2.0,
        heartbeat_interval_s=0.2, worker_block_ms=50, **overrides,
    )
    metrics, registry = Metrics(), ModelRegistry(model_dir)
    worker, thread = None, None
    if kind == "local":
        queue = LocalQueue(registry, torch.device("cpu"), metrics, settings.batch_max_samples, settings.batch_max_delay_ms / 1000,
                           settings.max_queued_jobs, settings.decode_batch)
        if consumer:
            await queue.start()
    else:
        queue = RedisQueue(settings, metrics, registry.names())
        await queue.start()
        if consumer:
            worker = Worker(settings, registry, torch.device("cpu"), name="test-worker")
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            while not (await queue.ready(registry.names()))[0]:
                await asyncio.sleep(0.02)  # polling for the worker's first heartbeat
        else:
            fake_heartbeat(settings.redis_url, settings)
    try:
        yield queue, settings, metrics
    finally:
        if worker is not None:
            worker.stop()
            await asyncio.to_thread(thread.join, 10)
        await queue.stop()
