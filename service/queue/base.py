"""The interface both backends implement (in-process and Redis Streams)."""

from __future__ import annotations

from typing import Protocol

from service.inference import Job, JobResult


class JobQueue(Protocol):
    async def start(self) -> None:
        """Begin serving (start the worker, connect); idempotent."""

    async def stop(self) -> None:
        """Stop taking jobs and release resources."""

    async def submit(self, job: Job) -> JobResult:
        """Queue a job and wait for its result. Raises QueueFull, DeadlineExceeded or InferenceFailed."""

    async def ready(self, models: list[str]) -> tuple[bool, str]:
        """Whether jobs for every one of ``models`` will be served now, and why not."""

    async def observe(self) -> None:
        """Refresh the queue gauges (depth, oldest job age, pending, ...) before a scrape."""
