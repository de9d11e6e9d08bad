"""Execute one batch: drop what nobody waits for, group by model and shape, run the sampler once
per group, and answer each job with exactly the outputs it asked for."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed
from service.jobs import JobResult, Output
from service.metrics import Metrics
from service.queue.base import Delivery
from service.runner.models import ModelPool
from training.sampling import sample

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, models: ModelPool, metrics: Metrics, decode_batch: int) -> None:
        self.models, self.metrics, self.decode_batch = models, metrics, decode_batch

    def execute(self, batch: list[Delivery]) -> None:
        live = self._live(batch)
        if not live:
            return
        self.metrics.batch_jobs.observe(len(live))
        self.metrics.batch_samples.observe(sum(d.job.k for d in live))
        groups: dict[tuple, list[Delivery]] = defaultdict(list)
        for delivery in live:
            groups[delivery.job.group_key].append(delivery)
        for group in groups.values():
            self._run(group)

    def _live(self, batch: list[Delivery]) -> list[Delivery]:
        now = time.time()
        live = []
        for delivery in batch:
            if not delivery.wanted():
                self.metrics.count("abandoned")
            elif delivery.job.deadline <= now:
                self.metrics.count("expired")
                delivery.reject(DeadlineExceeded("the job expired in the queue"))
            else:
                live.append(delivery)
        return live

    def _run(self, group: list[Delivery]) -> None:
        started = time.time()
        try:
            arrays = self._compute(group)
        except Exception:
            if len(group) > 1:  # find the job that fails, so that the others are not failed with it
                for delivery in group:
                    self._run([delivery])
                return
            job = group[0].job
            log.exception("inference failed for job %s (%s v%s)", job.id, job.model, job.version)
            self.metrics.count("failed")
            group[0].failed(InferenceFailed(f"inference failed for job {job.id}; see the worker log"))
            return
        compute = time.time() - started
        self.metrics.compute_seconds.labels(group[0].job.model).observe(compute)
        for delivery, outputs in zip(group, arrays, strict=True):
            wait = started - delivery.job.enqueued
            self.metrics.queue_wait_seconds.labels(delivery.job.model).observe(wait)
            delivery.answer(JobResult(outputs, queue_wait_s=wait, compute_s=compute, batch_jobs=len(group)))
            self.metrics.count("done")

    def _compute(self, group: list[Delivery]) -> list[dict[Output, np.ndarray]]:
        """One sampler call for jobs of one model, version and shape, each with its own k and seed.
        The call computes the union of the outputs asked for; each job gets its own."""
        jobs = [d.job for d in group]
        networks = self.models.get(jobs[0].model, jobs[0].version).networks
        wanted = set().union(*(job.outputs for job in jobs))
        out = sample(
            networks, networks.prepare([job.image for job in jobs]), [job.k for job in jobs], [job.seed for job in jobs],
            outputs=wanted, decode_batch=self.decode_batch, amp=networks.device.type == "cuda",
        )
        return [{name: out[i][name].cpu().numpy() for name in job.outputs} for i, job in enumerate(jobs)]
