"""``carseg worker``: one process per GPU, a consumer of the Redis job streams.

The loop is short: reclaim jobs idle past the visibility timeout (a dead worker's), else read new
ones (``XREADGROUP COUNT BLOCK`` is the dynamic batcher), drop expired jobs, run the sampler per
group of model and shape, and answer each job with one atomic script that stores the result and
acknowledges it. A job that fails is left unacknowledged: it is reclaimed and retried, and after
``max_deliveries`` it goes to the dead-letter stream and its client gets an error. A heartbeat
thread keeps the worker visible to the API's readiness check even during a long batch.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import redis
import torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings
from service.errors import DeadlineExceeded, InferenceFailed
from service.inference import Job, group_jobs, run_group
from service.metrics import Metrics
from service.queue.redis_protocol import ANSWER_SCRIPT, GROUP, Keys, encode_error, encode_result, parse_job
from service.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class Entry:
    stream: str
    entry_id: bytes
    fields: dict[bytes, bytes]


@dataclass
class WorkerCounts:
    """Counters a test (or a burst run) can read to know what happened."""

    answered: int = 0
    failed: int = 0
    expired: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    batches: int = 0


class Worker:
    def __init__(self, settings: Settings, registry: ModelRegistry, device: torch.device, models: list[str] | None = None,
                 metrics: Metrics | None = None, name: str | None = None) -> None:
        self.settings, self.registry, self.device = settings, registry, device
        self.models = models or registry.names()
        unknown = set(self.models) - set(registry.names())
        if unknown:
            raise ValueError(f"models {sorted(unknown)} are not in {registry.model_dir}")
        self.metrics = metrics or Metrics()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = Keys(settings.redis_prefix)
        self.redis = redis.Redis.from_url(settings.redis_url, health_check_interval=10)
        self._answer = self.redis.register_script(ANSWER_SCRIPT)
        self.streams = {self.keys.stream(m): m for m in self.models}
        self.counts = WorkerCounts()
        self._stop = threading.Event()
        self._mean_k = float(settings.default_k)

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, burst: bool = False) -> WorkerCounts:
        """Serve until ``stop()``; with ``burst``, return once no job is waiting or pending."""
        for name in self.models:  # load before announcing ourselves: a heartbeat means ready
            self.registry.load(name, self.registry.get(name).version, self.device)
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="carseg-heartbeat", daemon=True)
        heartbeat.start()
        backoff = 0.1
        groups_ready = False
        while not self._stop.is_set():
            try:
                if not groups_ready:
                    self._ensure_groups()
                    groups_ready = True
                entries = self._reclaim() or self._read()
                if entries:
                    self._process(entries)
                elif burst:
                    break
                backoff = 0.1
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                groups_ready = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                groups_ready = False  # Redis lost its data (a restart without persistence)
        self._stop.set()
        heartbeat.join(timeout=5)
        self._withdraw()
        return self.counts

    def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                now = time.time()
                pipe = self.redis.pipeline()
                for model in self.models:
                    pipe.zadd(self.keys.heartbeats(model), {self.name: now})
                    pipe.zremrangebyscore(self.keys.heartbeats(model), "-inf", now - 10 * self.settings.heartbeat_ttl_s)
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(self.settings.heartbeat_interval_s)

    def _withdraw(self) -> None:
        try:
            for model in self.models:
                self.redis.zrem(self.keys.heartbeats(model), self.name)
        except redis.RedisError:
            pass

    # -- taking jobs -------------------------------------------------------------------------
    def _read_count(self) -> int:
        # entries to take in one read: about one sample budget's worth at the recent mean k
        return max(1, int(self.settings.batch_max_samples // max(self._mean_k, 1.0)))

    def _read(self) -> list[Entry]:
        reply = self.redis.xreadgroup(
            GROUP, self.name, {s: ">" for s in self.streams}, count=self._read_count(), block=self.settings.worker_block_ms
        )
        return [Entry(stream.decode(), entry_id, fields) for stream, items in reply or [] for entry_id, fields in items]

    def _reclaim(self) -> list[Entry]:
        """Jobs idle past the visibility timeout in any consumer's hands (a dead or stuck worker's):
        claim them, send those delivered too often to the dead-letter stream, return the rest."""
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        out: list[Entry] = []
        for stream, model in self.streams.items():
            _, claimed, _deleted = self.redis.xautoclaim(stream, GROUP, self.name, idle_ms, start_id="0-0", count=self._read_count())
            for entry_id, fields in claimed:
                if fields is None:  # trimmed away while pending
                    self.redis.xack(stream, GROUP, entry_id)
                    continue
                info = self.redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
                deliveries = int(info[0]["times_delivered"]) if info else 1
                if deliveries > self.settings.max_deliveries:
                    self._dead_letter(Entry(stream, entry_id, fields), model, deliveries)
                else:
                    self.redis.hincrby(self.keys.stats, "redeliveries", 1)
                    self.counts.reclaimed += 1
                    out.append(Entry(stream, entry_id, fields))
        return out

    def _dead_letter(self, entry: Entry, model: str, deliveries: int) -> None:
        meta = {k: v for k, v in entry.fields.items() if k != b"image"}
        meta[b"reason"] = f"failed {deliveries - 1} deliveries".encode()
        meta[b"source_id"] = entry.entry_id
        self.redis.xadd(self.keys.dead(model), meta, maxlen=self.settings.stream_maxlen, approximate=True)
        self.redis.hincrby(self.keys.stats, "dead_letters", 1)
        self.counts.dead_lettered += 1
        job_id = entry.fields.get(b"id", entry.entry_id).decode()
        log.error("job %s moved to %s after %d deliveries", job_id, self.keys.dead(model), deliveries - 1)
        self._reply(entry, job_id, encode_error(InferenceFailed(f"job {job_id} failed {deliveries - 1} times and was dead-lettered")))

    # -- answering ---------------------------------------------------------------------------
    def _reply(self, entry: Entry, job_id: str, payload: bytes) -> None:
        keys = [self.keys.answered(job_id), self.keys.result(job_id), entry.stream, self.keys.stats]
        self._answer(keys=keys, args=[payload, self.settings.result_ttl_s, GROUP, entry.entry_id])

    def _process(self, entries: list[Entry]) -> None:
        now = time.time()
        jobs: dict[str, tuple[Job, Entry]] = {}
        for entry in entries:
            try:
                job = parse_job(entry.fields)
            except (KeyError, ValueError) as exc:
                # a malformed entry stays pending: it is reclaimed and, after max_deliveries, dead-lettered
                log.error("malformed job %s in %s: %s", entry.entry_id, entry.stream, exc)
                self.counts.failed += 1
                continue
            if job.deadline <= now:
                self.redis.hincrby(self.keys.stats, "expired", 1)
                self.counts.expired += 1
                self.metrics.jobs.labels("expired").inc()
                self._reply(entry, job.id, encode_error(DeadlineExceeded("the job expired in the queue")))
                continue
            jobs[job.id] = (job, entry)
        if not jobs:
            return
        self._mean_k = 0.8 * self._mean_k + 0.2 * (sum(j.k for j, _ in jobs.values()) / len(jobs))
        for batch in self._by_budget([job for job, _ in jobs.values()]):
            self.metrics.batch_jobs.observe(len(batch))
            self.metrics.batch_samples.observe(sum(j.k for j in batch))
            self.counts.batches += 1
            for group in group_jobs(batch).values():
                self._run(group, jobs)

    def _by_budget(self, jobs: list[Job]) -> list[list[Job]]:
        batches: list[list[Job]] = [[]]
        samples = 0
        for job in jobs:
            if batches[-1] and samples + job.k > self.settings.batch_max_samples:
                batches.append([])
                samples = 0
            batches[-1].append(job)
            samples += job.k
        return batches

    def _run(self, group: list[Job], jobs: dict[str, tuple[Job, Entry]]) -> None:
        first = group[0]
        try:
            model = self.registry.load(first.model, first.version, self.device)
            results = run_group(model, group, self.device, self.settings.decode_batch)
        except Exception:
            if len(group) > 1:
                for job in group:
                    self._run([job], jobs)
                return
            log.exception("job %s failed; it stays pending for a retry", first.id)
            self.counts.failed += 1
            self.metrics.jobs.labels("failed").inc()
            return
        self.metrics.compute_seconds.labels(first.model).observe(results[0].compute_s)
        for job, result in zip(group, results, strict=True):
            self.metrics.queue_wait_seconds.labels(job.model).observe(result.queue_wait_s)
            self._reply(jobs[job.id][1], job.id, encode_result(result))
            self.counts.answered += 1
            self.metrics.jobs.labels("done").inc()


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
    log.info("worker %s serving %s on %s from %s", worker.name, worker.models, device, settings.redis_url)
    worker.run()
