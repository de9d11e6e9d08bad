"""Prometheus metrics of one service instance, on a registry of its own (one per app, so tests and
several apps in one process do not collide). Buckets span the real latency range: a few ms for a
small k on a GPU up to 120 s for a large k on a loaded CPU."""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from training.uncertainty_summary import NAMES as UNCERTAINTY_SUMMARIES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# summaries lie in [0, 1]; the foreground fraction of a CT crop is a few hundredths, the entropies a
# few tenths: fine steps low down, so that histogram_quantile's median lands within ~0.005 there
UNCERTAINTY_BUCKETS = (
    0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1,
    *(round(0.1 + 0.025 * i, 3) for i in range(1, 37)),
)


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
        self.uncertainty = Histogram(
            "carseg_request_uncertainty", "Per-image uncertainty summaries, 0 to 1 (training.uncertainty_summary)", ["model", "summary"],
            buckets=UNCERTAINTY_BUCKETS, registry=r,
        )
        self.uncertainty_reference = Gauge(
            "carseg_uncertainty_reference", "Quantiles of each uncertainty summary over the model's validation set (its manifest)",
            ["model", "summary", "quantile"], registry=r,
        )
        self.counts: collections.Counter[str] = collections.Counter()

    def count(self, outcome: str, n: int = 1) -> None:
        """The one place a job outcome is counted: Prometheus exports it, tests and burst runs read ``counts``."""
        self.jobs.labels(outcome).inc(n)
        self.counts[outcome] += n

    def serve_models(self, models: Sequence[str]) -> None:
        """Export each served model's uncertainty series at zero before its first image: Prometheus
        counts no increase into a series it has not yet seen, so the first images' observations would
        otherwise never reach a rate (or the drift rule's median)."""
        for model in models:
            for name in UNCERTAINTY_SUMMARIES:
                self.uncertainty.labels(model, name)

    def observe_uncertainty(self, model: str, summary: Sequence[float]) -> None:
        """One image's summaries, in the order of ``UNCERTAINTY_SUMMARIES``; NaN (undefined at its k) is skipped."""
        for name, value in zip(UNCERTAINTY_SUMMARIES, summary, strict=True):
            if not math.isnan(value):
                self.uncertainty.labels(model, name).observe(float(value))

    def set_uncertainty_reference(self, model: str, reference: dict[str, Any]) -> None:
        """The band of a model's manifest (``uncertainty_reference``), for the drift rule to compare with."""
        for name, quantiles in reference.get("quantiles", {}).items():
            for quantile, value in quantiles.items():
                self.uncertainty_reference.labels(model, name, quantile).set(value)
