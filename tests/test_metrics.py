import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from training import metrics
from training.baselines import PixelSampler, PixelSamplerConfig
from training.data import open_dataset
from training.data.cases import Event, KnownDistribution
from training.evaluate import evaluate
from training.manifest import Normalisation
from training.networks import CalibrationConfig, CalibrationNet
from training.sampling import Networks

E = np.zeros((2, 2), np.uint8)  # empty mask
A = np.array([[1, 1], [0, 0]], np.uint8)
B = np.array([[1, 0], [0, 0]], np.uint8)
FULL = np.ones((2, 2), np.uint8)


def stack(*maps):
    return np.stack(maps)


def test_distance_binary_hand_computed():
    d = metrics.pairwise_distances(stack(A, B, E), stack(A, B, E), [1])
    # IoU(A, B) = 1/2; empty vs empty = 0; one empty = 1
    assert d == pytest.approx(np.array([[0, 0.5, 1], [0.5, 0, 1], [1, 1, 0]]))


def test_distance_multiclass_ignores_classes_absent_from_both():
    a = np.array([[1, 2], [0, 0]], np.uint8)
    b = np.array([[1, 0], [0, 0]], np.uint8)
    # class 1: IoU 1; class 2: IoU 0; class 3 absent from both -> ignored
    assert metrics.pairwise_distances(a[None], b[None], [1, 2, 3])[0, 0] == pytest.approx(0.5)


def test_distance_rejects_ill_shaped_input():
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        metrics.pairwise_distances(A, stack(A), [1])
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.pairwise_distances(stack(A), np.zeros((1, 3, 3), np.uint8), [1])


def test_ged_zero_for_identical_deterministic_sets_and_hand_value():
    assert metrics.ged(stack(A, A), stack(A, A, A), [1]) == pytest.approx(0.0)
    # S = {A}, Y = {B}: 2 * 0.5 - 0 - 0 = 1.0
    assert metrics.ged(stack(A), stack(B), [1]) == pytest.approx(1.0)
    # S = {A, E}, Y = {A}: cross mean (0 + 1)/2 = 0.5; within S mean (0+1+1+0)/4 = 0.5 -> 1 - 0.5 = 0.5
    assert metrics.ged(stack(A, E), stack(A), [1]) == pytest.approx(0.5)


def test_far_marks_counts_what_is_marked_beyond_reach_of_every_grader():
    annotators = np.zeros((2, 20, 20), np.uint8)
    annotators[0, 5, 5] = 1
    annotators[1, 5, 6] = 2  # another class of interest counts as graded too
    samples = np.zeros((2, 20, 20), np.uint8)
    samples[0, 5, 10] = 1  # 4 px from (5, 6): near
    samples[0, 5, 12] = 1  # 6 px: far
    samples[1, 15:17, 15:17] = 2  # a blob of 4, far
    samples[1, 5, 11] = 1  # exactly 5 px: near
    assert metrics.far_marks(samples, annotators, [1, 2]) == pytest.approx((1 + 4) / 2)
    assert metrics.far_marks(samples, annotators, [1]) == pytest.approx((1 + 1) / 2)  # class 2 ignored, (5, 11) is 6 from (5, 5)
    assert metrics.far_marks(samples, np.zeros_like(annotators), [1, 2]) == pytest.approx((2 + 5) / 2)  # nothing graded: all far


def test_ged_all_empty_is_zero():
    assert metrics.ged(stack(E, E), stack(E, E, E, E), [1]) == pytest.approx(0.0)


def test_diversity_counts_the_diagonal():
    # pairs (A,A)=0, (A,FULL)=0.5, (FULL,A)=0.5, (FULL,FULL)=0 -> 0.25
    assert metrics.diversity(stack(A, FULL), [1]) == pytest.approx(0.25)


def test_hm_iou_matches_one_to_one_with_lcm_tiling():
    # samples {A, E} vs annotators {A, E, A, E}: perfect matching exists
    assert metrics.hm_iou(stack(A, E), stack(A, E, A, E), [1]) == pytest.approx(1.0)
    # samples {A, A, A} vs annotators {A, E}: lcm 6, half the pairs must be A-E (IoU 0)
    assert metrics.hm_iou(stack(A, A, A), stack(A, E), [1]) == pytest.approx(0.5)
    # samples {B} vs annotators {A}: IoU 1/2
    assert metrics.hm_iou(stack(B), stack(A), [1]) == pytest.approx(0.5)


