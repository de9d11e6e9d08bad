"""The one domain call behind the inference routes: image bytes + parameters -> a job result."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from service.codecs.images import Limits, decode_image
from service.config import Settings
from service.errors import InvalidParameter
from service.jobs import Job, JobResult, Output
from service.queue import JobQueue
from service.registry import ModelRegistry
from training.manifest import ModelEntry

SEED_MAX = 2**63 - 1


@dataclass
class Segmentation:
    entry: ModelEntry
    k: int
    seed: int
    result: JobResult


class Segmenter:
    def __init__(self, settings: Settings, registry: ModelRegistry, queue: JobQueue) -> None:
        self.settings, self.registry, self.queue = settings, registry, queue
        self.limits = Limits(settings.max_upload_bytes, settings.max_side, settings.max_pixels)

    def check_k(self, k: int | None) -> int:
        k = self.settings.default_k if k is None else k
        if not 1 <= k <= self.settings.max_k:
            raise InvalidParameter(f"k must be between 1 and {self.settings.max_k}, got {k}")
        return k

    async def segment(
        self, model: str, version: str | None, data: bytes, k: int | None, seed: int | None, outputs: frozenset[Output],
    ) -> Segmentation:
        """Decode and check the image, queue a job for ``outputs`` and wait for its result."""
        entry = self.registry.get(model, version)
        k = self.check_k(k)
        if seed is not None and not 0 <= seed <= SEED_MAX:
            raise InvalidParameter(f"seed must be between 0 and {SEED_MAX}, got {seed}")
        seed = secrets.randbelow(2**31) if seed is None else seed
        image = decode_image(data, self.limits, entry.in_channels)
        job = Job(entry.name, entry.version, image, k, seed, deadline=time.time() + self.settings.request_timeout_s, outputs=outputs)
        result = await self.queue.submit(job)
        return Segmentation(entry, k, seed, result)
