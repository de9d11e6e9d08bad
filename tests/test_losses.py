import math

import pytest
import torch

from training import losses
from training.networks import Discriminator, DiscriminatorConfig, soft_one_hot


def test_calibration_loss_zero_when_sample_mean_equals_p_f():
    p_f = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    samples = p_f.log()[:, None].expand(1, 5, 2, 4, 4)  # logits whose softmax is p_F
    assert losses.calibration_loss(samples, p_f).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.calibration_loss(samples, p_f, forward_weight=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_calibration_loss_hand_value():
    p_f = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    # two samples, one at (0.9, 0.1) and one at (0.5, 0.5): their mean is (0.7, 0.3)
    logits = torch.tensor([[math.log(0.9), math.log(0.1)], [0.0, 0.0]]).view(1, 2, 2, 1, 1)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert losses.calibration_loss(logits, p_f).item() == pytest.approx(expected, rel=1e-5)
    forward = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert losses.calibration_loss(logits, p_f, 2.0).item() == pytest.approx(expected + 2 * forward, rel=1e-5)


def test_calibration_loss_still_pulls_when_the_samples_saturate():
    """p_F (0.3, 0.7) against samples all at 0.9997 for class 1: the clamped version had gradient 0
    (its sample mean sat on the clamp), so G could never bring back the reading it had dropped."""
    p_f = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1)
    logits = torch.tensor([-4.0, 4.11]).view(1, 1, 2, 1, 1).repeat(1, 4, 1, 1, 1).requires_grad_(True)
    assert logits.softmax(dim=2)[0, 0, 1].item() == pytest.approx(0.9997, abs=1e-4)
    loss = losses.calibration_loss(logits, p_f, forward_weight=1.0)
    assert loss.item() > 1.0
    (grad,) = torch.autograd.grad(loss, logits)
    # descending the gradient raises class 0's logit against class 1's: the missing reading comes back
    assert (grad[0, :, 0] < -0.05).all() and (grad[0, :, 1] > 0.05).all()


def test_generator_adversarial_loss_non_saturating():
    assert losses.generator_adversarial_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))
    assert losses.generator_adversarial_loss(torch.full((4,), 10.0)).item() < 1e-3


def test_discriminator_loss_has_r1_and_accuracy():
    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig(1, 2, widths=(8, 8)))
    image = torch.randn(2, 1, 16, 16)
    real = soft_one_hot(torch.randint(0, 2, (2, 16, 16)), 2)
    fake = torch.rand(2, 2, 16, 16).softmax(1)
    without, _ = losses.discriminator_loss(disc, image, real, fake, 0.0)
    with_r1, _ = losses.discriminator_loss(disc, image, real, fake, 0.625)
    assert with_r1.item() > without.item()
    with_r1.backward()  # R1 is differentiable (create_graph)
    assert all(p.grad is not None for p in disc.parameters())


class ForegroundScore(torch.nn.Module):
    """A discriminator that calls a mask real when most of it is foreground: logit 10 * (share - 1/2)."""

    def forward(self, image, mask):
        return 10 * (mask[:, 1].mean(dim=(1, 2)) - 0.5)


def test_discriminator_accuracy_and_loss_hand_computed():
    image = torch.zeros(2, 1, 4, 4)
    real = soft_one_hot(torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]).long(), 2)  # scored +5 (right), -5 (wrong)
    fake = soft_one_hot(torch.zeros(2, 4, 4).long(), 2)  # both scored -5: both right
    loss, accuracy = losses.discriminator_loss(ForegroundScore(), image, real, fake, 0.0)
    assert accuracy.item() == pytest.approx((1 / 2 + 1) / 2)
    softplus = torch.nn.functional.softplus
    expected = (softplus(torch.tensor(-5.0)) + softplus(torch.tensor(5.0))) / 2 + softplus(torch.tensor(-5.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)



def _expected_argmin(p: float, forward_weight: float, n: int = 8) -> float:
    """Where the expected L_cal of n saturated samples, each marking the pixel with probability f,
    is lowest over f (exactly, over the binomial count of marking samples)."""
    from scipy.stats import binom

    p_f = torch.tensor([1 - p, p]).view(1, 2, 1, 1)
    values = []
    for marked in range(n + 1):
        logits = torch.zeros(1, n, 2, 1, 1)
        logits[0, :marked, 1] = 9.0
        logits[0, marked:, 0] = 9.0
        values.append(losses.calibration_loss(logits, p_f, forward_weight).item())
    grid = [i / 400 for i in range(401)]
    return min(grid, key=lambda f: sum(binom.pmf(m, n, f) * v for m, v in enumerate(values)))


@pytest.mark.parametrize(("p", "biased"), [(0.25, 0.33), (0.75, 0.67)])
def test_the_forward_kl_pulls_saturated_shares_towards_a_half_and_the_reverse_kl_does_not(p, biased):
    # why cal_forward_weight is 0: cells' mixed cells of p_F 0.25 / 0.75 were served at 0.32 / 0.69 with it
    assert _expected_argmin(p, 1.0) == pytest.approx(biased, abs=0.011)
    assert _expected_argmin(p, 0.0) == pytest.approx(p, abs=0.011)


@pytest.mark.parametrize(("n", "share"), [(8, 0.005), (16, 0.0425), (32, 0.05)])
def test_the_reverse_kl_drops_a_rare_reading_unless_it_has_many_samples(n, share):
    # the paper's L_cal is mode-seeking for saturated samples: at n = 8 (ours) a reading of p_F 0.05 is
    # best served in 0.5% of samples; cells_rare's G served its 0.05 cells in 0.9-1.4% (README)
    assert _expected_argmin(0.05, 0.0, n) == pytest.approx(share, abs=0.006)
