"""Prometheus metrics of one service instance, on a registry of its own (one per app, so tests and
several apps in one process do not collide). Buckets span the real latency range: a few ms for a
small k on a GPU up to 120 s for a large k on a loaded CPU."""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "carseg_request_duration_seconds", "End-to-end HTTP request time", ["route", "method", "status"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "carseg_queue_wait_seconds", "Time a job waited before its batch started", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.compute_seconds = Histogram(
            "carseg_compute_seconds", "Sampler time of one batch group", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.encode_seconds = Histogram(
            "carseg_encode_seconds", "Time to encode a response", ["format"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_jobs = Histogram("carseg_batch_jobs", "Jobs per sampler call", buckets=SIZE_BUCKETS, registry=r)
        self.batch_samples = Histogram("carseg_batch_samples", "Samples (sum of k) per sampler call", buckets=SIZE_BUCKETS, registry=r)
        self.in_flight = Gauge("carseg_requests_in_flight", "HTTP requests being served", registry=r)
        self.queue_depth = Gauge("carseg_queue_depth", "Jobs queued or in a worker's hands", ["model"], registry=r)
        self.queue_oldest_age = Gauge("carseg_queue_oldest_job_age_seconds", "Age of the oldest queued job", ["model"], registry=r)
        self.queue_pending = Gauge("carseg_queue_pending", "Jobs delivered to a worker and not yet acknowledged", ["model"], registry=r)
        self.workers_alive = Gauge("carseg_workers_alive", "Workers with a fresh heartbeat", ["model"], registry=r)
        self.redeliveries = Gauge("carseg_queue_redeliveries", "Jobs reclaimed from a silent worker (cumulative, kept in Redis)", registry=r)
        self.dead_letters = Gauge("carseg_queue_dead_letters", "Jobs moved to a dead-letter stream (cumulative, kept in Redis)", registry=r)
        self.errors = Counter("carseg_errors_total", "Requests answered with an error, by reason", ["reason"], registry=r)
        self.jobs = Counter(
            "carseg_jobs_total",
            "Jobs the runner handled, by outcome: done, failed, expired, abandoned; with Redis also malformed, reclaimed, dead_lettered",
            ["outcome"], registry=r,
        )
        self.counts: collections.Counter[str] = collections.Counter()

    def count(self, outcome: str, n: int = 1) -> None:
        """The one place a job outcome is counted: Prometheus exports it, tests and burst runs read ``counts``."""
        self.jobs.labels(outcome).inc(n)
        self.counts[outcome] += n
