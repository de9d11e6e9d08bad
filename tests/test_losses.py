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


def test_sample_entropy_is_zero_for_committed_samples_and_log_c_for_uniform_ones():
    committed = torch.tensor([-30.0, 30.0]).view(1, 1, 2, 1, 1).repeat(1, 3, 1, 2, 2)
    assert losses.sample_entropy(committed).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.sample_entropy(torch.zeros(2, 3, 4, 5, 5)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_soft_samples_meet_l_cal_but_the_entropy_makes_them_commit():
    """Eight samples all at (0.4, 0.6) meet L_cal against p_F (0.4, 0.6) exactly, yet every one's
    argmax is class 1: the served masks mark the pixel 8 times in 8, not 0.6. The entropy's
    gradient moves each sample away from the middle, towards the class it leans to."""
    p_f = torch.tensor([0.4, 0.6]).view(1, 2, 1, 1)
    logits = p_f.log()[:, None].repeat(1, 8, 1, 1, 1).requires_grad_(True)
    assert losses.calibration_loss(logits, p_f, forward_weight=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert (logits.argmax(dim=2) == 1).all()
    (grad,) = torch.autograd.grad(losses.sample_entropy(logits), logits)
    # descending it widens the lead of class 1 in every sample
    assert ((grad[0, :, 1] - grad[0, :, 0]) < -1e-3).all()


def test_served_calibration_loss_hand_value_and_zero_at_a_calibrated_share():
    """Value: the argmax masks' share against p_F, squared and summed over classes. Three of four
    samples mark the pixel where p_F says 0.75: zero; p_F 0.5 there: 2 * 0.25^2."""
    logits = torch.tensor([[-5.0, 5.0], [-5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]]).view(1, 4, 2, 1, 1)
    assert losses.served_calibration_loss(logits.softmax(2), torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    assert losses.served_calibration_loss(logits.softmax(2), half).item() == pytest.approx(2 * 0.25**2, rel=1e-5)


def test_served_calibration_pulls_soft_samples_that_meet_l_cal_towards_the_minority_reading():
    """The cells failure: eight samples at (0.6, 0.4) against p_F (0.6, 0.4) meet L_cal, but none
    marks the pixel. The served term sees 0 masks of 8 against 0.4 and its gradient raises class 1
    in every sample (straight-through the softmax); a saturated pixel gets next to no gradient."""
    p_f = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
    logits = p_f.log()[:, None].repeat(1, 8, 1, 1, 1).requires_grad_(True)
    assert losses.calibration_loss(logits, p_f, forward_weight=1.0).item() == pytest.approx(0.0, abs=1e-6)
    served = losses.served_calibration_loss(logits.softmax(2), p_f)
    assert served.item() == pytest.approx(2 * 0.4**2, rel=1e-5)
    (grad,) = torch.autograd.grad(served, logits)
    assert ((grad[0, :, 1] - grad[0, :, 0]) < -1e-3).all()  # descending it raises class 1's lead

    saturated = torch.tensor([12.0, -12.0]).view(1, 1, 2, 1, 1).repeat(1, 8, 1, 1, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(losses.served_calibration_loss(saturated.softmax(2), p_f), saturated)
    assert grad.abs().max().item() < 1e-9


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
