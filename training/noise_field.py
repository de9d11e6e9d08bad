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

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

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


# the most regions of doubt an image may have for the sampler to project per region (a CT crop has
# 6 to 14; an image with more, say of noise, gets the maps): it bounds the shares' memory,
# training.sampling.MemoryModel
MAX_SHARED_REGIONS = 32


class RegionShares:
    """Each image's regions of doubt as area fractions of the decoder's cells, for the sampler:
    labels (B, H, W) from ``doubt_regions`` and R, the most regions an image has. ``at((h, w))`` is
    (B, R, h, w), region r + 1's share of each cell (row 0 of ``field``'s table is the sure
    pixels' zero), for the stages below full resolution; pooled once per call and resolution from
    the half-resolution shares, which are counted straight from the labels (no (B, R, H, W)
    one-hot). The stages' sizes divide H / 2, as the sampler pads to the nets' stride."""

    def __init__(self, labels: Tensor, regions: int) -> None:
        self.labels, self.size = labels, (labels.shape[-2], labels.shape[-1])
        b, (h, w) = labels.shape[0], self.size
        if h % 2 or w % 2:
            ids = torch.arange(1, regions + 1, device=labels.device)[None, :, None, None]
            base = (labels[:, None] == ids).float()
        else:
            h2, w2 = h // 2, w // 2
            cell = (torch.arange(h, device=labels.device)[:, None] // 2) * w2 + torch.arange(w, device=labels.device)[None, :] // 2
            index = (labels * (h2 * w2) + cell).flatten(1)
            counts = torch.zeros(b, (regions + 1) * h2 * w2, device=labels.device)
            counts.scatter_add_(1, index, torch.full(index.shape, 0.25, device=labels.device))
            base = counts.view(b, regions + 1, h2, w2)[:, 1:]
        self._pooled: dict[tuple[int, int], Tensor] = {(base.shape[-2], base.shape[-1]): base}
        self._base = base

    def at(self, size: tuple[int, int]) -> Tensor:
        size = (int(size[0]), int(size[1]))
        if size not in self._pooled:
            self._pooled[size] = nnf.adaptive_avg_pool2d(self._base, size)
        return self._pooled[size]


class RegionNoise:
    """One chunk's region noise as G's injections read it, never built as a noise map. An
    injection's 1x1 projection of the area-averaged noise map (``field``, then pooled) is linear in
    the map: at full resolution it is each pixel's region's projected vector (W v_r + b, b alone
    where F is sure), below it the projected vectors weighted by the regions' shares of each cell,
    sum_r share_r (W v_r) + b. The sampler thus skips building a (samples, D, H, W) map per chunk
    and pooling it at every stage; the values are the map's up to float rounding.

    ``shares`` from ``RegionShares``; ``take`` picks the chunk's rows of a per-image tensor (one
    image's row, broadcast, or one row per sample); ``vectors`` (n, R + 1, D) from
    ``training.sampling.region_vectors``."""

    def __init__(self, shares: RegionShares, take: Callable[[Tensor], Tensor], vectors: Tensor) -> None:
        self.shares, self.take, self.vectors = shares, take, vectors[:, 1:]
        self._taken: dict[tuple[int, int], Tensor] = {}

    def _chunk_at(self, size: tuple[int, int]) -> Tensor:
        """The chunk's rows of the labels (full resolution: (1 or n, H, W)) or of the shares, laid
        out for the matmul ((1 or n, h * w, R)); taken once per stage, for both of its projections
        (``take`` copies them where the chunk spans images)."""
        if size not in self._taken:
            if size == self.shares.size:
                self._taken[size] = self.take(self.shares.labels)
            else:
                self._taken[size] = self.take(self.shares.at(size)).flatten(2).transpose(1, 2)
        return self._taken[size]

    def project(self, linear: nn.Linear, size: tuple[int, int]) -> Tensor:
        """``linear``'s output at every cell of a (h, w) stage: (n, C, h, w), laid out channels-last."""
        projected = self.vectors @ linear.weight.T  # (n, R, C)
        bias = linear.bias.to(projected.dtype)  # float16 under autocast: the float32 bias would promote the maps
        n, (h, w) = projected.shape[0], (int(size[0]), int(size[1]))
        if (h, w) == self.shares.size:
            table = torch.cat([projected.new_zeros(n, 1, projected.shape[2]), projected], dim=1) + bias  # (n, R + 1, C)
            rows = torch.arange(n, device=table.device)[:, None, None]
            return table[rows, self._chunk_at((h, w))].permute(0, 3, 1, 2)  # (n, H, W, C) viewed as NCHW
        per_cell = torch.matmul(self._chunk_at((h, w)), projected)  # (n, h * w, C)
        return (per_cell + bias).unflatten(1, (h, w)).permute(0, 3, 1, 2)