def test_ece_hand_computed_and_perfect():
    conf = np.array([0.05, 0.05, 0.95, 0.95])
    assert metrics.ece(conf, conf) == pytest.approx(0.0)
    # bin 0: mean conf .05 vs freq 0 -> .05 (weight .5); bin 9: .95 vs 1 -> .05 (weight .5)
    assert metrics.ece(conf, np.array([0, 0, 1, 1.0])) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="differ in size"):
        metrics.ece(conf, conf[:2])


def test_event_outcomes_and_coherence():
    region = np.array([[True, True], [False, False]])
    event = Event(region, "rim", 0.5, on_label=1, off_label=0)
    samples = stack(A, B, E)  # region values: [1,1], [1,0], [0,0]
    happened, coherence = metrics.event_outcomes(samples, event)
    # B's region is a tie: argmax takes the lower label (0), i.e. not happened
    assert happened.tolist() == [True, False, False]
    assert coherence == pytest.approx([1.0, 0.5, 1.0])


def test_calibration_error_by_kind():
    records = [
        ("a", 0.5, np.array([True, False, True, False])),  # predicted .5, true .5
        ("b", 0.2, np.array([True, True, False, False])),  # predicted .5, true .2
    ]
    error, table = metrics.calibration_error(records)
    assert error == pytest.approx((0.0 + 0.3) / 2)
    assert table["b"]["predicted"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one event"):
        metrics.calibration_error([])


def test_hm_iou_tiles_to_lcm_where_rectangular_matching_differs():
    # 2 samples {A, E} vs 3 annotators {A, A, E}. Rectangular min(n, m) matching pairs each sample
    # once (A-A, E-E) and scores 1.0; tiling to lcm 6 must also match the second annotator A, so
    # one of the two sample copies of E meets an A: mean IoU (2 x 1 + 2 x 1 + 1 + 0) / 6 = 5/6.
    samples, annotators = stack(A, E), stack(A, A, E)
    rows, cols = linear_sum_assignment(metrics.pairwise_distances(samples, annotators, [1]))
    rectangular = 1.0 - metrics.pairwise_distances(samples, annotators, [1])[rows, cols].mean()
    assert rectangular == pytest.approx(1.0)
    assert metrics.hm_iou(samples, annotators, [1]) == pytest.approx(5 / 6)


def test_ece_weights_bins_by_their_pixel_counts():
    # 9 pixels at 0.05 observed 0.05 (gap 0) and 1 pixel at 0.95 observed 0 (gap 0.95): weighted
    # by counts the ECE is 0.095; an unweighted mean over the two filled bins would say 0.475
    conf = np.array([0.05] * 9 + [0.95])
    freq = np.array([0.05] * 9 + [0.0])
    diagram = metrics.reliability(conf, freq)
    assert diagram.counts[0] == 9 and diagram.counts[9] == 1 and diagram.counts.sum() == 10
    assert diagram.confidence[9] == pytest.approx(0.95) and np.isnan(diagram.confidence[5])
    assert metrics.ece(conf, freq) == pytest.approx(0.095)
    assert diagram.to_json()["confidence"][5] is None


def test_ece_over_ambiguous_pixels_tells_an_inverted_rim_from_a_calibrated_one():
    # a 64 x 64 image, background everywhere but a 40-pixel rim whose true probability is 0.3
    truth = np.zeros((64, 64))
    truth.flat[:40] = 0.3
    calibrated, inverted = truth.copy(), truth.copy()
    inverted.flat[:40] = 0.7
    pooled = [metrics.ece(p, truth) for p in (calibrated, inverted)]
    assert pooled[1] < 0.01  # pooled over every pixel, the inverted rim all but vanishes
    keep = metrics.ambiguous_pixels(truth, inverted)
    assert keep.sum() == 40
    assert metrics.ece(calibrated[keep], truth[keep]) == pytest.approx(0.0)
    assert metrics.ece(inverted[keep], truth[keep]) == pytest.approx(0.4)


def test_a_deterministic_model_fails_the_per_event_error_but_not_the_pooled_one():
    # p = 0.3 events on 10 images; the model marks them in all 16 samples of 3 images, none of 7
    records = [("rim", 0.3, np.full(16, i < 3)) for i in range(10)]
    pooled, _ = metrics.calibration_error(records)
    assert pooled == pytest.approx(0.0)
    assert metrics.event_calibration_error(records) == pytest.approx(0.42)
    floor = metrics.perfect_sampler_floor([0.3] * 10, 16)
    assert 0.08 < floor < 0.12  # E|Bin(16, .3)/16 - .3|
    assert metrics.event_calibration_error(records) > 3 * floor


def test_perfect_sampler_floor_matches_simulation_and_vanishes_at_certainty():
    rng = np.random.default_rng(0)
    simulated = np.abs(rng.binomial(16, 0.3, 200_000) / 16 - 0.3).mean()
    assert metrics.perfect_sampler_floor([0.3], 16) == pytest.approx(simulated, abs=2e-3)
    assert metrics.perfect_sampler_floor([0.0, 1.0], 16) == 0.0
    assert metrics.perfect_sampler_floor([0.5], 1000) < 0.02


def test_ged_to_a_known_distribution_is_zero_only_in_the_limit_and_weighs_modes():
    modes = stack(A, E)
    # a sampler that always says A, against A w.p. 0.5 and E w.p. 0.5: 2 x 0.5 - 0 - 2 x .25 = 0.5
    assert metrics.ged_to_distribution(stack(A, A), modes, np.array([0.5, 0.5]), [1]) == pytest.approx(0.5)
    # samples in the modes' proportions: 2 x .5 - .5 - .5 = 0
    assert metrics.ged_to_distribution(stack(A, E), modes, np.array([0.5, 0.5]), [1]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="summing to 1"):
        metrics.ged_to_distribution(stack(A), modes, np.array([0.5, 0.2]), [1])


def test_known_distribution_modes_enumerate_every_combination_with_its_probability():
    base = np.zeros((2, 2), np.uint8)
    top = np.array([[True, True], [False, False]])
    events = (Event(top, "a", 0.3, 1, 0), Event(~top, "b", 0.6, 2, 0))
    modes, weights = KnownDistribution(base, events).modes()
    assert modes.shape == (4, 2, 2) and weights.sum() == pytest.approx(1.0)
    both = [i for i in range(4) if (modes[i] == np.array([[1, 1], [2, 2]])).all()]
    assert weights[both[0]] == pytest.approx(0.18)
    assert KnownDistribution(base, events * 4).modes(max_modes=64) is None


def test_certain_pixels_set_to_the_truth_keep_the_samples_ambiguous_objects():
    base = np.array([[1, 1], [0, 0]], np.uint8)
    rim = np.array([[False, False], [True, False]])
    truth = KnownDistribution(base, (Event(rim, "rim", 0.5, 1, 0),))
    # a sample that misses the certain core and marks a certain-background pixel, with the rim on
    samples = np.array([[[0, 1], [1, 1]]], np.uint8)
    fixed = truth.with_certain_pixels(samples)
    assert (fixed == np.array([[[1, 1], [1, 0]]])).all() and fixed.dtype == samples.dtype
    modes, weights = truth.modes()
    # only the rim's frequency is left wrong: always on against 0.5, GED 2 x .5 x (1/3) - 0 - 2 x .25 x (1/3)
    assert metrics.ged_to_distribution(fixed, modes, weights, [1]) == pytest.approx(1 / 6)
    assert metrics.ged_to_distribution(samples, modes, weights, [1]) > 1 / 6


def test_event_pairs_correlate_coupled_events_and_skip_constant_ones():
    a = np.array([True, False] * 8)
    correlation, dependence = metrics.event_pairs([a, a, ~a, np.ones(16, bool)])
    # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): equal, opposite, one constant
    assert correlation[[0, 1, 3]] == pytest.approx([1.0, -1.0, -1.0])
    assert np.isnan(correlation[[2, 4, 5]]).all()
    # P(a and a) - P(a)^2 = 0.5 - 0.25; P(a and not a) - P(a)P(not a) = 0 - 0.25; a constant: 0
    assert dependence == pytest.approx([0.25, 0.25, 0.0, 0.25, 0.0, 0.0])
    # partly coupled: P(i) = 1/2, P(j) = 1/4, P(i and j) = 1/4 -> 1/8 over sqrt(1/4 x 3/16)
    correlation, dependence = metrics.event_pairs([np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool)])
    assert dependence == pytest.approx([0.125]) and correlation == pytest.approx([0.125 / np.sqrt(0.25 * 0.1875)])
    assert metrics.event_pairs([a])[0].shape == (0,)


