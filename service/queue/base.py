"""The two faces of a transport. The API submits through ``JobQueue``; the runner takes from a
``JobSource`` and answers each ``Delivery``. Both transports (in-process and Redis Streams)
implement both; the batching and execution between them is written once, in ``service.runner``.
"""

from __future__ import annotations

from typing import Protocol

from service.errors import ServiceError
from service.jobs import Job, JobResult


class JobQueue(Protocol):
    """The API's side."""

    async def start(self) -> None:
        """Begin serving (start the consumer, connect); idempotent."""

    async def stop(self) -> None:
        """Stop taking jobs and release resources."""

    async def admit(self, model: str, deadline: float) -> None:
        """Raise QueueFull or Unavailable if a job for ``model`` would not be taken now: checked
        before the request body is read, so a refused request costs no upload or decode."""

    async def submit(self, job: Job) -> JobResult:
        """Queue a job and wait for its result. Raises QueueFull, Unavailable, DeadlineExceeded or InferenceFailed."""

    async def ready(self, models: list[str]) -> tuple[bool, str]:
        """Whether jobs for every one of ``models`` will be served now, and why not."""

    async def observe(self) -> None:
        """Refresh the queue gauges (depth, oldest job age, pending, ...) before a scrape."""


class Delivery(Protocol):
    """One job in the runner's hands, and how to answer it through the transport it came by."""

    job: Job

    def wanted(self) -> bool:
        """False when nobody waits for the answer any more (the client gave up): skip the work."""

    def answer(self, result: JobResult) -> None:
        """Deliver the result to the client; the job is done."""

    def reject(self, error: ServiceError) -> None:
        """Deliver an error to the client; the job is done (e.g. it expired in the queue)."""

    def failed(self, error: ServiceError) -> None:
        """Computing it raised. The transport decides: answer ``error`` now, or keep the job for a
        retry (Redis: it stays pending, is reclaimed, and is dead-lettered after max_deliveries)."""


class JobSource(Protocol):
    """The runner's side."""

    def take(self, timeout_s: float, max_jobs: int) -> list[Delivery]:
        """Up to ``max_jobs`` deliveries, waiting at most ``timeout_s`` for the first (0: do not
        wait); an empty list when none came."""
