"""The in-process transport: a thread-safe queue between the event loop and the consumer's runner
threads. The event loop never runs the networks; it waits on futures the runners resolve."""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass
from typing import Protocol

from service.errors import DeadlineExceeded, QueueFull, ServiceError
from service.jobs import Job, JobResult
from service.metrics import Metrics


class Consumer(Protocol):
    """What takes jobs from this queue in the background (``service.runner.loop.RunnerPool``)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_alive(self) -> bool: ...


@dataclass
class LocalDelivery:
    job: Job
    future: asyncio.Future[JobResult]
    loop: asyncio.AbstractEventLoop

    def wanted(self) -> bool:
        return not self.future.done()  # done before an answer: the client gave up (deadline) or was cancelled

    def _settle(self, result: JobResult | None, error: ServiceError | None) -> None:
        def apply() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        self.loop.call_soon_threadsafe(apply)

    def answer(self, result: JobResult) -> None:
        self._settle(result, None)

    def reject(self, error: ServiceError) -> None:
        self._settle(None, error)

    def failed(self, error: ServiceError) -> None:
        self._settle(None, error)  # nothing to retry from: the job lives only in this process


class LocalQueue:
    def __init__(self, metrics: Metrics, max_jobs: int) -> None:
        self.metrics, self.max_jobs = metrics, max_jobs
        self._queue: queue.Queue[LocalDelivery] = queue.Queue()
        self._consumer: Consumer | None = None

    def attach(self, consumer: Consumer) -> None:
        self._consumer = consumer

    # -- the API's side ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._consumer is not None and not self._consumer.is_alive():
            self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await asyncio.to_thread(self._consumer.stop)

    async def ready(self, models: list[str]) -> tuple[bool, str]:
        if self._consumer is None or not self._consumer.is_alive():
            return False, "the in-process runner is not running"
        return True, "ok"

    async def observe(self) -> None:
        self.metrics.queue_depth.labels("all").set(self._queue.qsize())

    async def admit(self, model: str, deadline: float) -> None:
        if self._queue.qsize() >= self.max_jobs:
            raise QueueFull(f"{self._queue.qsize()} jobs are waiting; retry shortly")

    async def submit(self, job: Job) -> JobResult:
        await self.admit(job.model, job.deadline)  # checked again: others may have queued since
        loop = asyncio.get_running_loop()
        delivery = LocalDelivery(job, loop.create_future(), loop)
        self._queue.put(delivery)
        self.metrics.queue_depth.labels("all").set(self._queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(delivery.future), timeout=max(0.0, job.deadline - time.time()))
        except TimeoutError as exc:
            delivery.future.cancel()  # tells the runner nobody waits for this job any more
            raise DeadlineExceeded(f"no result within the deadline ({job.deadline - job.enqueued:.1f} s)") from exc

    # -- the runner's side ---------------------------------------------------------------------
    def take(self, timeout_s: float, max_jobs: int) -> list[LocalDelivery]:
        taken: list[LocalDelivery] = []
        try:
            taken.append(self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait())
            while len(taken) < max_jobs:
                taken.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        self.metrics.queue_depth.labels("all").set(self._queue.qsize())
        return taken