def test_independent_events_over_many_samples_neither_correlate_nor_depend():
    rng = np.random.default_rng(0)
    draws = rng.random((3, 200_000)) < np.array([[0.3], [0.6], [0.5]])
    correlation, dependence = metrics.event_pairs(list(draws))
    assert np.abs(correlation).max() < 0.01 and dependence.max() < 0.003


def test_pair_dependence_floor_is_exact_and_matches_simulation():
    rng = np.random.default_rng(1)
    n, p, q = 16, 0.3, 0.6
    i, j = rng.random((2, 100_000, n)) < np.array([p, q])[:, None, None]
    simulated = np.abs((i & j).mean(1) - i.mean(1) * j.mean(1)).mean()
    assert metrics.pair_dependence_floor([(p, q)], n) == pytest.approx(simulated, abs=1e-3)
    # n = 1: one sample, P(i and j) = P(i) P(j) always
    assert metrics.pair_dependence_floor([(p, q)], 1) == 0.0
    assert metrics.pair_dependence_floor([(0.0, 0.5), (0.5, 1.0)], 16) == 0.0
    assert metrics.pair_dependence_floor([(0.5, 0.5)], 16) > 0.04 > metrics.pair_dependence_floor([(0.5, 0.5)], 100)
    with pytest.raises(ValueError, match="at least one pair"):
        metrics.pair_dependence_floor([], 16)


