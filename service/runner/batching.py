"""Dynamic batching by a sample budget: the cost of a sampler call grows with the number of
samples (sum of k), not of jobs."""

from __future__ import annotations

import time
from collections import deque

from service.queue.base import Delivery, JobSource


class BatchCollector:
    """Takes deliveries from a source into batches of at most ``max_samples`` samples, closed
    ``max_delay_s`` after their first job. A job that would overflow the budget is carried over and
    opens the next batch; a job larger than the budget makes a batch of its own.

    It asks the source for about as many jobs as the rest of the budget holds at the recent mean k:
    a source shared by several workers (a Redis stream) is not drained into one worker's carry-over
    while another worker idles."""

    def __init__(self, source: JobSource, max_samples: int, max_delay_s: float, typical_k: float) -> None:
        self.source, self.max_samples, self.max_delay_s = source, max_samples, max_delay_s
        self._carry: deque[Delivery] = deque()
        self._typical_k = max(1.0, typical_k)
        self._recent_ks: deque[int] = deque(maxlen=32)

    def _ask(self, room: int) -> int:
        # at the mean k of the last 32 jobs, rounded down: better one read more than a job carried
        mean_k = sum(self._recent_ks) / len(self._recent_ks) if self._recent_ks else self._typical_k
        return max(1, int(room // mean_k))

    def _take(self, timeout_s: float, room: int) -> bool:
        taken = self.source.take(timeout_s, self._ask(room))
        self._recent_ks.extend(d.job.k for d in taken)
        self._carry.extend(taken)
        return bool(taken)

    def next_batch(self, idle_timeout_s: float, more: bool = True) -> list[Delivery]:
        """The next batch; empty when nothing came within ``idle_timeout_s``. With ``more=False`` the
        source is not asked: only what was already taken is batched (draining on stop)."""
        if not self._carry and not (more and self._take(idle_timeout_s, self.max_samples)):
            return []
        batch: list[Delivery] = []
        samples = 0
        close_at = time.monotonic() + self.max_delay_s
        while samples < self.max_samples:
            if not self._carry and not (more and self._take(max(0.0, close_at - time.monotonic()), self.max_samples - samples)):
                break
            k = self._carry[0].job.k
            if batch and samples + k > self.max_samples:
                break
            batch.append(self._carry.popleft())
            samples += k
        return batch
