"""The one domain call behind the inference routes: uploaded files + parameters -> a job result
per slice, in the order that makes a refused request cheap: the model and the queue's room first
(``admit``, before the body is read), then k, seed and the input's size and cost from its header,
then the pixels, decoded in a worker thread so that the event loop keeps serving.

A volume (NIfTI, a DICOM series) is one job per slice through the same queue, so the runner
batches slices as it batches requests; slice d draws its noise from seed + d, so a slice sent
alone with that seed gives the same masks."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass

import numpy as np

from service.codecs.images import Limits, check_image
from service.codecs.inputs import decode_input
from service.codecs.outputs import class_frequencies
from service.codecs.volume import InputLimits, Volume, from_image
from service.config import Settings
from service.errors import InvalidParameter
from service.jobs import Job, JobResult, Output
from service.queue import JobQueue
from service.registry import ModelRegistry
from training.manifest import ModelEntry

SEED_MAX = 2**63 - 1
# slices of one volume queued at once: enough to fill the runner's batches, few enough that one
# volume does not take the whole queue from other requests
SLICES_IN_FLIGHT = 16


@dataclass
class Segmentation:
    entry: ModelEntry
    k: int
    seed: int
    volume: Volume  # the input as the model was given it, with its geometry
    results: list[JobResult]  # one per slice

    @property
    def result(self) -> JobResult:
        """The result of a 2-D input; a response that has no slice axis asks for this."""
        if len(self.results) != 1:
            raise InvalidParameter(
                f"this input is a volume of {len(self.results)} slices; ask for format=nifti or npz (or send one slice)"
            )
        return self.results[0]

    @property
    def image(self) -> np.ndarray:
        """(H, W, C) of a 2-D input: uint8, uint16 or float32 in [0, 1]."""
        self.result  # noqa: B018 - refuses a volume with the same message
        return self.volume.slices[0]

    def stacked(self, output: Output) -> np.ndarray:
        """One output over all slices, the slice axis first: (D, ...) e.g. labels (D, k, H, W)."""
        return np.stack([result[output] for result in self.results])

    def sample_mean(self) -> np.ndarray:
        """(D, C - 1, H, W): each foreground class's share of the k samples (needs Output.LABELS)."""
        classes = len(self.entry.classes)
        return np.stack([class_frequencies(result[Output.LABELS], classes) for result in self.results])

    @staticmethod
    def per_voxel(stacked: np.ndarray) -> np.ndarray:
        """(D, n, H, W) -> (D, H, W, n), the layout of a NIfTI with n maps on its 4th axis; (D, H, W) as it is."""
        return np.moveaxis(stacked, 1, -1) if stacked.ndim == 4 else stacked


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
        self, entry: ModelEntry, files: list[bytes], k: int | None, seed: int | None, outputs: frozenset[Output], deadline: float,
    ) -> Segmentation:
        """Check the parameters, decode the upload (an image, a volume or a DICOM series), queue a
        job per slice for ``outputs`` and wait for the results."""
        k, seed = self.check_k(k), self.check_seed(seed)
        limits = InputLimits(
            dataclasses.replace(self.limits, k=k), self.settings.max_slices, self.settings.max_slices, self.settings.max_volume_pixel_samples,
        )
        volume = await asyncio.to_thread(decode_input, files, limits, entry.in_channels, entry.manifest)
        del files  # the files' bytes are not needed beside their pixels
        return await self.run_volume(entry, volume, k, seed, outputs, deadline)

    async def run(
        self, entry: ModelEntry, image: np.ndarray, k: int | None, seed: int | None, outputs: frozenset[Output], deadline: float,
    ) -> Segmentation:
        """Segment pixels already decoded ((H, W, C) uint8, uint16 or float32 in [0, 1])."""
        return await self.run_volume(entry, from_image(image), k, seed, outputs, deadline)

    async def run_volume(
        self, entry: ModelEntry, volume: Volume, k: int | None, seed: int | None, outputs: frozenset[Output], deadline: float,
    ) -> Segmentation:
        k, seed = self.check_k(k), self.check_seed(seed)
        # a decoded volume met its limits from its header; this holds a tensor's caller to the same per-slice ones
        check_image(volume.slices[0], dataclasses.replace(self.limits, k=k), entry.in_channels)
        depth = volume.depth
        gate = asyncio.Semaphore(SLICES_IN_FLIGHT)

        async def one(index: int) -> JobResult:
            async with gate:
                job = Job(entry.name, entry.version, volume.slices[index], k, (seed + index) % (SEED_MAX + 1), deadline=deadline, outputs=outputs)
                return await self.queue.submit(job)

        results = await asyncio.gather(*(one(index) for index in range(depth)))
        return Segmentation(entry, k, seed, volume, list(results))
