"""The baselines run through the one sampler and the one evaluation, and the metrics tell them
apart from CAR on data whose truth is known (the bundled halo model's F and G)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from training.baselines import BASELINES, baseline
from training.checkpoint import load_model
from training.data import open_dataset
from training.evaluate import evaluate
from training.sampling import LABELS, MEAN, P_F, sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def car():
    return load_model(REPO / "models" / "default").networks


@pytest.fixture(scope="module")
def halo():
    # cases 0-11 of the test split hold rims (p 0.3 / 0.7) and faint nodules (p 0.5)
    return open_dataset("synthetic:halo", "test", length=12)


def test_deterministic_baseline_has_no_randomness_and_fails_per_event(car, halo):
    result = evaluate(baseline(car, "deterministic"), halo, n_samples=16).summary
    assert result["diversity_16"] == 0.0
    # every event is in all samples or in none: its error is p or 1 - p, never under 0.3 here
    assert result["event_calibration_error"] >= 0.2
    assert result["event_calibration_error"] > 2 * result["event_calibration_floor"]


def test_independent_baseline_is_reproducible_and_incoherent(car, halo):
    networks = baseline(car, "independent")
    images = networks.prepare([halo[0].image, halo[1].image])
    alone = sample(networks, images[:1], [8], [5], (LABELS,))[0][LABELS]
    batched = sample(networks, images, [8, 3], [5, 9], (LABELS,), decode_batch=3)[0][LABELS]
    assert torch.equal(alone, batched)
    out = sample(networks, images[:1], [64], [1], (LABELS, MEAN, P_F))[0]
    # the share of samples with each label at a pixel is p_F there, up to sampling noise
    assert (out[MEAN] - out[P_F]).abs().max() < 0.25
    independent = evaluate(networks, halo, n_samples=16).summary
    ours = evaluate(car, halo, n_samples=16).summary
    assert independent["coherence"] < ours["coherence"]


def test_unknown_baseline_is_refused(car):
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline(car, "oracle")
    assert set(BASELINES) == {"independent", "deterministic"}


def test_ged_16_is_the_same_with_or_without_the_large_sample(car, halo):
    few = open_dataset("synthetic:halo", "test", length=2)
    small = evaluate(car, few, n_samples=4).summary
    large = evaluate(car, few, n_samples=4, n_large=10).summary
    assert small["ged_4"] == pytest.approx(large["ged_4"])
    assert "ged_10" in large and np.isfinite(large["ged_10"])


def test_per_kind_p_f_is_fs_own_and_says_whose_the_error_is(car, halo):
    # two samplers on one F: the same p_F per kind, whatever their samples do with it
    ours = evaluate(car, halo, n_samples=16)
    deterministic = evaluate(baseline(car, "deterministic"), halo, n_samples=16)
    expected: dict[str, list[float]] = {}
    for case in halo:
        p_f = sample(car, car.prepare([case.image]), [1], [0], (P_F,))[0][P_F].numpy()
        for event in case.truth.events:
            expected.setdefault(event.kind, []).append(float(p_f[event.on_label][event.region].mean()))
    assert set(ours.per_kind) == set(expected)
    for kind, row in ours.per_kind.items():
        assert row["p_f"] == pytest.approx(np.mean(expected[kind]), abs=1e-6)
        assert deterministic.per_kind[kind]["p_f"] == pytest.approx(row["p_f"], abs=1e-6)
    errors = [abs(row["p_f"] - row["true"]) for row in ours.per_kind.values()]
    assert ours.summary["calibration_error_p_f"] == pytest.approx(np.mean(errors))
    assert deterministic.summary["calibration_error_p_f"] == pytest.approx(ours.summary["calibration_error_p_f"])
    # the deterministic sampler's events are all or nothing: far from F's probabilities, so its error is G's part
    assert deterministic.summary["calibration_error"] > ours.summary["calibration_error_p_f"] + 0.1
