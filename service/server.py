"""``carseg serve``: the HTTP process, the app assembled with its queue. With ``--queue redis`` the
API only queues jobs and reads manifests (workers run the networks), so this process never imports
torch; with the in-process queue runner threads here load the models and run them."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from service.api.app import create_app
from service.config import Settings, get_settings
from service.metrics import Metrics
from service.queue.base import JobQueue
from service.queue.local import LocalQueue
from service.registry import ModelRegistry

log = logging.getLogger(__name__)

def local_queue(settings: Settings, registry: ModelRegistry, metrics: Metrics, consumer: bool = True) -> LocalQueue:
    """The in-process queue with its runner thread (started with the queue), the registry's models
    loaded on ``settings.device`` before it takes traffic: ready means ready."""
    queue = LocalQueue(metrics, settings.max_queued_jobs)
    if consumer:
        # imported here: only the in-process queue runs networks in this process
        import torch

        from service.runner.loop import WIDE_MIN_SAMPLES, RunnerPool, ThreadShare, build_runner
        from service.runner.models import ModelPool
        from training.sampling import use_device

        device = use_device(settings.device)
        pool = ModelPool(registry, device)
        pool.load_latest(registry.names())
        metrics.serve_models(registry.names())
        total = torch.get_num_threads()
        executors = executor_count(settings.executors, device.type, total)
        share = None
        if device.type == "cpu" and executors > 1:
            # the threads this process computes with, shared out: one pool of N threads under each
            # of N executors would oversubscribe the cores N times
            share = ThreadShare(total, executors)
            torch.set_num_threads(share.narrow)
        lone = f" (all {share.total} for a lone batch of {WIDE_MIN_SAMPLES}+ samples)" if share else ""
        log.info("in-process runner: %d executor(s) on %s, %d torch thread(s) each%s", executors, device, torch.get_num_threads(), lone)
        queue.attach(RunnerPool([build_runner(queue, pool, metrics, settings, idle_timeout_s=0.1, of=executors, threads=share) for _ in range(executors)]))
    return queue


def executor_count(configured: int | None, device_type: str, threads: int) -> int:
    """``configured``, else one per CPU thread on a CPU and one on an accelerator (whose kernels
    already fill it; a second executor there would only contend for its memory)."""
    if configured is not None:
        return configured
    return max(1, threads) if device_type == "cpu" else 1


def open_queue(settings: Settings, registry: ModelRegistry, metrics: Metrics) -> JobQueue:
    if settings.queue == "redis":
        from service.queue.redis_queue import RedisQueue

        return RedisQueue(settings, metrics, registry.names())
    return local_queue(settings, registry, metrics)


def build_app(settings: Settings | None = None) -> FastAPI:
    return create_app(settings or get_settings(), open_queue)


def http_stack() -> tuple[str, str]:
    """Uvicorn's HTTP parser and event loop: httptools and uvloop (dependencies of the service) where
    installed, else its pure-Python h11 and asyncio's loop, which cost a lone client k = 1 about 12%
    of its images/s on a 2-core CPU."""
    from importlib.util import find_spec

    return ("httptools" if find_spec("httptools") else "h11"), ("uvloop" if find_spec("uvloop") else "asyncio")


def serve(settings: Settings) -> None:
    """Serve HTTP; refuses a non-loopback address when no API key is configured."""
    import uvicorn

    from service.api.auth import ApiKeys, check_bind

    check_bind(settings, ApiKeys.from_settings(settings))
    # logging stays as carseg configured it (JSON lines, no access log with raw paths)
    http, loop = http_stack()
    log.info("HTTP on %s:%d: %s parser, %s event loop", settings.host, settings.port, http, loop)
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False, http=http, loop=loop)
