"""``carseg serve``: the HTTP process, the app assembled with its queue. With ``--queue redis`` the
API only queues jobs and reads manifests (workers run the networks), so this process never imports
torch; with the in-process queue a runner thread here loads the models and runs them."""

from __future__ import annotations

from fastapi import FastAPI

from service.api.app import create_app
from service.config import Settings, get_settings
from service.metrics import Metrics
from service.queue.base import JobQueue
from service.queue.local import LocalQueue
from service.registry import ModelRegistry


def local_queue(settings: Settings, registry: ModelRegistry, metrics: Metrics, consumer: bool = True) -> LocalQueue:
    """The in-process queue with its runner thread (started with the queue), the registry's models
    loaded on ``settings.device`` before it takes traffic: ready means ready."""
    queue = LocalQueue(metrics, settings.max_queued_jobs)
    if consumer:
        # imported here: only the in-process queue runs networks in this process
        from service.runner.loop import RunnerThread, build_runner
        from service.runner.models import ModelPool
        from training.sampling import use_device

        pool = ModelPool(registry, use_device(settings.device))
        pool.load_latest(registry.names())
        metrics.serve_models(registry.names())
        queue.attach(RunnerThread(build_runner(queue, pool, metrics, settings, idle_timeout_s=0.1)))
    return queue


def open_queue(settings: Settings, registry: ModelRegistry, metrics: Metrics) -> JobQueue:
    if settings.queue == "redis":
        from service.queue.redis_queue import RedisQueue

        return RedisQueue(settings, metrics, registry.names())
    return local_queue(settings, registry, metrics)


def build_app(settings: Settings | None = None) -> FastAPI:
    return create_app(settings or get_settings(), open_queue)


def serve(settings: Settings) -> None:
    """Serve HTTP; refuses a non-loopback address when no API key is configured."""
    import uvicorn

    from service.api.auth import ApiKeys, check_bind

    check_bind(settings, ApiKeys.from_settings(settings))
    # logging stays as carseg configured it (JSON lines, no access log with raw paths)
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False)
