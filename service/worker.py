"""``carseg worker``: one process per GPU, the runner over the Redis consumer, with a heartbeat.
The runner, the consumer and the heartbeat each have a module of their own; this one assembles
them: models loaded before the first heartbeat (a heartbeat means ready), withdrawn on stop."""

from __future__ import annotations

import collections
import logging
import os
import socket
import uuid

import redis
import torch

from service.config import Settings, masked_url
from service.metrics import Metrics
from service.queue.redis_consumer import RedisConsumer
from service.queue.redis_heartbeat import Heartbeat
from service.registry import ModelRegistry
from service.runner.loop import build_runner
from service.runner.models import ModelPool

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings, registry: ModelRegistry, device: torch.device, models: list[str] | None = None,
                 metrics: Metrics | None = None, name: str | None = None) -> None:
        self.models = models or registry.names()
        self.metrics = metrics or Metrics()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        client = redis.Redis.from_url(settings.redis_url, health_check_interval=10)
        self.pool = ModelPool(registry, device)
        self.consumer = RedisConsumer(settings, self.models, self.name, self.metrics, client)
        self.heartbeat = Heartbeat(settings, self.models, self.name, client)
        self.runner = build_runner(self.consumer, self.pool, self.metrics, settings, idle_timeout_s=settings.worker_block_ms / 1000)

    @property
    def counts(self) -> collections.Counter[str]:
        return self.metrics.counts

    def run(self, burst: bool = False) -> collections.Counter[str]:
        """Serve until ``stop()``; with ``burst``, return once no job is waiting or pending."""
        self.pool.load_latest(self.models)
        self.metrics.serve_models(self.models)
        self.heartbeat.start()
        try:
            self.runner.run(burst)
        finally:
            self.heartbeat.stop()
        return self.counts

    def stop(self) -> None:
        self.runner.stop()
        self.consumer.close()


def serve_worker(settings: Settings, device: torch.device, models: list[str] | None) -> None:
    """The ``carseg worker`` entry point: metrics on their own port, stop on SIGTERM/SIGINT."""
    import signal

    from prometheus_client import start_http_server

    metrics = Metrics()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.registry)
    worker = Worker(settings, ModelRegistry(settings.model_dir), device, models, metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    log.info("worker %s serving %s on %s from %s", worker.name, worker.models, device, masked_url(settings.redis_url))
    worker.run()
