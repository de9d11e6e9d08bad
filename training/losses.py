"""The losses of CAR. L_cal is computed in log space from G's logits, so it keeps pulling when G's
samples saturate; only the target p_F is clamped to [1e-3, 1 - 1e-3], as the reference does, so a
confident p_F cannot make the calibration loss explode."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

_EPS = 1e-3


def calibration_net_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Pixelwise cross-entropy of F against one annotator's map: (B, C, H, W), (B, H, W)."""
    return nnf.cross_entropy(logits, labels)


def calibration_loss(sample_logits: Tensor, p_f: Tensor, forward_weight: float = 0.0) -> Tensor:
    """L_cal = mean over pixels of KL(p_bar_G || p_F), p_bar_G the mean of the n samples' softmax.

    sample_logits (B, n, C, H, W), p_f (B, C, H, W) (detached by the caller). log p_bar_G is the
    log-sum-exp of the samples' log-softmax: clamping p_bar_G instead (the reference's way) leaves
    no gradient once the samples saturate, e.g. p_F (0.3, 0.7) against samples all at 0.9997 had
    L_cal 1.81 and gradient 0, so a reading G had dropped could never come back.
    ``forward_weight`` adds w * KL(p_F || p_bar_G), which makes a missing mode expensive (the
    reverse KL alone is mode-seeking; METHOD.md's feasibility notes) but is biased: the log of an
    n-sample mean is infinite when no sample marks a reading, so for saturated samples it pulls the
    shares towards 1/2 (expected minimum at n = 8: 0.33 where p_F is 0.25). Off by default.
    """
    n = sample_logits.shape[1]
    log_p_bar = torch.logsumexp(sample_logits.float().log_softmax(dim=2), dim=1) - math.log(n)  # (B, C, H, W)
    log_target = p_f.clamp(_EPS, 1 - _EPS).log()
    reverse = (log_p_bar.exp() * (log_p_bar - log_target)).sum(dim=1).mean()
    if forward_weight == 0.0:
        return reverse
    forward = (log_target.exp() * (log_target - log_p_bar)).sum(dim=1).mean()
    return reverse + forward_weight * forward


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating: BCE(D(x, G(x, z)), 1), averaged over every sample (and patch)."""
    return nnf.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(
    disc: nn.Module, image: Tensor, real_mask: Tensor, fake_mask: Tensor, r1_gamma: float
) -> tuple[Tensor, Tensor]:
    """L_D = BCE(D(x, onehot y), 1) + BCE(D(x, sample), 0) + gamma * R1. D may score patches
    ((B, h, w) logits) or whole images ((B,)); an image's score is the mean of its patches'.
    R1 is the mean squared norm of the gradient of the real images' scores with respect to D's
    whole real input, image and mask (as the reference takes it). Real and fake go through D in
    one call, so a data-parallel wrapper sees one forward per backward.
    Returns (loss, accuracy of the image scores on this batch) so the caller can gate D's updates."""
    b = image.shape[0]
    real_image = image.detach().requires_grad_(r1_gamma > 0)
    real_mask = real_mask.detach().requires_grad_(r1_gamma > 0)
    logits = disc(torch.cat([real_image, image.detach()]), torch.cat([real_mask, fake_mask.detach()]))
    real_logits, fake_logits = logits[:b], logits[b:]
    loss = nnf.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    loss = loss + nnf.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    real_scores = real_logits.flatten(1).mean(1) if real_logits.ndim > 1 else real_logits
    fake_scores = fake_logits.flatten(1).mean(1) if fake_logits.ndim > 1 else fake_logits
    if r1_gamma > 0:
        grads = torch.autograd.grad(real_scores.sum(), (real_image, real_mask), create_graph=True)
        loss = loss + r1_gamma * sum(g.pow(2).flatten(1).sum(1) for g in grads).mean()
    accuracy = ((real_scores > 0).float().mean() + (fake_scores < 0).float().mean()) / 2
    return loss, accuracy.detach()
