"""Noise per region of doubt: distant ambiguities sampled independently, each one whole."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from training import noise_field
from training.manifest import Normalisation
from training.networks import RefinementConfig, RefinementNet
from training.sampling import LABELS, Networks, noise, region_vectors, sample


def two_blobs(size: int = 32) -> Tensor:
    """p_F (1, 2, H, W): sure background with two discs of doubt (p = 0.5) far apart."""
    yy, xx = np.mgrid[0:size, 0:size]
    doubt = (np.hypot(yy - 8, xx - 8) < 4) | (np.hypot(yy - 24, xx - 24) < 4)
    p1 = np.where(doubt, 0.5, 0.001).astype(np.float32)
    return torch.from_numpy(np.stack([1 - p1, p1]))[None]


def test_regions_are_the_connected_areas_of_doubt_and_growing_joins_pieces():
    p_f = two_blobs()
    labels, counts = noise_field.doubt_regions(p_f)
    assert counts == [2]
    assert labels[0, 8, 8] != labels[0, 24, 24] and labels[0, 8, 8] > 0 and labels[0, 0, 31] == 0
    split = torch.full((1, 2, 16, 16), 0.5)
    split[:, 0, :, 7] = 1.0  # one sure column cuts one region of doubt in two ...
    split[:, 1, :, 7] = 0.0
    assert noise_field.doubt_regions(split, grow=0)[1] == [2]
    assert noise_field.doubt_regions(split, grow=1)[1] == [1]  # ... which growing joins again


def test_field_puts_each_regions_vector_on_its_pixels_and_zero_where_sure():
    labels = torch.tensor([[[0, 1], [2, 2]]])
    vectors = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]]])
    out = noise_field.field(labels, vectors)
    assert out.shape == (1, 2, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0]
    assert out[0, :, 0, 1].tolist() == [1.0, 2.0]
    assert out[0, :, 1, 0].tolist() == out[0, :, 1, 1].tolist() == [3.0, 4.0]


def test_region_noise_gives_g_the_logits_of_the_full_noise_map():
    # the sampler's projection per region must be what pooling the map and projecting it gives, at
    # every stage, for a chunk of one image's samples (its shares broadcast) and of two images'
    torch.manual_seed(0)
    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16, 16), noise_dim=4, noise="regions")).eval()
    torch.nn.init.normal_(g.head.weight)
    x, p = torch.randn(2, 1, 32, 32), torch.cat([two_blobs(), two_blobs().flip(-1)])
    labels, counts = noise_field.doubt_regions(p, grow=0)
    assert counts == [2, 2]
    rows = torch.tensor([0, 0, 1, 1, 1])
    vectors = region_vectors(torch.randn(5, 4), [counts[i] for i in rows.tolist()])
    shared = g.share(g.encode(x, p))
    shares = noise_field.RegionShares(labels, vectors.shape[1] - 1)
    with torch.inference_mode():
        expected = g.decode_shared(shared, lambda t: t[rows], noise_field.field(labels[rows], vectors))
        mixed = g.decode_shared(shared, lambda t: t[rows], noise_field.RegionNoise(shares, lambda t: t[rows], vectors))
        one = g.decode_shared(shared, lambda t: t[1:2], noise_field.RegionNoise(shares, lambda t: t[1:2], vectors[2:]))
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, expected[2:], atol=1e-5, rtol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the noise reaches the logits


def test_the_sampler_gives_the_masks_of_the_full_noise_map(monkeypatch):
    # the sampler projects per region (it builds no map: ``field`` fails if called) and its masks
    # are those of G run the plain way on each sample's full noise map
    torch.manual_seed(0)
    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16, 16), noise_dim=4, noise="regions")).eval()
    torch.nn.init.normal_(g.head.weight, std=3.0)
    p_f, x, k = two_blobs(), torch.randn(1, 1, 32, 32), 16
    labels, counts = noise_field.doubt_regions(p_f)
    maps = noise_field.field(labels.repeat(k, 1, 1), region_vectors(noise(5, k, 4), counts * k))
    with torch.inference_mode():
        expected = g(x, p_f, maps[None])[0].argmax(1)
    monkeypatch.setattr(noise_field, "field", None)
    masks = sample(Networks(FixedF(p_f), g, Normalisation()), x, ks=[k], seeds=[5], outputs=[LABELS])[0][LABELS]
    assert torch.equal(masks.long(), expected)
    assert 0 < masks[:, 8, 8].float().mean() < 1  # the samples differ where F doubts


def test_an_image_without_doubt_is_sampled_from_the_bias_alone(monkeypatch):
    # no region: every pixel gets the injections' bias, as an all-zero noise map gives
    torch.manual_seed(0)
    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16, 16), noise_dim=4, noise="regions", doubt_threshold=0.5)).eval()
    torch.nn.init.normal_(g.head.weight, std=3.0)  # the prior skip's zero head would hide the noise path
    sure = torch.stack([torch.full((32, 32), 0.6), torch.full((32, 32), 0.4)])[None]
    x = torch.randn(1, 1, 32, 32)
    assert noise_field.doubt_regions(sure, threshold=0.5)[1] == [0]
    with torch.inference_mode():
        expected = g(x, sure, torch.zeros(1, 3, 4, 32, 32))[0].argmax(1)
    monkeypatch.setattr(noise_field, "field", None)
    masks = sample(Networks(FixedF(sure), g, Normalisation()), x, ks=[3], seeds=[1], outputs=[LABELS])[0][LABELS]
    assert torch.equal(masks.long(), expected)
    assert expected.any()  # G's head decides: the prior alone gives background everywhere


def test_region_one_is_the_samples_own_z_and_further_regions_depend_on_it_alone():
    z = noise(7, 3, 4)
    table = region_vectors(z, [2, 0, 3])
    assert torch.equal(table[0, 1], z[0]) and torch.equal(table[2, 1], z[2])
    assert not table[1].any()  # no region: nothing drawn
    again = region_vectors(z[2:], [3])
    assert torch.equal(again[0], table[2])  # the same sample's vectors, whatever else is in the call


@dataclass(frozen=True)
class _ReaderConfig:
    num_classes: int = 2
    noise_dim: int = 4
    stride: int = 1
    widths: tuple[int, ...] = (1,)
    noise: str = "regions"
    doubt_threshold: float = 0.05
    region_grow: int = 2


class NoiseReader(nn.Module):
    """G's slot: marks class 1 wherever its noise's first component is positive, so the samples
    show exactly how the sampler laid out the noise."""

    def __init__(self, noise_kind: str) -> None:
        super().__init__()
        self.config = _ReaderConfig(noise=noise_kind)

    def encode(self, image: Tensor, p_f: Tensor) -> list[Tensor]:
        return [p_f]

    def decode(self, feats: list[Tensor], z: Tensor) -> Tensor:
        p_f = feats[0]
        first = z[:, 0] if z.ndim == 4 else z[:, :1, None].expand(-1, *p_f.shape[-2:])
        mark = (first > 0) & (p_f[:, 1] > 0.01)
        return torch.stack([~mark, mark], dim=1).float() * 30.0


class FixedF(nn.Module):
    def __init__(self, p_f: Tensor) -> None:
        super().__init__()
        self.config = _ReaderConfig()
        self.logits = p_f.log()

    def forward(self, image: Tensor) -> Tensor:
        return self.logits.expand(image.shape[0], -1, -1, -1)


def decisions(noise_kind: str, k: int = 400) -> np.ndarray:
    p_f = two_blobs()
    nets = Networks(FixedF(p_f), NoiseReader(noise_kind), Normalisation())
    labels = sample(nets, torch.zeros(1, 1, 32, 32), [k], [3], outputs=(LABELS,), decode_batch=64)[0][LABELS].numpy()
    blob_a, blob_b = labels[:, 6:11, 6:11], labels[:, 22:27, 22:27]
    return np.stack([blob_a.reshape(k, -1), blob_b.reshape(k, -1)])  # (2 blobs, k, pixels)


def test_two_regions_of_doubt_are_sampled_independently_and_each_whole():
    blobs = decisions("regions")
    assert (blobs.min(axis=2) == blobs.max(axis=2)).all()  # every sample takes each blob whole or not at all
    a, b = blobs[0, :, 0].astype(float), blobs[1, :, 0].astype(float)
    assert 0.4 < a.mean() < 0.6 and 0.4 < b.mean() < 0.6
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.15  # 400 samples: |r| of independent draws is ~0.05


def test_global_noise_decides_both_regions_together():
    blobs = decisions("global")
    assert np.corrcoef(blobs[0, :, 0], blobs[1, :, 0])[0, 1] > 0.99


def test_a_regions_g_reads_noise_maps_in_training_and_sampling_alike():
    torch.manual_seed(0)
    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16), noise_dim=4, noise="regions")).eval()
    torch.nn.init.normal_(g.head.weight)  # the prior skip starts the head at zero, which ignores z
    p_f = two_blobs()
    labels, counts = noise_field.doubt_regions(p_f)
    maps = noise_field.training_noise(labels, counts, n=3, noise_dim=4)
    assert maps.shape == (1, 3, 4, 32, 32)
    assert not maps[0, :, :, 0, 31].any()  # sure pixels carry no noise
    out = g(torch.zeros(1, 1, 32, 32), p_f, maps)
    assert out.shape == (1, 3, 2, 32, 32)
    assert not torch.allclose(out[0, 0], out[0, 1])
