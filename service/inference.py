"""Jobs and how a batch of them is computed: the code every worker (in-process or Redis) runs.
Free of HTTP: it takes normalised arrays and returns numpy results."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from training.checkpoint import LoadedModel
from training.sampling import SampleOutput, sample, summarise


@dataclass
class Job:
    model: str
    version: str
    image: np.ndarray  # (C, H, W) float32, normalised for the model
    k: int
    seed: int
    deadline: float  # time.time() after which nobody waits for the result
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued: float = field(default_factory=time.time)

    @property
    def group_key(self) -> tuple[str, str, tuple[int, ...]]:
        return (self.model, self.version, tuple(self.image.shape))


@dataclass
class JobResult:
    labels: np.ndarray  # (k, H, W) uint8
    probabilities: np.ndarray  # (C, H, W) float32, p_F
    aleatoric_entropy: np.ndarray  # (H, W) float32
    sample_entropy: np.ndarray
    mutual_information: np.ndarray
    sample_variance: np.ndarray
    queue_wait_s: float = 0.0
    compute_s: float = 0.0
    batch_jobs: int = 1


def group_jobs(jobs: list[Job]) -> dict[tuple[str, str, tuple[int, ...]], list[Job]]:
    """Jobs that can share one sampler call: same model, version and input shape."""
    groups: dict[tuple[str, str, tuple[int, ...]], list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.group_key].append(job)
    return groups


def run_group(model: LoadedModel, jobs: list[Job], device: torch.device, decode_batch: int) -> list[JobResult]:
    """One sampler call for jobs of one group. Jobs with different k run in one call with the
    largest k; each keeps its first k samples and its maps are summarised from those alone (noise
    is drawn per seed, row by row, so a job's samples do not depend on the others)."""
    started = time.time()
    k_max = max(job.k for job in jobs)
    images = torch.from_numpy(np.stack([job.image for job in jobs])).to(device)
    # AMP only on CUDA: on CPU, bf16 autocast made the U-Nets ~70x slower (METHOD.md)
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    with amp, torch.inference_mode():
        out = sample(model.calibration, model.refinement, images, k_max, [job.seed for job in jobs], decode_batch=decode_batch)
        compute = time.time() - started
        results = []
        for i, job in enumerate(jobs):
            if job.k == k_max:
                mine = SampleOutput(**{f.name: getattr(out, f.name)[i : i + 1] for f in fields(SampleOutput)})
            else:
                mine = summarise(out.probabilities[i : i + 1, : job.k], out.p_f[i : i + 1])
            results.append(_to_result(mine, job, started, compute, len(jobs)))
    return results


def _to_result(out: SampleOutput, job: Job, started: float, compute: float, batch_jobs: int) -> JobResult:
    def host(t: torch.Tensor) -> np.ndarray:
        return t[0].float().cpu().numpy()

    return JobResult(
        labels=out.labels[0].to(torch.uint8).cpu().numpy(),
        probabilities=host(out.p_f),
        aleatoric_entropy=host(out.aleatoric_entropy),
        sample_entropy=host(out.sample_entropy),
        mutual_information=host(out.mutual_information),
        sample_variance=host(out.sample_variance),
        queue_wait_s=started - job.enqueued,
        compute_s=compute,
        batch_jobs=batch_jobs,
    )
