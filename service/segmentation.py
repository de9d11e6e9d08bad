"""The one domain call behind the inference routes: image bytes + parameters -> a job result, in
the order that makes a refused request cheap: the model and the queue's room first (``admit``,
before the body is read), then k, seed and the image's size and cost from its header, then the
pixels, decoded in a worker thread so that the event loop keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass

import numpy as np

from service.codecs.images import Limits, check_image, decode_image
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
    image: np.ndarray  # (H, W, C) as the model was given it: uint8, uint16 or float32 in [0, 1]


class Segmenter:
    def __init__(self, settings: Settings, registry: ModelRegistry, queue: JobQueue) -> None:
        self.settings, self.registry, self.queue = settings, registry, queue
        self.limits = Limits(settings.max_upload_bytes, settings.max_side, settings.max_pixels, settings.max_pixel_samples)

    def check_k(self, k: int | None) -> int:
        k = self.settings.default_k if k is None else k
        if not 1 <= k <= self.settings.max_k:
            raise InvalidParameter(f"k must be between 1 and {self.settings.max_k}, got {k}")
        return k

    def check_seed(self, seed: int | None) -> int:
        """The seed asked for, or a drawn one."""
        if seed is None:
            return secrets.randbelow(2**31)
        if not 0 <= seed <= SEED_MAX:
            raise InvalidParameter(f"seed must be between 0 and {SEED_MAX}, got {seed}")
        return seed

    async def admit(self, model: str, version: str | None, deadline: float) -> ModelEntry:
        """The model asked for, if it exists and its queue takes a job now (before the body is read)."""
        entry = self.registry.get(model, version)
        await self.queue.admit(entry.name, deadline)
        return entry

    async def segment(
        self, entry: ModelEntry, data: bytes, k: int | None, seed: int | None, outputs: frozenset[Output], deadline: float,
    ) -> Segmentation:
        """Check the parameters, decode the image file, queue a job for ``outputs`` and wait for its result."""
        k, seed = self.check_k(k), self.check_seed(seed)
        limits = dataclasses.replace(self.limits, k=k)
        image = await asyncio.to_thread(decode_image, data, limits, entry.in_channels)
        del data  # the file's bytes are not needed beside its pixels
        return await self.run(entry, image, k, seed, outputs, deadline)

    async def run(
        self, entry: ModelEntry, image: np.ndarray, k: int | None, seed: int | None, outputs: frozenset[Output], deadline: float,
    ) -> Segmentation:
        """Segment pixels already decoded ((H, W, C) uint8, uint16 or float32 in [0, 1]): the size
        limits are checked here too, for callers that decode tensors themselves."""
        k, seed = self.check_k(k), self.check_seed(seed)
        check_image(image, dataclasses.replace(self.limits, k=k), entry.in_channels)
        job = Job(entry.name, entry.version, image, k, seed, deadline=deadline, outputs=outputs)
        result = await self.queue.submit(job)
        return Segmentation(entry, k, seed, result, image)
