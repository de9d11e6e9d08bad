"""The API side of the Redis Streams queue: XADD a job, BLPOP its result key until the deadline."""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.config import Settings
from service.errors import DeadlineExceeded, QueueFull, Unavailable
from service.jobs import Job, JobResult
from service.metrics import Metrics
from service.queue.redis_protocol import GROUP, Keys, decode_payload, job_fields

log = logging.getLogger(__name__)


class RedisQueue:
    def __init__(self, settings: Settings, metrics: Metrics, models: list[str]) -> None:
        self.settings, self.metrics, self.models = settings, metrics, models
        self.keys = Keys(settings.redis_prefix)
        # BLPOP blocks up to the request deadline: the socket timeout must outlast it (redis-py's
        # default of 5 s turned every longer wait into an error)
        self.redis = aioredis.Redis.from_url(settings.redis_url, health_check_interval=10, socket_timeout=settings.request_timeout_s + 5)

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except RedisError as exc:
            log.warning("Redis at %s is not reachable yet (%s); requests get 503 until it is", self.settings.redis_url, exc)

    async def stop(self) -> None:
        await self.redis.aclose()

    async def _live_workers(self, model: str) -> int:
        return int(await self.redis.zcount(self.keys.heartbeats(model), time.time() - self.settings.heartbeat_ttl_s, "+inf"))

    async def ready(self, models: list[str]) -> tuple[bool, str]:
        try:
            missing = [m for m in models if await self._live_workers(m) == 0]
        except RedisError as exc:
            return False, f"Redis unavailable: {exc}"
        return (False, f"no live worker for {missing}") if missing else (True, "ok")

    async def submit(self, job: Job) -> JobResult:
        stream = self.keys.stream(job.model)
        try:
            if await self._live_workers(job.model) == 0:
                raise Unavailable(f"no live worker serves model {job.model!r}", retry_after_s=5)
            depth = await self.redis.xlen(stream)
            if depth >= self.settings.max_queued_jobs:
                raise QueueFull(f"{depth} jobs are queued for {job.model!r}; retry shortly")
            await self.redis.xadd(stream, job_fields(job), maxlen=self.settings.stream_maxlen, approximate=True)
            timeout = job.deadline - time.time()
            reply = await self.redis.blpop([self.keys.result(job.id)], timeout=max(timeout, 0.01)) if timeout > 0 else None
        except RedisError as exc:
            raise Unavailable(f"the job queue is unavailable ({type(exc).__name__})", retry_after_s=2) from exc
        if reply is None:
            raise DeadlineExceeded(f"no result within the deadline ({job.deadline - job.enqueued:.1f} s)")
        return decode_payload(reply[1])

    async def observe(self) -> None:
        """Queue gauges read from Redis at scrape time, so every API replica reports the same."""
        now = time.time()
        try:
            for model in self.models:
                stream = self.keys.stream(model)
                self.metrics.queue_depth.labels(model).set(await self.redis.xlen(stream))
                oldest = await self.redis.xrange(stream, count=1)
                age = now - int(oldest[0][0].split(b"-")[0]) / 1000 if oldest else 0.0
                self.metrics.queue_oldest_age.labels(model).set(max(age, 0.0))
                pending = 0
                if await self.redis.exists(stream):
                    groups = {g["name"]: g for g in await self.redis.xinfo_groups(stream)}
                    pending = int(groups.get(GROUP.encode(), {}).get("pending", 0))
                self.metrics.queue_pending.labels(model).set(pending)
                self.metrics.workers_alive.labels(model).set(await self._live_workers(model))
            stats = await self.redis.hgetall(self.keys.stats)
            self.metrics.redeliveries.set(int(stats.get(b"redeliveries", 0)))
            self.metrics.dead_letters.set(int(stats.get(b"dead_letters", 0)))
        except RedisError as exc:
            log.warning("could not read queue gauges from Redis: %s", exc)
