"""Admission of inference requests in this API process, before their body is read: a token bucket
per caller (429 with Retry-After past its rate) and in-flight caps per caller (429) and in all (503).
With several API replicas each applies its own limits."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request

from service.config import Settings
from service.errors import RateLimited, Unavailable
from training.manifest import ModelEntry


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.rate, self.burst = settings.rate_limit_per_s, settings.rate_limit_burst
        self.max_total, self.max_per_caller = settings.max_in_flight, settings.max_in_flight_per_key
        self._buckets: dict[str, _Bucket] = {}  # one per configured key (and anonymous): bounded
        self._in_flight: dict[str, int] = {}
        self._total = 0

    def _take_token(self, caller: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.setdefault(caller, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / self.rate)
            raise RateLimited(f"more than {self.rate:g} requests per second (burst {self.burst}); retry in {wait} s", retry_after_s=wait)
        bucket.tokens -= 1.0

    @asynccontextmanager
    async def slot(self, caller: str) -> AsyncIterator[None]:
        """Hold one in-flight slot for ``caller`` while the request runs. The event loop is one
        thread and nothing here awaits, so the checks and counts need no lock."""
        self._take_token(caller)
        mine = self._in_flight.get(caller, 0)
        if mine >= self.max_per_caller:
            raise RateLimited(f"{mine} requests of this key are in flight (at most {self.max_per_caller}); retry when one ends")
        if self._total >= self.max_total:
            raise Unavailable(f"{self._total} requests are in flight (at most {self.max_total}); retry shortly")
        self._in_flight[caller] = mine + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            left = self._in_flight[caller] - 1
            if left:
                self._in_flight[caller] = left
            else:
                del self._in_flight[caller]


@asynccontextmanager
async def admitted(request: Request, model: str, version: str | None) -> AsyncIterator[tuple[ModelEntry, float]]:
    """How every inference route (/v1, KServe v2, MONAI Label) lets a request in, before its body is
    read: the caller's slot (rate, in-flight caps), then the model and its queue's room. Yields the
    model and the deadline, stamped now: the upload counts against it."""
    deadline = time.time() + request.app.state.settings.request_timeout_s
    async with request.app.state.admission.slot(request.state.caller.id):
        yield await request.app.state.segmenter.admit(model, version, deadline), deadline
