"""A worker's heartbeat: its name and the time, in each served model's heartbeat sorted set, every
``heartbeat_interval_s`` from a thread of its own, so a long batch does not make it look dead. The
API's readiness and its 503 "no live worker" read these; a stopped worker withdraws at once."""

from __future__ import annotations

import logging
import threading
import time

import redis

from service.config import Settings
from service.queue.redis_protocol import Keys

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, settings: Settings, models: list[str], name: str, client: redis.Redis) -> None:
        self.settings, self.models, self.name, self.redis = settings, models, name, client
        self.keys = Keys(settings.redis_prefix)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="carseg-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and withdraw, so the API stops routing to this worker now, not at the TTL."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            for model in self.models:
                self.redis.zrem(self.keys.heartbeats(model), self.name)
        except redis.RedisError:
            pass  # Redis is away: the heartbeat expires by its TTL

    def beat(self) -> None:
        now = time.time()
        pipe = self.redis.pipeline()
        for model in self.models:
            pipe.zadd(self.keys.heartbeats(model), {self.name: now})
            # long-dead workers' entries would otherwise stay in the set for ever
            pipe.zremrangebyscore(self.keys.heartbeats(model), "-inf", now - 10 * self.settings.heartbeat_ttl_s)
        pipe.execute()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed (%s)", type(exc).__name__)
            self._stop.wait(self.settings.heartbeat_interval_s)
