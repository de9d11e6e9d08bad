import numpy as np
import pytest

from training import metrics
from training.data.cases import Event

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
