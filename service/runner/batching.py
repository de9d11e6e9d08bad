"""Dynamic batching by a sample budget: the cost of a sampler call grows with the number of
samples (sum of k), not of jobs."""

from __future__ import annotations

import itertools
import statistics
import time
from collections import deque

from service.queue.base import Delivery, JobSource


class BatchCollector:
    """Takes deliveries from a source into batches of at most ``max_samples`` samples, closed
    ``max_delay_s`` after their first job. A job that would overflow the budget is carried over and
    opens the next batch; a job larger than the budget makes a batch of its own.

    It asks the source for about as many jobs as the rest of the budget holds at the recent mean k:
    a source shared by several workers (a Redis stream) is not drained into one worker's carry-over
    while another worker idles.

    It waits out the delay only where it pays: while at least half of the recent jobs came within
    the delay of the one before. Otherwise a lone request waited the whole delay for nothing (one
    client posting k = 1 on a 2-core CPU: 2.3 ms of its 40 ms); under load the jobs that queued
    while the runner computed still make one batch, since they are taken at once."""

    def __init__(self, source: JobSource, max_samples: int, max_delay_s: float, typical_k: float) -> None:
        self.source, self.max_samples, self.max_delay_s = source, max_samples, max_delay_s
        self._carry: deque[Delivery] = deque()
        self._typical_k = max(1.0, typical_k)
        self._recent_ks: deque[int] = deque(maxlen=32)
        self._recent_arrivals: deque[float] = deque(maxlen=32)  # the jobs' enqueue times

    def _worth_waiting(self) -> bool:
        """Whether another job is likely within the delay: at least half of the recent jobs came
        within it of the one before (for Poisson arrivals, a rate of 0.69 jobs per delay or more).
        A median, so that one job enqueued long ago (reclaimed from a silent worker, or stamped by
        an API replica whose clock is off) does not decide it; with fewer than two arrivals seen,
        it is assumed to be."""
        if self.max_delay_s <= 0:
            return False
        if len(self._recent_arrivals) < 2:
            return True
        times = sorted(self._recent_arrivals)
        return statistics.median(b - a for a, b in itertools.pairwise(times)) <= self.max_delay_s

    def _ask(self, room: int) -> int:
        # at the mean k of the last 32 jobs, rounded down: better one read more than a job carried
        mean_k = sum(self._recent_ks) / len(self._recent_ks) if self._recent_ks else self._typical_k
        return max(1, int(room // mean_k))

    def _take(self, timeout_s: float, room: int) -> bool:
        taken = self.source.take(timeout_s, self._ask(room))
        self._recent_ks.extend(d.job.k for d in taken)
        self._recent_arrivals.extend(d.job.enqueued for d in taken)
        self._carry.extend(taken)
        return bool(taken)

    def next_batch(self, idle_timeout_s: float, more: bool = True) -> list[Delivery]:
        """The next batch; empty when nothing came within ``idle_timeout_s``. With ``more=False`` the
        source is not asked: only what was already taken is batched (draining on stop)."""
        if not self._carry and not (more and self._take(idle_timeout_s, self.max_samples)):
            return []
        batch: list[Delivery] = []
        samples = 0
        close_at = time.monotonic() + (self.max_delay_s if self._worth_waiting() else 0.0)
        while samples < self.max_samples:
            if not self._carry and not (more and self._take(max(0.0, close_at - time.monotonic()), self.max_samples - samples)):
                break
            k = self._carry[0].job.k
            if batch and samples + k > self.max_samples:
                break
            batch.append(self._carry.popleft())
            samples += k
        return batch