class _OneSwitch(torch.nn.Module):
    """A sampler in G's slot that labels every pixel of a sample 1 or 2 by the sign of its first
    noise value: all of an image's events switch together, the opposite of independent."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.config = PixelSamplerConfig(classes)

    def encode(self, image, p_f):
        return [p_f]

    def decode(self, feats, z):
        labels = torch.where(z[:, 0] > 0, 1, 2)[:, None, None].expand(-1, *feats[0].shape[-2:])
        return torch.nn.functional.one_hot(labels, self.config.num_classes).permute(0, 3, 1, 2).float() * 30.0


def _networks(sampler, channels, classes):
    torch.manual_seed(0)
    calibration = CalibrationNet(CalibrationConfig(channels, classes, widths=(8, 16))).eval()
    return Networks(calibration, sampler.eval(), Normalisation())


def test_evaluate_reports_pair_independence_on_cells_and_only_where_images_have_pairs():
    cells = open_dataset("synthetic:cells", "test", length=6)
    pairs = sum(len(c.truth.events) * (len(c.truth.events) - 1) // 2 for c in cells)
    assert pairs > 6
    classes = len(cells.classes)
    coupled = evaluate(_networks(_OneSwitch(classes), 3, classes), cells, n_samples=16).summary
    assert coupled["pairs"] == pairs and coupled["pair_correlation_pairs"] > 0
    assert coupled["pair_correlation"] > 0.5 and coupled["pair_dependence"] > 2 * coupled["pair_dependence_floor"] > 0
    # pixels drawn one by one: events that vary at all vary independently of each other
    independent = evaluate(_networks(PixelSampler(classes, independent=True), 3, classes), cells, n_samples=16).summary
    assert independent["pair_correlation_pairs"] > 0 and abs(independent["pair_correlation"]) < 0.3
    assert independent["pair_dependence"] < coupled["pair_dependence"] / 4
    # a sampler without randomness: every event the same in all samples, so no correlation exists
    fixed = evaluate(_networks(PixelSampler(classes, independent=False), 3, classes), cells, n_samples=16).summary
    assert fixed["pairs"] == pairs and fixed["pair_dependence"] == 0.0
    assert fixed["pair_correlation_pairs"] == 0 and "pair_correlation" not in fixed
    # halo holds at most one event per image: nothing to pair
    halo = evaluate(_networks(PixelSampler(2, independent=False), 1, 2), open_dataset("synthetic:halo", "test", length=3), n_samples=4).summary
    assert "calibration_error" in halo and not {"pairs", "pair_correlation", "pair_dependence", "pair_dependence_floor"} & set(halo)
