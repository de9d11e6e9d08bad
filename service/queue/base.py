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

    def ready(self) -> tuple[bool, str]:
        """Whether jobs will be served now, and why not."""

    def depth(self) -> int:
        """Jobs waiting for a worker."""
