"""G's noise with spatial structure: one noise vector per region of doubt.

With one global z per sample (the paper's G), every ambiguity in an image is decided by the same
vector, so two lesions that graders resolve independently came out together: their rims' decisions
correlated at +0.53 across samples where the truth is 0. Here F's p_F says where the image is in
doubt (the top class below 1 - ``threshold``), the connected regions of doubt (grown by ``grow``
pixels, so the pieces of one lesion's rim join) each get a vector of their own, and G's decoder
reads the noise as a map: a region is one vector throughout (coherent: the whole rim or none), two
regions share nothing (independent), and where F is sure the noise is zero (there is nothing to
decide there, and a vector shared by the background would couple the regions it surrounds once the
decoder pools it at coarse levels).

Region 1 gets the sample's own z, so an image with one region of doubt is sampled as a global-noise
G would sample it; further regions' vectors are drawn by the caller (the sampler keys them to z).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DEFAULT_THRESHOLD = 0.05
DEFAULT_GROW = 2


def doubt_regions(p_f: Tensor, threshold: float = DEFAULT_THRESHOLD, grow: int = DEFAULT_GROW) -> tuple[Tensor, list[int]]:
    """(B, C, H, W) probabilities -> (labels (B, H, W) int64 on p_f's device: 0 where F is sure,
    1..R for the connected regions of doubt in raster order; R per image)."""
    from scipy import ndimage  # lazily: the service imports this module at start-up

    doubt = (p_f.detach().max(dim=1).values < 1.0 - threshold).cpu().numpy()
    labels = np.zeros(doubt.shape, dtype=np.int64)
    counts = []
    for i, mask in enumerate(doubt):
        if grow > 0 and mask.any():
            mask = ndimage.binary_dilation(mask, iterations=grow)
        labels[i], count = ndimage.label(mask)
        counts.append(int(count))
    return torch.from_numpy(labels).to(p_f.device), counts


def field(labels: Tensor, vectors: Tensor) -> Tensor:
    """labels (B', H, W) from ``doubt_regions`` (one row per sample), vectors (B', R + 1, D) with
    R >= every label (row r the vector of region r; row 0 is ignored: the sure pixels get zero) ->
    the noise map (B', D, H, W)."""
    table = torch.cat([torch.zeros_like(vectors[:, :1]), vectors[:, 1:]], dim=1)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None, None]
    return table[rows, labels].permute(0, 3, 1, 2)


def training_noise(labels: Tensor, counts: list[int], n: int, noise_dim: int) -> Tensor:
    """n noise maps per image for a training step: labels (B, H, W) and counts from
    ``doubt_regions`` -> (B, n, D, H, W), every region's vector drawn afresh per sample."""
    b = labels.shape[0]
    vectors = torch.randn(b * n, max(counts, default=0) + 1, noise_dim, device=labels.device)
    maps = field(labels.repeat_interleave(n, dim=0), vectors)
    return maps.reshape(b, n, *maps.shape[1:])
