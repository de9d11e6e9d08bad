"""Stochastic Segmentation Networks (Monteiro et al., NeurIPS 2020), the peer method we compare CAR
against, behind CAR's sampler interface so that the sampler, the evaluation and the service run it
unchanged.

The SSN models the logits of all pixels jointly as one low-rank multivariate Gaussian,
eta = mu + P eps1 + sqrt(d) * eps2, eps1 ~ N(0, I_rank) shared by the whole image, eps2 ~ N(0, I) per
pixel and class. In the sampler's slots: F is the mean logits mu (``SSNMean``, so p_F = softmax(mu)),
G's ``encode`` is the distribution's parameters and its ``decode`` draws one logit map per noise row,
the sampler's global noise z being eps1.

Reading order: ``SSNConfig`` -> ``StochasticSegmentationNet`` -> ``SSNMean`` -> ``ssn_loss``; its
training loop is ``training.train_ssn`` (kept apart so that loading a checkpoint imports no
training code).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from training.networks import u_net, u_net_features
from training.sampling import row_generator

# added to the diagonal variance, as in the reference implementation: keeps the per-pixel term a
# proper (non-degenerate) Gaussian where the net drives its log-variance very low
DIAG_EPS = 1e-5


@dataclass(frozen=True)
class SSNConfig:
    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64, 128)
    rank: int = 10
    mc_samples: int = 20  # logit samples per image in the training loss (even: half are antithetic)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.widths) - 1)

    @property
    def noise_dim(self) -> int:
        """The sampler draws its global noise z with this many dimensions: the low-rank factor's."""
        return self.rank

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SSNConfig:
        """From the manifest's JSON, where tuples come back as lists."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown SSNConfig keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class StochasticSegmentationNet(nn.Module):
    """A U-Net like CAR's F whose last features feed three 1x1 heads: the mean logits, the low-rank
    covariance factor and the log of the diagonal variance."""

    def __init__(self, config: SSNConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.encoder, self.ups = u_net(config.in_channels, w)
        self.mean_head = nn.Conv2d(w[0], config.num_classes, 1)
        self.factor_head = nn.Conv2d(w[0], config.rank * config.num_classes, 1)
        self.log_diag_head = nn.Conv2d(w[0], config.num_classes, 1)

    def _features(self, image: Tensor) -> Tensor:
        return u_net_features(self.encoder, self.ups, image)

    def mean_logits(self, image: Tensor) -> Tensor:
        """(B, C_in, H, W) -> mu (B, C, H, W), without computing the covariance heads."""
        return self.mean_head(self._features(image))

    def distribution(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C_in, H, W) -> mu (B, C, H, W), factor P (B, rank, C, H, W), diagonal variance d (B, C, H, W).
        The variance is exp'd in float32: under fp16 autocast exp overflows above ~11."""
        x = self._features(image)
        b, _, h, w = x.shape
        factor = self.factor_head(x).view(b, self.config.rank, self.config.num_classes, h, w)
        diag = self.log_diag_head(x).float().exp() + DIAG_EPS
        return self.mean_head(x), factor, diag

    def encode(self, image: Tensor, p_f: Tensor) -> list[Tensor]:
        """The sampler's per-image step: [mu, factor, diag], each batch-first. ``p_f`` is only there
        for the interface: it is softmax(mu), which the distribution already holds."""
        return list(self.distribution(image))

    def decode(self, feats: list[Tensor], z: Tensor) -> Tensor:
        """``encode``'s output for B' rows and z (B', rank) -> logits (B', C, H, W), one logit sample per row.

        The per-pixel noise eps2 of a row is drawn on the CPU from a generator seeded by that row's z:
        the sampler guarantees that (image, seed, sample index) gives the same samples alone, in any
        batch, in any chunk size and on any device, and it does so by passing only z, drawn from the
        request's seed. Drawing eps2 from the global RNG, or in one call for the whole chunk, would
        make a sample depend on what it was batched with."""
        mu, factor, diag = (f.float() for f in feats)
        low_rank = torch.einsum("br,brchw->bchw", z.float(), factor)
        eps = torch.stack([torch.randn(tuple(mu.shape[1:]), generator=row_generator(row)) for row in z])
        return mu + low_rank + diag.sqrt() * eps.to(mu.device)


class SSNMean(nn.Module):
    """The SSN in F's slot of ``Networks``: its mean logits, so p_F = softmax(mu).

    It holds the SSN outside its submodules, so its state_dict is empty and a checkpoint stores the
    SSN's weights once (as G); ``.to``/``.eval`` on it are no-ops, as the SSN is moved and switched
    through G's slot. ``parameters`` still yields the SSN's, because ``Networks.device`` reads F's."""

    def __init__(self, ssn: StochasticSegmentationNet) -> None:
        super().__init__()
        object.__setattr__(self, "_ssn", ssn)  # bypasses nn.Module's registration of submodules

    @property
    def config(self) -> SSNConfig:
        return self._ssn.config

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self._ssn.parameters(recurse)

    def forward(self, image: Tensor) -> Tensor:
        return self._ssn.mean_logits(image)


def ssn_loss(mu: Tensor, factor: Tensor, diag: Tensor, labels: Tensor, mc_samples: int) -> Tensor:
    """The SSN paper's Monte-Carlo negative log-likelihood of one annotation per image, per pixel:
    -log (1/M sum_m p(y | eta_m)), with the M logit samples drawn by reparametrisation so that the
    gradient reaches mu, P and d, and half of them antithetic (mu - delta for each mu + delta), as in
    the reference, which halves the noise draws and lowers the estimate's variance.

    mu (B, C, H, W), factor (B, rank, C, H, W), diag (B, C, H, W), labels (B, H, W) int64."""
    if mc_samples < 2 or mc_samples % 2:
        raise ValueError(f"mc_samples must be even and >= 2 (half are antithetic), got {mc_samples}")
    half = mc_samples // 2
    b, rank = factor.shape[:2]
    eps1 = torch.randn(half, b, rank, device=mu.device, dtype=factor.dtype)
    eps2 = torch.randn(half, *mu.shape, device=mu.device, dtype=diag.dtype)
    delta = torch.einsum("mbr,brchw->mbchw", eps1, factor) + diag.sqrt() * eps2  # (M/2, B, C, H, W)
    eta = torch.cat([mu + delta, mu - delta])  # (M, B, C, H, W)
    nll = nnf.cross_entropy(eta.flatten(0, 1), labels.repeat(mc_samples, 1, 1), reduction="none")  # (M*B, H, W)
    log_lik = -nll.view(mc_samples, b, -1).sum(dim=2)  # (M, B): log p(y | eta_m) of each image
    log_mean = torch.logsumexp(log_lik, dim=0) - math.log(mc_samples)  # (B,)
    return -(log_mean / labels[0].numel()).mean()
