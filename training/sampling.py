"""The sampler: the one function the service calls. F and G's encoder run once per image, G's
decoder once per sample; every uncertainty map comes from the same tensors.

Each image's noise comes from its own ``torch.Generator`` seeded by that image's seed and drawn on
the CPU, so (image, seed, k) gives the same samples alone, in any batch and on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from training.networks import CalibrationNet, RefinementNet

_LOG_EPS = 1e-12


@dataclass(frozen=True)
class Normalisation:
    """Maps stored pixel values to the network's input range: integer images are divided by the
    maximum of their dtype (255 or 65535), float images are taken as already in [0, 1]; then
    [0, 1] is mapped linearly onto [low, high]."""

    low: float = -1.0
    high: float = 1.0

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) uint8 | uint16 | float -> (C, H, W) float32."""
        if np.issubdtype(image.dtype, np.integer):
            unit = image.astype(np.float32) / float(np.iinfo(image.dtype).max)
        else:
            unit = image.astype(np.float32)
        return (self.low + (self.high - self.low) * unit).transpose(2, 0, 1)


@dataclass
class SampleOutput:
    """Everything one call produces, on the device it was computed on.

    labels (B, k, H, W) int64; probabilities (B, k, C, H, W) soft samples; mean (B, C, H, W) the
    sample mean; p_f (B, C, H, W); aleatoric_entropy = H(p_F), sample_entropy = H(mean),
    mutual_information = H(mean) - mean_k H(sample_k), sample_variance = sum over classes of the
    across-sample variance of the soft samples; each (B, H, W), entropies in nats.
    """

    labels: Tensor
    probabilities: Tensor
    mean: Tensor
    p_f: Tensor
    aleatoric_entropy: Tensor
    sample_entropy: Tensor
    mutual_information: Tensor
    sample_variance: Tensor


def entropy(probs: Tensor, dim: int) -> Tensor:
    return -(probs * (probs + _LOG_EPS).log()).sum(dim=dim)


def noise(seed: int, k: int, noise_dim: int) -> Tensor:
    """k noise vectors (k, noise_dim) from a generator of their own, drawn on the CPU. Drawn row by
    row, because torch draws one large tensor differently from small ones: this way the first k
    samples of a seed are the same whatever k is asked for."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(noise_dim, generator=generator) for _ in range(k)])


def _pad_to(x: Tensor, stride: int) -> tuple[Tensor, int, int]:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % stride, (-w) % stride
    if pad_h or pad_w:
        # replicate, not zeros: a zero border is a bright or dark edge the nets never saw
        x = nnf.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x, h, w


@torch.inference_mode()
def sample(
    calibration: CalibrationNet,
    refinement: RefinementNet,
    images: Tensor,
    k: int,
    seeds: list[int],
    decode_batch: int = 64,
) -> SampleOutput:
    """images (B, C_in, H, W), normalised, any H, W (padded to the nets' stride and cropped back).
    ``seeds`` has one seed per image. ``decode_batch`` caps how many samples G decodes at once."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} images")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    stride = max(calibration.config.stride, refinement.config.stride)
    padded, h, w = _pad_to(images, stride)
    b = padded.shape[0]
    p_f = calibration(padded).softmax(dim=1)  # (B, C, Hp, Wp)
    feats = refinement.encode(padded, p_f)
    z = torch.stack([noise(s, k, refinement.config.noise_dim) for s in seeds]).to(padded.device)  # (B, k, Z)
    z = z.reshape(b * k, -1)
    rows = torch.arange(b, device=padded.device).repeat_interleave(k)  # image index of each sample
    chunks = []
    for start in range(0, b * k, decode_batch):
        idx = rows[start : start + decode_batch]
        logits = refinement.decode([f[idx] for f in feats], z[start : start + decode_batch])
        chunks.append(logits.float().softmax(dim=1))
    probs = torch.cat(chunks).reshape(b, k, -1, *padded.shape[-2:])[..., :h, :w]  # (B, k, C, H, W)
    return summarise(probs, p_f.float()[..., :h, :w])


def summarise(probs: Tensor, p_f: Tensor) -> SampleOutput:
    """Soft samples (B, k, C, H, W) and p_F (B, C, H, W) -> labels, mean and uncertainty maps."""
    mean = probs.mean(dim=1)
    sample_entropy = entropy(mean, dim=1)
    return SampleOutput(
        labels=probs.argmax(dim=2),
        probabilities=probs,
        mean=mean,
        p_f=p_f,
        aleatoric_entropy=entropy(p_f, dim=1),
        sample_entropy=sample_entropy,
        mutual_information=(sample_entropy - entropy(probs, dim=2).mean(dim=1)).clamp_min(0.0),
        sample_variance=probs.var(dim=1, unbiased=False).sum(dim=1),
    )
