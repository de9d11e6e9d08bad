"""The job contract between the API and the runner: plain data (numpy, no torch), so an API
replica that only queues jobs never loads torch, and any transport can carry a job as bytes.

A job carries the image as decoded from the client's file, in its own dtype ((H, W, C) uint8,
uint16 or float32 in [0, 1]): the code that holds the model normalises it. It names the outputs
its response needs, and the runner computes only those. A result holds exactly those arrays.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

IMAGE_DTYPES = ("uint8", "uint16", "float32")


class Output(StrEnum):
    """What a job can ask for; the names are the sampler's (``training.sampling.OUTPUTS``)."""

    LABELS = "labels"  # (k, H, W) uint8, one label map per sample
    P_F = "p_f"  # (C, H, W) float32, F's calibrated class probabilities
    ALEATORIC_ENTROPY = "aleatoric_entropy"  # (H, W) float32, H(p_F) in nats
    SAMPLE_ENTROPY = "sample_entropy"  # (H, W), H(sample mean)
    MUTUAL_INFORMATION = "mutual_information"  # (H, W), H(mean) - mean H(sample)
    SAMPLE_VARIANCE = "sample_variance"  # (H, W), across-sample variance summed over classes


@dataclass
class Job:
    model: str
    version: str
    image: np.ndarray  # (H, W, C) as decoded: uint8, uint16 or float32 in [0, 1]
    k: int
    seed: int
    deadline: float  # time.time() after which nobody waits for the result
    outputs: frozenset[Output] = frozenset({Output.LABELS})
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.dtype.name not in IMAGE_DTYPES:
            raise ValueError(f"a job's image is (H, W, C) of {IMAGE_DTYPES}, not {self.image.dtype} {self.image.shape}")
        # native byte order, C order: a transport carries the raw bytes with the dtype's name only
        # (a big-endian .npy upload would otherwise cross Redis byte-swapped)
        self.image = np.ascontiguousarray(self.image, dtype=self.image.dtype.name)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.outputs:
            raise ValueError("a job must ask for at least one output")

    @property
    def group_key(self) -> tuple[str, str, tuple[int, ...]]:
        """Jobs with the same key can share one sampler call."""
        return (self.model, self.version, tuple(self.image.shape))


@dataclass
class JobResult:
    arrays: dict[Output, np.ndarray]  # exactly the outputs the job asked for, on the host
    queue_wait_s: float = 0.0  # from enqueueing to the start of its batch
    compute_s: float = 0.0  # the sampler call it shared
    batch_jobs: int = 1  # jobs in that call

    def __getitem__(self, output: Output) -> np.ndarray:
        return self.arrays[output]
