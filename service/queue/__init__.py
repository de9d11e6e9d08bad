"""The job queue between the API and the workers: one interface, two backends."""

from service.queue.base import JobQueue

__all__ = ["JobQueue"]
