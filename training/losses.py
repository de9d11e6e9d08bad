"""The losses of CAR. Probabilities are clamped to [1e-3, 1 - 1e-3] inside the KL terms, as the
reference does, so a confident p_F cannot make the calibration loss explode."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

from training.networks import Discriminator

_EPS = 1e-3


def calibration_net_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Pixelwise cross-entropy of F against one annotator's map: (B, C, H, W), (B, H, W)."""
    return nnf.cross_entropy(logits, labels)


def calibration_loss(sample_probs: Tensor, p_f: Tensor, forward_weight: float = 0.0) -> Tensor:
    """L_cal = mean over pixels of KL(p_bar_G || p_F), p_bar_G the mean of the n samples' softmax.

    sample_probs (B, n, C, H, W), p_f (B, C, H, W) (detached by the caller). ``forward_weight``
    adds w * KL(p_F || p_bar_G): the reverse KL alone is mode-seeking and lets rare modes die
    (METHOD.md's feasibility notes); the forward term makes a missing mode expensive.
    """
    p_bar = sample_probs.mean(dim=1).clamp(_EPS, 1 - _EPS)
    target = p_f.clamp(_EPS, 1 - _EPS)
    reverse = (p_bar * (p_bar.log() - target.log())).sum(dim=1).mean()
    if forward_weight == 0.0:
        return reverse
    forward = (target * (target.log() - p_bar.log())).sum(dim=1).mean()
    return reverse + forward_weight * forward


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating: BCE(D(x, G(x, z)), 1), averaged over every sample."""
    return nnf.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(
    disc: Discriminator, image: Tensor, real_mask: Tensor, fake_mask: Tensor, r1_gamma: float
) -> tuple[Tensor, Tensor]:
    """L_D = BCE(D(x, onehot y), 1) + BCE(D(x, sample), 0) + gamma * R1, R1 the mean squared norm
    of the gradient of D's per-image score with respect to its real mask input.
    Returns (loss, accuracy on this batch) so the caller can gate D's updates."""
    real_mask = real_mask.detach().requires_grad_(r1_gamma > 0)
    real_logits = disc(image, real_mask)
    fake_logits = disc(image, fake_mask.detach())
    loss = nnf.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    loss = loss + nnf.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if r1_gamma > 0:
        (grad,) = torch.autograd.grad(real_logits.sum(), real_mask, create_graph=True)
        loss = loss + r1_gamma * grad.pow(2).flatten(1).sum(1).mean()
    accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
    return loss, accuracy.detach()
