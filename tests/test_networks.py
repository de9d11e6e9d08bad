import pytest
import torch

from training.networks import (
    ArchitectureConfig,
    CalibrationConfig,
    CalibrationNet,
    Discriminator,
    DiscriminatorConfig,
    RefinementConfig,
    RefinementNet,
    position_channels,
    whole_images,
)


@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 9)])
def test_shapes_for_any_channels_and_classes(channels, classes):
    f = CalibrationNet(CalibrationConfig(channels, classes, widths=(8, 16, 16)))
    g = RefinementNet(RefinementConfig(channels, classes, widths=(8, 16, 16), noise_dim=4))
    d = Discriminator(DiscriminatorConfig(channels, classes, widths=(8, 16)))
    x = torch.randn(2, channels, 24, 40)
    logits = f(x)
    assert logits.shape == (2, classes, 24, 40)
    samples = g(x, logits.softmax(1), torch.randn(2, 3, 4))
    assert samples.shape == (2, 3, classes, 24, 40)
    assert d(x, samples[:, 0].softmax(1)).shape == (2, 6, 10)  # one logit per patch


def test_noise_is_injected_at_three_or_more_decoder_stages_and_changes_the_output():
    g = RefinementNet(RefinementConfig(1, 2))
    assert len(g.inject) + 1 >= 3
    torch.nn.init.normal_(g.head.weight)  # the prior skip starts the head at zero
    g.eval()
    x, p = torch.randn(1, 1, 32, 32), torch.full((1, 2, 32, 32), 0.5)
    out = g(x, p, torch.randn(1, 2, g.config.noise_dim))
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_encode_once_decode_per_sample_equals_forward():
    torch.manual_seed(0)
    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16, 16))).eval()
    x, p = torch.randn(2, 1, 16, 16), torch.rand(2, 2, 16, 16).softmax(1)
    z = torch.randn(2, 3, g.config.noise_dim)
    feats = g.encode(x, p)
    manual = torch.stack([g.decode([f[i : i + 1].expand(3, -1, -1, -1) for f in feats], z[i]) for i in range(2)])
    assert torch.allclose(manual, g(x, p, z), atol=1e-5)


@pytest.mark.parametrize("noise", ["global", "regions"])
def test_the_samplers_shared_decode_equals_decode(noise):
    """Eval mode: the skip half of each up block's conv once per image, BatchNorm folded in, gives
    decode's logits up to float rounding, for a chunk of one image (broadcast) or of several."""
    torch.manual_seed(0)
    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16, 16), noise_dim=4))
    for module in g.modules():  # BatchNorm with statistics of its own, so folding it is tested
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            torch.nn.init.normal_(module.weight)
    torch.nn.init.normal_(g.head.weight)
    g.eval()
    x, p = torch.randn(2, 1, 16, 16), torch.rand(2, 2, 16, 16).softmax(1)
    feats = g.encode(x, p)
    shared = g.share(feats)
    rows = torch.tensor([0, 0, 1, 1, 1])
    z = torch.randn(5, 4) if noise == "global" else torch.randn(5, 4, 16, 16)
    expected = g.decode([f[rows] for f in feats], z)
    torch.testing.assert_close(g.decode_shared(shared, lambda t: t[rows], z), expected, atol=1e-5, rtol=1e-5)
    one = g.decode_shared(shared, lambda t: t[1:2], z[2:])  # one image's samples: its row broadcast
    torch.testing.assert_close(one, expected[2:], atol=1e-5, rtol=1e-5)


def test_prior_skip_starts_g_at_p_f():
    g = RefinementNet(RefinementConfig(1, 3, widths=(8, 16, 16))).eval()
    p = torch.rand(2, 3, 16, 16).softmax(1)
    out = g(torch.randn(2, 1, 16, 16), p, torch.randn(2, 4, g.config.noise_dim)).softmax(2)
    assert torch.allclose(out, p[:, None].expand_as(out), atol=1e-5)


def test_architecture_config_round_trip_and_unknown_keys():
    arch = ArchitectureConfig.default(1, 2)
    assert ArchitectureConfig.from_dict(arch.to_dict()) == arch
    bad = arch.to_dict()
    bad["refinement"]["colour"] = 1
    with pytest.raises(ValueError, match="colour"):
        ArchitectureConfig.from_dict(bad)


def test_position_channels_of_a_crop_are_the_whole_images_there():
    whole = position_channels(whole_images(1, 6, 10), 6, 10)[0]  # (2, 6, 10)
    assert whole[0, 0, 0] == pytest.approx(-5 / 6) and whole[0, -1, 0] == pytest.approx(5 / 6)  # pixel centres
    assert whole[1, 0, 0] == pytest.approx(-0.9) and whole[1, 0, -1] == pytest.approx(0.9)
    assert torch.equal(whole[0, :, 0], whole[0, :, 7]) and torch.equal(whole[1, 0], whole[1, 5])
    crop = position_channels(torch.tensor([[2.0, 3.0, 6.0, 10.0]]), 3, 4)[0]
    assert torch.allclose(crop, whole[:, 2:5, 3:7])


def test_an_f_with_position_takes_two_more_input_channels_and_its_window():
    f = CalibrationNet(CalibrationConfig(1, 2, widths=(8, 16), position=True))
    assert f.encoder.stem[0][0].in_channels == 3
    x = torch.randn(2, 1, 8, 8)
    f.eval()
    # a whole image by default; the same pixels told they are a crop elsewhere are judged otherwise
    assert torch.equal(f(x), f(x, whole_images(2, 8, 8)))
    assert not torch.allclose(f(x), f(x, torch.tensor([[8.0, 0.0, 16.0, 16.0]] * 2)))
    assert CalibrationNet(CalibrationConfig(1, 2, widths=(8, 16))).encoder.stem[0][0].in_channels == 1
