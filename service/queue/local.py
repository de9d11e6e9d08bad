"""The in-process queue: a thread-safe queue and one worker thread that batches dynamically. The
event loop never runs the networks; it only waits on futures the worker resolves."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.errors import DeadlineExceeded, InferenceFailed, QueueFull, ServiceError
from service.inference import Job, JobResult, group_jobs, run_group
from service.metrics import Metrics
from service.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: Job
    future: asyncio.Future[JobResult]
    loop: asyncio.AbstractEventLoop

    def resolve(self, result: JobResult | None = None, error: ServiceError | None = None) -> None:
        def apply() -> None:
            if self.future.done():  # the client gave up (deadline) or was cancelled
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        self.loop.call_soon_threadsafe(apply)


class BatchCollector:
    """Takes jobs from a blocking source into batches bounded by a sample budget (sum of k) and a
    maximum wait after the first job. A job that would overflow the budget opens the next batch."""

    def __init__(self, get: Callable[[float | None], _Pending | None], max_samples: int, max_delay_s: float) -> None:
        self._get, self.max_samples, self.max_delay_s = get, max_samples, max_delay_s
        self._carry: _Pending | None = None

    def next_batch(self, idle_timeout_s: float) -> list[_Pending]:
        first = self._carry or self._get(idle_timeout_s)
        self._carry = None
        if first is None:
            return []
        batch, samples = [first], first.job.k
        close_at = time.monotonic() + self.max_delay_s
        while samples < self.max_samples:
            item = self._get(max(0.0, close_at - time.monotonic()))
            if item is None:
                break
            if samples + item.job.k > self.max_samples:
                self._carry = item
                break
            batch.append(item)
            samples += item.job.k
        return batch


class LocalQueue:
    def __init__(
        self, registry: ModelRegistry, device: torch.device, metrics: Metrics,
        max_samples: int, max_delay_s: float, max_jobs: int, decode_batch: int,
    ) -> None:
        self.registry, self.device, self.metrics = registry, device, metrics
        self.max_jobs, self.decode_batch = max_jobs, decode_batch
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._collector = BatchCollector(self._take, max_samples, max_delay_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches_run = 0

    def _take(self, timeout: float | None) -> _Pending | None:
        try:
            return self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
        except queue.Empty:
            return None

    async def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="carseg-worker", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    async def ready(self, models: list[str]) -> tuple[bool, str]:
        if self._thread is None or not self._thread.is_alive():
            return False, "worker thread not running"
        return True, "ok"

    async def observe(self) -> None:
        self.metrics.queue_depth.labels("all").set(self._queue.qsize())

    async def submit(self, job: Job) -> JobResult:
        if self._queue.qsize() >= self.max_jobs:
            raise QueueFull(f"{self._queue.qsize()} jobs are waiting; retry shortly")
        loop = asyncio.get_running_loop()
        pending = _Pending(job, loop.create_future(), loop)
        self._queue.put(pending)
        self.metrics.queue_depth.labels("all").set(self._queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout=max(0.0, job.deadline - time.time()))
        except TimeoutError as exc:
            pending.future.cancel()  # tells the worker nobody waits for this job any more
            raise DeadlineExceeded(f"no result within the deadline ({job.deadline - job.enqueued:.1f} s)") from exc

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collector.next_batch(idle_timeout_s=0.1)
            self.metrics.queue_depth.labels("all").set(self._queue.qsize())
            if batch:
                self._process(batch)

    def _process(self, batch: list[_Pending]) -> None:
        now = time.time()
        live = []
        for item in batch:
            if item.future.cancelled():
                self.metrics.jobs.labels("abandoned").inc()
            elif item.job.deadline <= now:
                self.metrics.jobs.labels("expired").inc()
                item.resolve(error=DeadlineExceeded("the job expired in the queue"))
            else:
                live.append(item)
        if not live:
            return
        by_id = {item.job.id: item for item in live}
        self.metrics.batch_jobs.observe(len(live))
        self.metrics.batch_samples.observe(sum(item.job.k for item in live))
        for (name, version, _), jobs in group_jobs([item.job for item in live]).items():
            try:
                model = self.registry.load(name, version, self.device)
                results = run_group(model, jobs, self.device, self.decode_batch)
            except Exception:  # one bad group must not take the worker down; the client gets a 500 with a reason
                log.exception("inference failed for %d job(s) of %s v%s", len(jobs), name, version)
                for job in jobs:
                    self.metrics.jobs.labels("failed").inc()
                    by_id[job.id].resolve(error=InferenceFailed(f"inference failed for job {job.id}; see the worker log"))
                continue
            self.metrics.compute_seconds.labels(name).observe(results[0].compute_s)
            for job, result in zip(jobs, results, strict=True):
                self.metrics.queue_wait_seconds.labels(name).observe(result.queue_wait_s)
                self.metrics.jobs.labels("done").inc()
                by_id[job.id].resolve(result)
        self.batches_run += 1
