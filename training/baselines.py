"""The baselines that need no training of their own: they take a trained model's F and replace G.

``independent``    each pixel drawn on its own from p_F: calibrated pixel by pixel, but an object
                   comes out as salt and pepper, never whole or absent (what G exists to avoid).
``deterministic``  k copies of argmax p_F: no randomness, the point estimate a single-mask
                   model serves.

Each is a drop-in for G (``encode`` once, ``decode`` per noise vector), so ``training.sampling``
runs them, and ``training.evaluate`` judges them, exactly as it does CAR.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from training.sampling import Networks, row_generator

BASELINES = ("independent", "deterministic")
# logit of a drawn label over the others: its softmax is one-hot to float32 precision, so the
# soft samples' mean is the share of samples with each label, as G's would be
_CONFIDENT = 30.0


@dataclass(frozen=True)
class PixelSamplerConfig:
    """What the sampler and its memory model read of G's config."""

    num_classes: int
    noise_dim: int = 8
    stride: int = 1
    widths: tuple[int, ...] = (1,)  # holds no features: a width of 1 for ``MemoryModel``


class PixelSampler(nn.Module):
    """G's slot for a sampler that uses p_F alone."""

    def __init__(self, num_classes: int, independent: bool) -> None:
        super().__init__()
        self.config = PixelSamplerConfig(num_classes)
        self.independent = independent

    def encode(self, image: Tensor, p_f: Tensor) -> list[Tensor]:
        return [p_f]

    def decode(self, feats: list[Tensor], z: Tensor) -> Tensor:
        p_f = feats[0]  # (B', C, H, W)
        if self.independent:
            cdf = p_f.cumsum(dim=1)
            u = torch.stack([torch.rand(p_f.shape[-2:], generator=row_generator(row)) for row in z]).to(p_f.device)
            labels = (u[:, None] > cdf).sum(dim=1).clamp_max(p_f.shape[1] - 1)
        else:
            labels = p_f.argmax(dim=1)
        return nnf.one_hot(labels, p_f.shape[1]).permute(0, 3, 1, 2).float() * _CONFIDENT


def baseline(networks: Networks, name: str) -> Networks:
    """``networks``' F with G replaced by the baseline ``name`` (one of ``BASELINES``)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    sampler = PixelSampler(networks.refinement.config.num_classes, independent=name == "independent")
    return replace(networks, refinement=sampler.to(networks.device).eval())

