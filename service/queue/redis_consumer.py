"""The runner's side of the Redis Streams transport: a consumer in the group ``workers`` of every
model's stream. ``take`` first reclaims jobs idle past the visibility timeout in any consumer's
hands (a dead or stuck worker's), else reads new ones (``XREADGROUP COUNT n BLOCK t``). Each job is
answered with the one atomic script of ``redis_protocol``. A job whose computation fails, or whose
entry is malformed, stays pending: it is reclaimed and retried, and after ``max_deliveries`` it goes
to the dead-letter stream and its client gets an error. Redis being away is waited out with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings
from service.errors import InferenceFailed, ServiceError
from service.jobs import Job, JobResult
from service.metrics import Metrics
from service.queue.redis_protocol import ANSWER_SCRIPT, GROUP, Keys, encode_error, encode_result, parse_job

log = logging.getLogger(__name__)

# Redis times out a blocked read only on its cron tick, every 100 ms at the default hz of 10
# (measured: XREADGROUP BLOCK 2 on an empty stream returned after 101 ms). A shorter wait, such as
# the rest of a 2 ms batching window, is a pause here between two reads that do not block.
_SHORTEST_BLOCK_S = 0.1


@dataclass
class RedisDelivery:
    job: Job
    consumer: RedisConsumer
    stream: str
    entry_id: bytes

    def wanted(self) -> bool:
        return True  # the API's BLPOP gives no sign of a client that left; the deadline covers it

    def answer(self, result: JobResult) -> None:
        self.consumer.reply(self, encode_result(result))

    def reject(self, error: ServiceError) -> None:
        self.consumer.reply(self, encode_error(error))

    def failed(self, error: ServiceError) -> None:
        log.error("job %s failed; it stays pending for a retry (%s)", self.job.id, error.detail)


class RedisConsumer:
    def __init__(self, settings: Settings, models: list[str], name: str, metrics: Metrics, client: redis.Redis) -> None:
        self.settings, self.name, self.metrics, self.redis = settings, name, metrics, client
        self.keys = Keys(settings.redis_prefix)
        self.streams = {self.keys.stream(m): m for m in models}
        self._answer = client.register_script(ANSWER_SCRIPT)
        self._groups_ready = False
        self._backoff = 0.1
        self._next_reclaim = 0.0
        self._closing = threading.Event()

    def close(self) -> None:
        """Stop waiting out a Redis outage; ``take`` returns at once from now on."""
        self._closing.set()

    # -- taking jobs -------------------------------------------------------------------------
    def take(self, timeout_s: float, max_jobs: int) -> list[RedisDelivery]:
        if self._closing.is_set():
            return []
        try:
            if not self._groups_ready:
                self._ensure_groups()
            deliveries = self._reclaim(max_jobs) or self._read(timeout_s, max_jobs)
            self._backoff = 0.1
            return deliveries
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis unavailable (%s); retrying in %.1f s", exc, self._backoff)
            self._groups_ready = False
            self._closing.wait(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups_ready = False  # Redis lost its data (a restart without persistence)
        return []

    def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    def _read(self, timeout_s: float, max_jobs: int) -> list[RedisDelivery]:
        if timeout_s >= _SHORTEST_BLOCK_S:
            return self._xreadgroup(max_jobs, block_ms=int(timeout_s * 1000))
        taken = self._xreadgroup(max_jobs, block_ms=None)
        if not taken and timeout_s > 0 and not self._closing.wait(timeout_s):
            taken = self._xreadgroup(max_jobs, block_ms=None)
        return taken

    def _xreadgroup(self, max_jobs: int, block_ms: int | None) -> list[RedisDelivery]:
        # block=None leaves BLOCK out (a read that does not wait); BLOCK 0 would wait for ever
        reply = self.redis.xreadgroup(GROUP, self.name, {s: ">" for s in self.streams}, count=max_jobs, block=block_ms)
        return self._parse([(stream.decode(), entry_id, fields) for stream, items in reply or [] for entry_id, fields in items])

    def _reclaim(self, max_jobs: int) -> list[RedisDelivery]:
        """Jobs idle past the visibility timeout in any consumer's hands: claim them, send those
        delivered too often to the dead-letter stream, return the rest. Looked for at most four
        times per visibility timeout: the scan costs a round trip per stream."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + self.settings.visibility_timeout_s / 4
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        entries = []
        for stream, model in self.streams.items():
            _, claimed, _deleted = self.redis.xautoclaim(stream, GROUP, self.name, idle_ms, start_id="0-0", count=max_jobs)
            for entry_id, fields in claimed:
                if fields is None:  # trimmed away while pending
                    self.redis.xack(stream, GROUP, entry_id)
                    continue
                info = self.redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
                deliveries = int(info[0]["times_delivered"]) if info else 1
                if deliveries > self.settings.max_deliveries:
                    self._dead_letter(stream, model, entry_id, fields, deliveries)
                else:
                    self.redis.hincrby(self.keys.stats, "redeliveries", 1)
                    self.metrics.count("reclaimed")
                    entries.append((stream, entry_id, fields))
        if entries:
            self._next_reclaim = now  # there may be more: look again on the next take
        return self._parse(entries)

    def _parse(self, entries: list[tuple[str, bytes, dict[bytes, bytes]]]) -> list[RedisDelivery]:
        deliveries = []
        for stream, entry_id, fields in entries:
            try:
                deliveries.append(RedisDelivery(parse_job(fields), self, stream, entry_id))
            except (KeyError, ValueError) as exc:
                # left pending: it is reclaimed and, after max_deliveries, dead-lettered
                log.error("malformed job %s in %s: %s", entry_id, stream, exc)
                self.metrics.count("malformed")
        return deliveries

    def _dead_letter(self, stream: str, model: str, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        meta = {k: v for k, v in fields.items() if k != b"image"}
        meta[b"reason"] = f"failed {deliveries - 1} deliveries".encode()
        meta[b"source_id"] = entry_id
        self.redis.xadd(self.keys.dead(model), meta, maxlen=self.settings.stream_maxlen, approximate=True)
        self.redis.hincrby(self.keys.stats, "dead_letters", 1)
        self.metrics.count("dead_lettered")
        job_id = fields.get(b"id", entry_id).decode()
        log.error("job %s moved to %s after %d deliveries", job_id, self.keys.dead(model), deliveries - 1)
        error = InferenceFailed(f"job {job_id} failed {deliveries - 1} times and was dead-lettered")
        self._store(stream, entry_id, job_id, encode_error(error))

    # -- answering ---------------------------------------------------------------------------
    def reply(self, delivery: RedisDelivery, payload: bytes) -> None:
        try:
            self._store(delivery.stream, delivery.entry_id, delivery.job.id, payload)
        except RedisError as exc:
            log.warning("the answer to job %s was not stored (%s); it stays pending and is retried", delivery.job.id, exc)

    def _store(self, stream: str, entry_id: bytes, job_id: str, payload: bytes) -> None:
        keys = [self.keys.answered(job_id), self.keys.result(job_id), stream, self.keys.stats]
        self._answer(keys=keys, args=[payload, self.settings.result_ttl_s, GROUP, entry_id])
