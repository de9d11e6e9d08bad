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
    ``forward_weight`` adds w * KL(p_F || p_bar_G): the reverse KL alone is mode-seeking and lets
    rare modes die (METHOD.md's feasibility notes); the forward term makes a missing mode expensive.
    """
    n = sample_logits.shape[1]
    log_p_bar = torch.logsumexp(sample_logits.float().log_softmax(dim=2), dim=1) - math.log(n)  # (B, C, H, W)
    log_target = p_f.clamp(_EPS, 1 - _EPS).log()
    reverse = (log_p_bar.exp() * (log_p_bar - log_target)).sum(dim=1).mean()
    if forward_weight == 0.0:
        return reverse
    forward = (log_target.exp() * (log_target - log_p_bar)).sum(dim=1).mean()
    return reverse + forward_weight * forward


def sample_entropy(sample_logits: Tensor) -> Tensor:
    """Mean over samples and pixels of each sample's own entropy H(softmax(logits)), in nats:
    sample_logits (B, n, C, H, W). L_cal holds the mean of the soft samples to p_F, but what a user
    gets is each sample's argmax; a G whose samples all sit at 0.6 meets L_cal and serves the reading
    in every mask. Penalising this entropy makes each sample commit, so the share of masks that mark
    a pixel is the mean that L_cal calibrates."""
    log_p = sample_logits.float().log_softmax(dim=2)
    return -(log_p.exp() * log_p).sum(dim=2).mean()


def served_calibration_loss(sample_probs: Tensor, p_f: Tensor) -> Tensor:
    """Mean over pixels of the squared distance between the share of the n samples' argmax masks in
    each class and p_F: sample_probs (B, n, C, H, W) float32 softmax (the caller has it for D
    already), p_f (B, C, H, W) detached by the caller.

    L_cal holds the mean of the *soft* samples to p_F, but a user gets each sample's argmax: on cells'
    faint membranes G met L_cal with every sample near p_F (entropy 0.61-0.71 nats), so the masks
    served the majority reading (p_F 0.19 -> 0.04 of masks). This term measures the masks: its value
    is the argmax share's, its gradient passes to the soft samples (straight-through), and where a
    sample is saturated the softmax gives it none, so certain pixels stay as they are. Squared rather
    than KL: a share of 0 or 1 out of n is common and finite here, and the gradient, 2 (share - p_F),
    is zero in expectation at a calibrated sampler whatever n is (KL of an n-sample mean is not)."""
    hard = nnf.one_hot(sample_probs.argmax(dim=2), sample_probs.shape[2]).movedim(-1, 2).to(sample_probs.dtype)
    share = (hard + sample_probs - sample_probs.detach()).mean(dim=1)  # (B, C, H, W)
    return (share - p_f).pow(2).sum(dim=1).mean()


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
