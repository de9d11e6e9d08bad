"""The runner's side of the Redis Streams transport: a consumer in the group ``workers`` of every
model's stream. ``take`` first reclaims jobs from other workers' hands, else reads new ones
(``XREADGROUP COUNT n BLOCK t``). Two kinds of hands are reclaimed from: a worker whose heartbeat is
older than ``heartbeat_ttl_s`` is dead, and its jobs move within seconds (looked for every heartbeat
interval); a job idle past the visibility timeout is in a live worker that is stuck. Each job is
answered with the one atomic script of ``redis_protocol``. A job whose computation raised is offered
again at once (to any worker); a malformed entry stays pending until the visibility timeout. After
``max_deliveries`` either goes to the dead-letter stream and its client gets an error, so a job that
fails every time costs its client seconds, not max_deliveries visibility timeouts. Redis being away
is waited out with backoff, and an answer is retried until its job's deadline.
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
from service.queue.redis_protocol import ANSWER_SCRIPT, GROUP, Keys, encode_error, encode_result, job_fields, parse_job

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
        self.consumer.retry_or_dead_letter(self, error)


class RedisConsumer:
    def __init__(self, settings: Settings, models: list[str], name: str, metrics: Metrics, client: redis.Redis) -> None:
        self.settings, self.name, self.metrics, self.redis = settings, name, metrics, client
        self.keys = Keys(settings.redis_prefix)
        self.streams = {self.keys.stream(m): m for m in models}
        self._answer = client.register_script(ANSWER_SCRIPT)
        self._groups_ready = False
        self._backoff = 0.1
        self._next_reclaim = 0.0
        self._next_orphan_scan = 0.0
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
            deliveries = self._orphans(max_jobs) or self._reclaim(max_jobs) or self._read(timeout_s, max_jobs)
            self._backoff = 0.1
            return deliveries
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis unavailable (%s); retrying in %.1f s", type(exc).__name__, self._backoff)
            self._groups_ready = False
            self._closing.wait(self._backoff)
            # capped at a second: a Redis restart of a few seconds costs the queued jobs no more than that
            self._backoff = min(self._backoff * 2, 1.0)
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

    def _orphans(self, max_jobs: int) -> list[RedisDelivery]:
        """Jobs pending in the hands of consumers with no fresh heartbeat (a worker killed or
        partitioned away): claimed at once, not after the visibility timeout. Looked for once per
        heartbeat interval: one XPENDING summary and one ZRANGE per stream."""
        now = time.monotonic()
        if now < self._next_orphan_scan:
            return []
        self._next_orphan_scan = now + self.settings.heartbeat_interval_s
        fresh_since = time.time() - self.settings.heartbeat_ttl_s
        # claimed only once idle a heartbeat interval: two workers scanning at once do not both take it
        min_idle_ms = int(self.settings.heartbeat_interval_s * 1000)
        entries = []
        for stream, model in self.streams.items():
            summary = self.redis.xpending(stream, GROUP)
            holders = [c["name"].decode() for c in summary.get("consumers") or [] if int(c["pending"]) > 0]
            if not holders:
                continue
            live = {name.decode() for name in self.redis.zrangebyscore(self.keys.heartbeats(model), fresh_since, "+inf")}
            for holder in holders:
                if holder == self.name or holder in live or len(entries) >= max_jobs:
                    continue
                pending = self.redis.xpending_range(stream, GROUP, min="-", max="+", count=max_jobs - len(entries), consumername=holder)
                ids = [p["message_id"] for p in pending]
                if not ids:
                    continue
                claimed = self.redis.xclaim(stream, GROUP, self.name, min_idle_ms, ids)
                log.warning("worker %s has no fresh heartbeat: took %d of its jobs from %s", holder, len(claimed), stream)
                entries += self._sift(stream, model, claimed)
        if entries:
            self._next_orphan_scan = now  # there may be more: look again on the next take
        return self._parse(entries)

    def _reclaim(self, max_jobs: int) -> list[RedisDelivery]:
        """Jobs idle past the visibility timeout in any consumer's hands (a live but stuck worker):
        claimed. Looked for at most four times per visibility timeout: the scan costs a round trip
        per stream."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + self.settings.visibility_timeout_s / 4
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        entries = []
        for stream, model in self.streams.items():
            _, claimed, _deleted = self.redis.xautoclaim(stream, GROUP, self.name, idle_ms, start_id="0-0", count=max_jobs)
            entries += self._sift(stream, model, claimed)
        if entries:
            self._next_reclaim = now  # there may be more: look again on the next take
        return self._parse(entries)

    def _sift(self, stream: str, model: str, claimed: list) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """Of entries just claimed: drop those trimmed away, send those delivered too often to the
        dead-letter stream, return the rest to run again."""
        entries = []
        for entry_id, fields in claimed:
            if fields is None:  # trimmed away while pending
                self.redis.xack(stream, GROUP, entry_id)
                continue
            info = self.redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else 1
            if deliveries > self.settings.max_deliveries:
                self._dead_letter(stream, model, entry_id, fields, failures=deliveries - 1)
            else:
                self.redis.hincrby(self.keys.stats, "redeliveries", 1)
                self.metrics.count("reclaimed")
                entries.append((stream, entry_id, fields))
        return entries

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

    def _dead_letter(self, stream: str, model: str, entry_id: bytes, fields: dict[bytes, bytes], failures: int) -> None:
        meta = {k: v for k, v in fields.items() if k != b"image"}
        meta[b"reason"] = f"failed {failures} deliveries".encode()
        meta[b"source_id"] = entry_id
        self.redis.xadd(self.keys.dead(model), meta, maxlen=self.settings.stream_maxlen, approximate=True)
        self.redis.hincrby(self.keys.stats, "dead_letters", 1)
        self.metrics.count("dead_lettered")
        job_id = fields.get(b"id", entry_id).decode()
        log.error("job %s moved to %s after %d deliveries", job_id, self.keys.dead(model), failures)
        error = InferenceFailed(f"job {job_id} failed {failures} times and was dead-lettered")
        self._store(stream, entry_id, job_id, encode_error(error))

    # -- answering ---------------------------------------------------------------------------
    def retry_or_dead_letter(self, delivery: RedisDelivery, error: ServiceError) -> None:
        """A job whose computation raised: after max_deliveries, dead-letter it and answer its client
        with ``error``; else mark it idle past the visibility timeout so the next reclaim, by any
        worker, offers it again now."""
        try:
            info = self.redis.xpending_range(delivery.stream, GROUP, min=delivery.entry_id, max=delivery.entry_id, count=1)
            failures = int(info[0]["times_delivered"]) if info else 1
            if failures >= self.settings.max_deliveries:
                fields = {k.encode(): str(v).encode() for k, v in job_fields(delivery.job).items() if k != "image"}
                self._dead_letter(delivery.stream, delivery.job.model, delivery.entry_id, fields, failures)
                return
            idle_ms = int(self.settings.visibility_timeout_s * 1000) + 1
            self.redis.xclaim(delivery.stream, GROUP, self.name, 0, [delivery.entry_id], idle=idle_ms, justid=True)
            self._next_reclaim = 0.0
            log.error("job %s failed (delivery %d of %d); offered again (%s)", delivery.job.id, failures, self.settings.max_deliveries, error.detail)
        except RedisError as exc:
            log.warning("job %s failed and Redis is away (%s); it stays pending for the visibility timeout", delivery.job.id, type(exc).__name__)

    def reply(self, delivery: RedisDelivery, payload: bytes) -> None:
        """Store an answer, retrying across a Redis restart until the job's deadline: the client is
        still waiting for it (the API retries its side too)."""
        backoff = 0.05
        while True:
            try:
                self._store(delivery.stream, delivery.entry_id, delivery.job.id, payload)
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.time() + backoff > delivery.job.deadline or self._closing.is_set():
                    log.warning("the answer to job %s was not stored (%s); it stays pending", delivery.job.id, type(exc).__name__)
                    return
                time.sleep(backoff)  # Redis is restarting: nothing else this worker could do meanwhile
                backoff = min(backoff * 2, 1.0)
            except RedisError as exc:
                log.warning("the answer to job %s was not stored (%s); it stays pending and is retried", delivery.job.id, exc)
                return

    def _store(self, stream: str, entry_id: bytes, job_id: str, payload: bytes) -> None:
        keys = [self.keys.answered(job_id), self.keys.result(job_id), stream, self.keys.stats]
        self._answer(keys=keys, args=[payload, self.settings.result_ttl_s, GROUP, entry_id])
