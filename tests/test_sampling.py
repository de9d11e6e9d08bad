import numpy as np
import pytest
import torch

from training.networks import CalibrationConfig, CalibrationNet, RefinementConfig, RefinementNet
from training.sampling import Normalisation, noise, sample


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    f = CalibrationNet(CalibrationConfig(1, 3, widths=(8, 16, 16))).eval()
    g = RefinementNet(RefinementConfig(1, 3, widths=(8, 16, 16), noise_dim=4)).eval()
    torch.nn.init.normal_(g.head.weight)  # an untrained G with the prior skip ignores z
    return f, g


def test_output_shapes_and_odd_sizes_are_cropped_back(nets):
    f, g = nets
    out = sample(f, g, torch.randn(2, 1, 21, 30), k=5, seeds=[1, 2], decode_batch=3)
    assert out.labels.shape == (2, 5, 21, 30)
    assert out.probabilities.shape == (2, 5, 3, 21, 30)
    assert out.mean.shape == out.p_f.shape == (2, 3, 21, 30)
    for m in (out.aleatoric_entropy, out.sample_entropy, out.mutual_information, out.sample_variance):
        assert m.shape == (2, 21, 30)
    assert torch.allclose(out.p_f.sum(1), torch.ones(2, 21, 30), atol=1e-5)
    assert (out.mutual_information >= 0).all()
    assert (out.sample_entropy <= np.log(3) + 1e-5).all()


def test_same_seed_same_samples_alone_or_in_a_batch(nets):
    f, g = nets
    torch.manual_seed(1)
    x = torch.randn(3, 1, 16, 16)
    alone = sample(f, g, x[1:2], k=4, seeds=[42])
    batched = sample(f, g, x, k=4, seeds=[7, 42, 9], decode_batch=5)
    assert torch.equal(alone.labels[0], batched.labels[1])
    assert torch.allclose(alone.probabilities[0], batched.probabilities[1], atol=1e-5)
    other = sample(f, g, x[1:2], k=4, seeds=[43])
    assert not torch.allclose(alone.probabilities, other.probabilities)


def test_noise_depends_only_on_seed():
    assert torch.equal(noise(5, 3, 8), noise(5, 3, 8))
    assert torch.equal(noise(5, 3, 8)[:2], noise(5, 2, 8))  # k more samples extend, not reshuffle


def test_bad_arguments_raise(nets):
    f, g = nets
    with pytest.raises(ValueError, match="seeds"):
        sample(f, g, torch.randn(2, 1, 8, 8), k=2, seeds=[1])
    with pytest.raises(ValueError, match="k must be"):
        sample(f, g, torch.randn(1, 1, 8, 8), k=0, seeds=[1])


def test_normalisation_by_dtype():
    norm = Normalisation()
    assert norm.apply(np.array([[[0], [255]]], np.uint8)).ravel().tolist() == [-1.0, 1.0]
    assert norm.apply(np.array([[[0], [65535]]], np.uint16)).ravel().tolist() == [-1.0, 1.0]
    assert norm.apply(np.array([[[0.5]]], np.float32)).ravel().tolist() == [0.0]
    assert norm.apply(np.zeros((4, 5, 3), np.uint8)).shape == (3, 4, 5)
