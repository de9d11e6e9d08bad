import numpy as np
import pytest
import torch

from training import noise_field
from training.manifest import Normalisation
from training.networks import CalibrationConfig, CalibrationNet, RefinementConfig, RefinementNet
from training.sampling import (
    ALEATORIC_ENTROPY,
    LABELS,
    MEAN,
    MUTUAL_INFORMATION,
    OUTPUTS,
    P_F,
    SAMPLE_ENTROPY,
    SAMPLE_VARIANCE,
    Networks,
    entropy,
    noise,
    region_vectors,
    sample,
)


@pytest.fixture(scope="module", params=["global", "regions"])
def nets(request):
    torch.manual_seed(0)
    f = CalibrationNet(CalibrationConfig(1, 3, widths=(8, 16, 16))).eval()
    g = RefinementNet(RefinementConfig(1, 3, widths=(8, 16, 16), noise_dim=4, noise=request.param)).eval()
    torch.nn.init.normal_(g.head.weight)  # an untrained G with the prior skip ignores z
    return Networks(f, g, Normalisation())


def soft_samples(nets, image, k, seed):
    """The soft samples the sampler folds away, computed the plain way: (k, C, H, W)."""
    config = nets.refinement.config
    with torch.inference_mode():
        p_f = nets.calibration(image).softmax(1)
        z = noise(seed, k, config.noise_dim)
        if config.noise == "regions":
            labels, counts = noise_field.doubt_regions(p_f, config.doubt_threshold, config.region_grow)
            z = noise_field.field(labels.repeat(k, 1, 1), region_vectors(z, counts * k))
        return nets.refinement(image, p_f, z[None])[0].softmax(1)


def test_output_shapes_and_odd_sizes_are_cropped_back(nets):
    out = sample(nets, torch.randn(2, 1, 21, 30), ks=[5, 2], seeds=[1, 2], decode_batch=3)
    assert [o[LABELS].shape for o in out] == [(5, 21, 30), (2, 21, 30)] and out[0][LABELS].dtype == torch.uint8
    for o in out:
        assert o[P_F].shape == o[MEAN].shape == (3, 21, 30)
        for name in (ALEATORIC_ENTROPY, SAMPLE_ENTROPY, MUTUAL_INFORMATION, SAMPLE_VARIANCE):
            assert o[name].shape == (21, 30)
        assert torch.allclose(o[P_F].sum(0), torch.ones(21, 30), atol=1e-5)


def test_running_sums_give_the_maps_of_the_soft_samples(nets):
    # the sampler keeps no soft sample; its maps must equal those computed from all of them at once
    torch.manual_seed(3)
    image = torch.randn(1, 1, 16, 16)
    out = sample(nets, image, ks=[6], seeds=[11], decode_batch=4)[0]  # chunks of 4 + 2 samples
    probs = soft_samples(nets, image, 6, 11)
    mean = probs.mean(0)
    assert torch.equal(out[LABELS], probs.argmax(1).to(torch.uint8))
    assert torch.allclose(out[MEAN], mean, atol=1e-6)
    assert torch.allclose(out[SAMPLE_ENTROPY], entropy(mean, 0), atol=1e-5)
    assert torch.allclose(out[MUTUAL_INFORMATION], (entropy(mean, 0) - entropy(probs, 1).mean(0)).clamp_min(0), atol=1e-5)
    assert torch.allclose(out[SAMPLE_VARIANCE], probs.var(0, unbiased=False).sum(0), atol=1e-5)
    assert torch.allclose(out[ALEATORIC_ENTROPY], entropy(out[P_F], 0), atol=1e-6)


def test_only_the_outputs_asked_for_are_returned(nets):
    out = sample(nets, torch.randn(2, 1, 16, 16), ks=[2, 3], seeds=[1, 2], outputs=[LABELS])
    assert [set(o) for o in out] == [{LABELS}, {LABELS}]
    out = sample(nets, torch.randn(1, 1, 16, 16), ks=[2], seeds=[1], outputs=[SAMPLE_VARIANCE, P_F])
    assert set(out[0]) == {SAMPLE_VARIANCE, P_F}
    with pytest.raises(ValueError, match="unknown outputs"):
        sample(nets, torch.randn(1, 1, 8, 8), ks=[1], seeds=[1], outputs=["masks"])


