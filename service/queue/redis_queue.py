"""The API side of the Redis Streams queue: XADD a job, BLPOP its result key until the deadline.

Every call is retried across a lost connection until the job's deadline: a Redis restart of a few
seconds (its AOF keeps the stream) costs the requests in flight that long, not an error. A retried
XADD whose first attempt did reach Redis queues the job twice; the answer script stores only the
first answer, so the client still gets one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings, masked_url
from service.errors import DeadlineExceeded, QueueFull, Unavailable
from service.jobs import Job, JobResult
from service.metrics import Metrics
from service.queue.redis_protocol import GROUP, Keys, decode_payload, job_fields

log = logging.getLogger(__name__)
T = TypeVar("T")
_RETRIED = (RedisConnectionError, RedisTimeoutError)  # BusyLoadingError (an AOF being read) is a ConnectionError


class RedisQueue:
    def __init__(self, settings: Settings, metrics: Metrics, models: list[str]) -> None:
        self.settings, self.metrics, self.models = settings, metrics, models
        self.keys = Keys(settings.redis_prefix)
        # BLPOP blocks up to the request deadline: the socket timeout must outlast it (redis-py's
        # default of 5 s turned every longer wait into an error)
        self.redis = aioredis.Redis.from_url(settings.redis_url, health_check_interval=10, socket_timeout=settings.request_timeout_s + 5,
                                             socket_connect_timeout=2)

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except RedisError as exc:
            log.warning("Redis at %s is not reachable yet (%s); requests get 503 until it is", masked_url(self.settings.redis_url), type(exc).__name__)

    async def _retrying(self, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """``call()``, retried with backoff while the connection is lost, until ``deadline``."""
        backoff = 0.05
        while True:
            try:
                return await call()
            except _RETRIED as exc:
                if time.time() + backoff >= deadline:
                    raise Unavailable(f"the job queue is unavailable ({type(exc).__name__})", retry_after_s=2) from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)

    async def stop(self) -> None:
        await self.redis.aclose()

    async def _live_workers(self, model: str) -> int:
        return int(await self.redis.zcount(self.keys.heartbeats(model), time.time() - self.settings.heartbeat_ttl_s, "+inf"))

    async def ready(self, models: list[str]) -> tuple[bool, str]:
        try:
            missing = [m for m in models if await self._live_workers(m) == 0]
        except RedisError as exc:
            # the error's type only: its text names internal hosts and ports
            return False, f"Redis unavailable ({type(exc).__name__})"
        return (False, f"no live worker for {missing}") if missing else (True, "ok")

    async def admit(self, model: str, deadline: float) -> None:
        """Before the body is read: a live worker serves ``model`` and its stream has room."""
        try:
            live = await self._retrying(lambda: self._live_workers(model), deadline)
            if live == 0:
                raise Unavailable(f"no live worker serves model {model!r}", retry_after_s=5)
            depth = await self._retrying(lambda: self.redis.xlen(self.keys.stream(model)), deadline)
        except RedisError as exc:
            raise Unavailable(f"the job queue is unavailable ({type(exc).__name__})", retry_after_s=2) from exc
        if depth >= self.settings.max_queued_jobs:
            raise QueueFull(f"{depth} jobs are queued for {model!r}; retry shortly")

    async def submit(self, job: Job) -> JobResult:
        stream, result_key = self.keys.stream(job.model), self.keys.result(job.id)
        fields = job_fields(job)

        async def wait() -> tuple[bytes, bytes] | None:
            timeout = job.deadline - time.time()
            return await self.redis.blpop([result_key], timeout=max(timeout, 0.01)) if timeout > 0 else None

        await self.admit(job.model, job.deadline)  # again: the upload and decode took time, others queued meanwhile
        try:
            await self._retrying(lambda: self.redis.xadd(stream, fields, maxlen=self.settings.stream_maxlen, approximate=True), job.deadline)
            reply = await self._retrying(wait, job.deadline)
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
            log.warning("could not read queue gauges from Redis (%s)", type(exc).__name__)
