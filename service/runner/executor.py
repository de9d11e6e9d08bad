"""Execute one batch: drop what nobody waits for, group by model and shape, split each group so
that its sampler call fits the memory budget, run the sampler once per part, and answer each job
with exactly the outputs it asked for. A part whose every job has expired or been abandoned stops
between decoder chunks."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed
from service.jobs import JobResult, Output
from service.metrics import Metrics
from service.queue.base import Delivery
from service.runner.models import ModelPool
from training.sampling import SUMMARY, MemoryModel, Stopped, sample

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, models: ModelPool, metrics: Metrics, decode_batch: int, memory_budget: int) -> None:
        self.models, self.metrics, self.decode_batch, self.memory_budget = models, metrics, decode_batch, memory_budget

    def execute(self, batch: list[Delivery], computed: Callable[[], None] = lambda: None) -> None:
        """Run the batch; ``computed`` is called once its last sampler call has ended, before that
        call's jobs are answered."""
        live = self._live(batch)
        if not live:
            return
        self.metrics.batch_jobs.observe(len(live))
        self.metrics.batch_samples.observe(sum(d.job.k for d in live))
        groups: dict[tuple, list[Delivery]] = defaultdict(list)
        for delivery in live:
            groups[delivery.job.group_key].append(delivery)
        parts = [part for group in groups.values() for part in self._fit(group)]
        for i, part in enumerate(parts):
            self._run(part, computed if i == len(parts) - 1 else lambda: None)

    def _fit(self, group: list[Delivery]) -> list[list[Delivery]]:
        """Consecutive parts of a group of one model and shape whose images, with one sample each
        decoded at once, fit the memory budget (a part has at least one job)."""
        first = group[0].job
        memory = MemoryModel.of(self.models.get(first.model, first.version).networks)
        pixels = first.image.shape[0] * first.image.shape[1]
        parts: list[list[Delivery]] = [[]]
        used = memory.per_sample * pixels
        for delivery in group:
            cost = memory.fixed(pixels, delivery.job.k)
            if parts[-1] and used + cost > self.memory_budget:
                parts.append([])
                used = memory.per_sample * pixels
            parts[-1].append(delivery)
            used += cost
        return parts

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

    def _run(self, group: list[Delivery], computed: Callable[[], None] = lambda: None) -> None:
        started = time.time()
        try:
            arrays = self._compute(group)
        except Stopped:
            computed()
            for delivery in group:
                if delivery.wanted():
                    self.metrics.count("expired")
                    delivery.reject(DeadlineExceeded("the deadline passed while the job was computed; it was stopped"))
                else:
                    self.metrics.count("abandoned")
            return
        except Exception:
            if len(group) > 1:  # find the job that fails, so that the others are not failed with it
                for i, delivery in enumerate(group):
                    self._run([delivery], computed if i == len(group) - 1 else lambda: None)
                return
            computed()
            job = group[0].job
            log.exception("inference failed for job %s (%s v%s)", job.id, job.model, job.version)
            self.metrics.count("failed")
            group[0].failed(InferenceFailed(f"inference failed for job {job.id}; see the worker log"))
            return
        compute = time.time() - started
        computed()
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
        # every image's uncertainty summary, whatever was asked for: drift monitoring observes it
        wanted = set().union(*(job.outputs for job in jobs)) | {SUMMARY}

        def nobody_waits() -> bool:
            now = time.time()
            return all(d.job.deadline <= now or not d.wanted() for d in group)

        out = sample(
            networks, networks.prepare([job.image for job in jobs]), [job.k for job in jobs], [job.seed for job in jobs],
            outputs=wanted, decode_batch=self.decode_batch, amp=networks.device.type == "cuda",
            memory_budget=self.memory_budget, should_stop=nobody_waits,
        )
        for i, job in enumerate(jobs):
            self.metrics.observe_uncertainty(job.model, out[i][SUMMARY].cpu().tolist())
        return [{name: out[i][name].cpu().numpy() for name in job.outputs} for i, job in enumerate(jobs)]