def test_same_seed_same_samples_alone_or_in_a_batch_with_other_ks(nets):
    torch.manual_seed(1)
    x = torch.randn(3, 1, 16, 16)
    alone = sample(nets, x[1:2], ks=[4], seeds=[42])[0]
    batched = sample(nets, x, ks=[7, 4, 1], seeds=[7, 42, 9], decode_batch=5)[1]
    assert torch.equal(alone[LABELS], batched[LABELS])
    assert torch.allclose(alone[SAMPLE_ENTROPY], batched[SAMPLE_ENTROPY], atol=1e-5)
    other = sample(nets, x[1:2], ks=[4], seeds=[43])[0]
    assert not torch.allclose(alone[MEAN], other[MEAN])


def test_more_samples_extend_fewer(nets):
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(sample(nets, x, ks=[6], seeds=[5])[0][LABELS][:3], sample(nets, x, ks=[3], seeds=[5])[0][LABELS])


def test_noise_depends_only_on_seed():
    assert torch.equal(noise(5, 3, 8), noise(5, 3, 8))
    assert torch.equal(noise(5, 3, 8)[:2], noise(5, 2, 8))  # k more samples extend, not reshuffle


def test_bad_arguments_raise(nets):
    with pytest.raises(ValueError, match="seeds"):
        sample(nets, torch.randn(2, 1, 8, 8), ks=[2, 2], seeds=[1])
    with pytest.raises(ValueError, match="k must be"):
        sample(nets, torch.randn(1, 1, 8, 8), ks=[0], seeds=[1])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sample(nets, torch.randn(1, 8, 8), ks=[1], seeds=[1])


def test_prepare_normalises_and_stacks(nets):
    batch = nets.prepare([np.zeros((4, 5, 1), np.uint8), np.full((4, 5, 1), 65535, np.uint16)])
    assert batch.shape == (2, 1, 4, 5) and batch[0].max() == -1.0 and batch[1].min() == 1.0


def test_normalisation_by_dtype():
    norm = Normalisation()
    assert norm.apply(np.array([[[0], [255]]], np.uint8)).ravel().tolist() == [-1.0, 1.0]
    assert norm.apply(np.array([[[0], [65535]]], np.uint16)).ravel().tolist() == [-1.0, 1.0]
    assert norm.apply(np.array([[[0.5]]], np.float32)).ravel().tolist() == [0.0]
    assert norm.apply(np.zeros((4, 5, 3), np.uint8)).shape == (3, 4, 5)


def test_service_outputs_are_sampler_outputs():
    from service.jobs import Output

    assert {str(o) for o in Output} <= set(OUTPUTS)


def test_chunked_variance_is_exact_where_the_textbook_formula_cancels():
    # 64 confident samples, p within 1e-4 of 1: E[p^2] - E[p]^2 in float32 loses every digit of a
    # variance of ~1e-9; merging chunk statistics (Chan et al.) keeps it
    from training.sampling import _Stats

    p = 1 - 1e-4 * torch.rand(64, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = torch.cat([p, 1 - p], dim=1).log().float()  # (64, 2, 3, 3); the stats take logits
    probs = logits.double().softmax(dim=1)  # the soft samples those float32 logits stand for, exactly
    stats = _Stats({SAMPLE_VARIANCE, MEAN}, [64], 2, 3, 3, torch.device("cpu"))
    for start in range(0, 64, 5):
        stats.add(start, logits[start : start + 5])
    reference = probs.var(dim=0, unbiased=False).sum(dim=0)
    assert torch.allclose(stats.m2[0].sum(0).double() / 64, reference, rtol=1e-3, atol=0)
    assert torch.allclose(stats.mean[0].double(), probs.mean(0), atol=1e-7)


def test_an_f_that_sees_position_is_told_the_images_own_size_not_the_padded_one():
    from training.networks import whole_images

    f = CalibrationNet(CalibrationConfig(1, 2, widths=(8, 16, 16), position=True)).eval()
    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16, 16), noise_dim=4)).eval()
    networks = Networks(f, g, Normalisation())
    image = torch.randn(1, 1, 30, 30)  # padded to 32 for the stride of 4
    got = sample(networks, image, [2], [0], (P_F,))[0][P_F]
    padded = torch.nn.functional.pad(image, (0, 2, 0, 2), mode="replicate")
    with torch.inference_mode():
        told = f(padded, whole_images(1, 30, 30)).softmax(1)[0, :, :30, :30]
        padded_size = f(padded).softmax(1)[0, :, :30, :30]
    assert torch.allclose(got, told, atol=1e-6) and not torch.allclose(got, padded_size, atol=1e-3)
