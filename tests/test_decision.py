"""How a soft sample becomes a label map: argmax, or rounding by one uniform per region of doubt."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.test_noise_field import FixedF, _ReaderConfig, two_blobs
from training.manifest import Normalisation
from training.networks import RefinementConfig
from training.sampling import ARGMAX, LABELS, ROUNDING, MemoryModel, Networks, decide, region_thresholds, sample


def logits_of(probs: list[float]) -> Tensor:
    """One pixel's logits (1, C, 1, 1) of the class probabilities ``probs``."""
    return torch.tensor(probs).log()[None, :, None, None]


def test_decide_cuts_the_cumulative_probabilities_at_the_uniform_and_keeps_the_argmax_where_negative():
    two = logits_of([0.7, 0.3])  # class 1 at 0.3: marked exactly when u falls above p(class 0)
    assert [bool(decide(two, torch.full((1, 1, 1), u))) for u in (0.2, 0.69, 0.71, 0.95)] == [False, False, True, True]
    assert not decide(two, torch.full((1, 1, 1), -1.0)).any()  # the argmax: background
    assert not decide(two, None).any()
    three = logits_of([0.2, 0.5, 0.3])
    assert [int(decide(three, torch.full((1, 1, 1), u))) for u in (0.1, 0.6, 0.75, 0.9)] == [0, 1, 2, 2]
    assert int(decide(three, torch.full((1, 1, 1), -1.0))) == 1 == int(decide(three, None))


class SoftG(nn.Module):
    """G's slot: whatever the noise, the same soft sample, class 1 at ``q`` where F doubts and
    0.001 elsewhere: a G that met L_cal by staying soft, as cells' G did on the faint membranes."""

    def __init__(self, q: float, noise_kind: str = "regions") -> None:
        super().__init__()
        self.config = _ReaderConfig(noise=noise_kind)
        self.q = q

    def encode(self, image: Tensor, p_f: Tensor) -> list[Tensor]:
        return [p_f]

    def decode(self, feats: list[Tensor], z: Tensor) -> Tensor:
        p_f = feats[0]
        p1 = torch.where(p_f[:, 1] > 0.01, self.q, 0.001)
        return torch.stack([1 - p1, p1], dim=1).log()


def blob_decisions(decision: str, noise_kind: str = "regions", k: int = 400) -> np.ndarray:
    nets = Networks(FixedF(two_blobs()), SoftG(0.3, noise_kind), Normalisation(), decision_override=decision)
    labels = sample(nets, torch.zeros(1, 1, 32, 32), [k], [3], outputs=(LABELS,), decode_batch=64)[0][LABELS].numpy()
    blob_a, blob_b = labels[:, 6:11, 6:11], labels[:, 22:27, 22:27]
    return np.stack([blob_a.reshape(k, -1), blob_b.reshape(k, -1)])  # (2 blobs, k, pixels)


def test_argmax_never_serves_the_minority_reading_of_a_soft_sample():
    assert not blob_decisions(ARGMAX).any()  # soft samples at 0.3 meet L_cal, and no mask marks a blob


def test_rounding_serves_a_soft_sample_at_its_probability_each_region_whole_and_independent():
    blobs = blob_decisions(ROUNDING)
    assert (blobs.min(axis=2) == blobs.max(axis=2)).all()  # each blob marked whole or not at all
    a, b = blobs[0, :, 0].astype(float), blobs[1, :, 0].astype(float)
    assert abs(a.mean() - 0.3) < 0.07 and abs(b.mean() - 0.3) < 0.07  # 400 samples: SD 0.023
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.15  # 400 samples: |r| of independent draws is ~0.05
    sure = sample(
        Networks(FixedF(two_blobs()), SoftG(0.3), Normalisation(), decision_override=ROUNDING),
        torch.zeros(1, 1, 32, 32), [64], [3], outputs=(LABELS,),
    )[0][LABELS]
    assert not sure[:, 0, 31].any() and not sure[:, 16, 16].any()  # F's sure pixels keep the argmax


def test_rounding_with_global_noise_decides_every_region_with_one_uniform():
    blobs = blob_decisions(ROUNDING, noise_kind="global")
    a, b = blobs[0, :, 0], blobs[1, :, 0]
    assert 0.2 < a.mean() < 0.4 and np.array_equal(a, b)  # the regions are coupled, as G's noise couples them


def test_the_roundings_uniforms_depend_on_the_image_seed_and_sample_index_alone():
    nets = Networks(FixedF(two_blobs()), SoftG(0.5), Normalisation(), decision_override=ROUNDING)
    x = torch.zeros(2, 1, 32, 32)
    alone = sample(nets, x[:1], [24], [9], outputs=(LABELS,))[0][LABELS]
    fewer = sample(nets, x[:1], [10], [9], outputs=(LABELS,))[0][LABELS]
    batched = sample(nets, x, [5, 24], [1, 9], outputs=(LABELS,), decode_batch=7)[1][LABELS]
    assert torch.equal(alone[:10], fewer) and torch.equal(alone, batched)
    assert 0 < alone[:, 8, 8].float().mean() < 1
    table = region_thresholds(torch.randn(3, 4), [2, 0, 1], per_region=True)
    assert table.shape == (3, 3) and (table[:, 0] == -1).all() and (table[1] == -1).all()
    assert ((table[0, 1:] >= 0) & (table[0, 1:] < 1)).all() and table[0, 1] != table[0, 2]


def test_the_decision_is_the_models_own_unless_overridden_and_checked():
    f, g = FixedF(two_blobs()), SoftG(0.3)
    assert Networks(f, g, Normalisation()).decision == ARGMAX  # a config without the field: argmax
    assert Networks(f, g, Normalisation(), decision_override=ROUNDING).decision == ROUNDING
    with pytest.raises(ValueError, match="decision"):
        _ = Networks(f, g, Normalisation(), decision_override="vote").decision
    with pytest.raises(ValueError, match="decision"):
        RefinementConfig(1, 2, decision="vote")
    config = RefinementConfig(1, 2)
    assert replace(config, decision=ROUNDING).decision == ROUNDING


def test_the_memory_model_counts_the_roundings_maps():
    from training.networks import RefinementNet

    g = RefinementNet(RefinementConfig(1, 2, widths=(8, 16), noise="regions")).eval()
    nets = Networks(FixedF(two_blobs()), g, Normalisation())
    argmax, rounding = MemoryModel.of(nets), MemoryModel.of(replace(nets, decision_override=ROUNDING))
    assert rounding.per_sample > argmax.per_sample and rounding.per_image > argmax.per_image
