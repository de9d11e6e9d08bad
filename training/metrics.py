"""Metrics of stochastic segmentation, as pure functions on label maps (numpy, uint/int class
indices). Each returns a per-image value; averaging over a data set is the caller's.

Distance between two label maps A, B over the classes of interest K (for binary data K = {1}):

    d(A, B) = 1 - nanmean_{c in K} IoU_c,   IoU_c = |A=c & B=c| / |A=c | B=c|,
    IoU_c = nan when class c is absent from both; d = 0 when every class is absent from both.

So for binary masks: both empty -> d = 0, exactly one empty -> d = 1 (the LIDC convention).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from training.data.cases import Event


def _check_maps(name: str, maps: np.ndarray) -> None:
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"{name} must be (n, H, W) with n >= 1, got shape {maps.shape}")


def pairwise_distances(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(n, H, W), (m, H, W) -> (n, m) matrix of d(a_i, b_j) as defined in the module docstring."""
    _check_maps("a", a)
    _check_maps("b", b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"shapes differ: {a.shape[1:]} vs {b.shape[1:]}")
    if len(classes) == 0:
        raise ValueError("classes of interest must not be empty")
    ious = np.empty((len(classes), a.shape[0], b.shape[0]))
    for idx, c in enumerate(classes):
        fa = (a == c).reshape(a.shape[0], -1).astype(np.float64)  # (n, P)
        fb = (b == c).reshape(b.shape[0], -1).astype(np.float64)  # (m, P)
        inter = fa @ fb.T
        union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            ious[idx] = np.where(union > 0, inter / union, np.nan)
    all_absent = np.isnan(ious).all(axis=0)
    with np.errstate(invalid="ignore"):
        mean_iou = np.nanmean(np.where(all_absent[None], 1.0, ious), axis=0)
    return 1.0 - mean_iou


def ged(samples: np.ndarray, annotators: np.ndarray, classes: Sequence[int]) -> float:
    """Squared generalised energy distance D^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')], plain
    means over all pairs, diagonals included (the literature's convention; it biases GED down as
    the number of samples n grows, so always report n)."""
    cross = pairwise_distances(samples, annotators, classes).mean()
    within_s = pairwise_distances(samples, samples, classes).mean()
    within_y = pairwise_distances(annotators, annotators, classes).mean()
    return float(2 * cross - within_s - within_y)


FAR_REACH = 5.0  # px: ``far_marks`` forgives a mark this close to what some grader marked


def far_marks(samples: np.ndarray, annotators: np.ndarray, classes: Sequence[int], reach: float = FAR_REACH) -> float:
    """Pixels per sample marked with a class of interest farther than ``reach`` px (Euclidean) from
    every pixel any annotator marked with one: not a boundary off by a pixel or two but a separate
    false mark (on LIDC crops, a vessel seen end on), which GED folds into one number with the rest."""
    _check_maps("samples", samples)
    graded = np.isin(annotators, classes).any(axis=0)
    marked = np.isin(samples, classes)
    if not graded.any():  # nothing to be near: every mark is far
        return float(marked.sum(axis=(1, 2)).mean())
    far = ndimage.distance_transform_edt(~graded) > reach
    return float((marked & far[None]).sum(axis=(1, 2)).mean())


def diversity(samples: np.ndarray, classes: Sequence[int]) -> float:
    """Sample diversity E[d(S, S')] over all pairs, diagonal included (as in GED)."""
    return float(pairwise_distances(samples, samples, classes).mean())


def hm_iou(samples: np.ndarray, annotators: np.ndarray, classes: Sequence[int]) -> float:
    """Hungarian-matched IoU: tile samples and annotators to lcm(n, m), match them one to one
    minimising the summed distance d, and return the mean matched IoU = 1 - mean matched d."""
    n, m = samples.shape[0], annotators.shape[0]
    cost = pairwise_distances(samples, annotators, classes)  # (n, m)
    size = math.lcm(n, m)
    tiled = np.tile(cost, (size // n, size // m))  # (L, L): row i is sample i % n, column j annotator j % m
    rows, cols = linear_sum_assignment(tiled)
    return float(1.0 - tiled[rows, cols].mean())


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram: per equal-width bin of [0, 1], how many pixels fell in it, their mean
    predicted probability and their mean observed frequency. The ECE weights each bin's gap by its
    share of the pixels, so a bin of 3 pixels cannot count as much as one of 30,000."""

    counts: np.ndarray  # (bins,) int
    confidence: np.ndarray  # (bins,) mean predicted probability, nan where empty
    frequency: np.ndarray  # (bins,) mean observed frequency, nan where empty

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        gaps = np.abs(self.confidence[filled] - self.frequency[filled])
        return float((self.counts[filled] * gaps).sum() / self.counts.sum())

    def to_json(self) -> dict[str, list]:
        def listed(values: np.ndarray) -> list:
            return [None if np.isnan(v) else round(float(v), 6) for v in values]

        return {"counts": self.counts.tolist(), "confidence": listed(self.confidence), "frequency": listed(self.frequency)}


def reliability(confidence: np.ndarray, frequency: np.ndarray, bins: int = 10) -> Reliability:
    """Bin predicted probabilities (``confidence``) with the frequencies observed at the same
    pixels, over ``bins`` equal-width bins of [0, 1] (1.0 falls in the last bin)."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    frequency = np.asarray(frequency, dtype=np.float64).ravel()
    if confidence.shape != frequency.shape:
        raise ValueError(f"confidence and frequency differ in size: {confidence.size} vs {frequency.size}")
    if confidence.size == 0:
        raise ValueError("reliability of an empty set")
    which = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, minlength=bins) / counts
        mean_freq = np.bincount(which, frequency, minlength=bins) / counts
    return Reliability(counts, mean_conf, mean_freq)


def ece(confidence: np.ndarray, frequency: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error sum_b (N_b / N) |mean confidence in b - mean frequency in b|."""
    return reliability(confidence, frequency, bins).ece


def ambiguous_pixels(marked: np.ndarray, confidence: np.ndarray, bins: int = 10) -> np.ndarray:
    """The pixels where a class can be in doubt: some annotator (or the true distribution) marks it
    there (``marked`` > 0), or the model gives it at least the first bin's upper edge 1 / bins.
    The rest (model below 1 / bins, nobody marks it) can only add gaps under 1 / bins to the first
    bin, and in a segmentation they are almost every pixel: pooled in, they push any model's ECE
    to ~0 (an inverted p_F on a rim scored 0.005)."""
    return (np.asarray(marked) > 0) | (np.asarray(confidence) >= 1.0 / bins)


def event_outcomes(samples: np.ndarray, event: Event) -> tuple[np.ndarray, np.ndarray]:
    """For each sample: whether the event happened (the majority label in its region is the event's
    ``on_label``) and coherence (the share of the region's pixels carrying that majority label).
    Returns (n,) bool and (n,) float."""
    _check_maps("samples", samples)
    values = samples[:, event.region]  # (n, P)
    if values.shape[1] == 0:
        raise ValueError(f"event {event.kind!r} has an empty region")
    counts = np.stack([(values == label).sum(1) for label in range(int(values.max()) + 1)], axis=1)  # (n, L)
    majority = counts.argmax(1)
    coherence = counts.max(1) / values.shape[1]
    return majority == event.on_label, coherence


def calibration_error(records: Iterable[tuple[str, float, np.ndarray]]) -> tuple[float, dict[str, dict[str, float]]]:
    """Mean over event kinds of |predicted frequency - true probability|, where for each kind the
    predicted frequency is the share of (event, sample) pairs in which the event happened and the
    true probability is the mean of its events' probabilities. ``records`` holds one
    (kind, probability, outcomes (n,) bool) per event. Also returns the per-kind table."""
    happened: dict[str, list[float]] = defaultdict(list)
    truth: dict[str, list[float]] = defaultdict(list)
    for kind, probability, outcomes in records:
        happened[kind].extend(np.asarray(outcomes, dtype=np.float64).tolist())
        truth[kind].append(probability)
    if not happened:
        raise ValueError("calibration_error needs at least one event")
    table = {
        kind: {"predicted": float(np.mean(happened[kind])), "true": float(np.mean(truth[kind])), "events": len(truth[kind])}
        for kind in sorted(happened)
    }
    error = float(np.mean([abs(row["predicted"] - row["true"]) for row in table.values()]))
    return error, table


def event_calibration_error(records: Iterable[tuple[str, float, np.ndarray]]) -> float:
    """Mean over events of |share of the n samples in which the event happened - its probability|.
    Unlike ``calibration_error``, which pools a kind's events before comparing, a model with no
    randomness (an event in all samples of 3 images and in none of 7 at p = 0.3) scores
    (3 x 0.7 + 7 x 0.3) / 10 = 0.42 here, and 0 there."""
    errors = [abs(float(np.mean(outcomes)) - probability) for _, probability, outcomes in records]
    if not errors:
        raise ValueError("event_calibration_error needs at least one event")
    return float(np.mean(errors))


def _binomial(n: int, p: float) -> np.ndarray:
    """P(K = k) for k = 0..n, K ~ Binomial(n, p), 0 < p < 1."""
    k = np.arange(n + 1)
    return np.exp(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p))


def perfect_sampler_floor(probabilities: Iterable[float], n: int) -> float:
    """What ``event_calibration_error`` expects of a perfect sampler at n samples: the mean over
    events of E|K / n - p|, K ~ Binomial(n, p), computed exactly. A model can only be judged
    against this floor (at n = 16 and p = 0.3 it is 0.09), never against 0."""
    ks = np.arange(n + 1)
    floors = []
    for p in probabilities:
        if p <= 0.0 or p >= 1.0:
            floors.append(0.0)
            continue
        floors.append(float((_binomial(n, p) * np.abs(ks / n - p)).sum()))
    if not floors:
        raise ValueError("perfect_sampler_floor needs at least one event")
    return float(np.mean(floors))


def event_pairs(outcomes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """How one image's events, independent in truth, co-occur over the same n samples: for each pair
    i < j of the (n,) bool ``outcomes`` (``event_outcomes``' first output), the Pearson correlation
    of the two (nan where either is the same in every sample, so has no variance) and the
    dependence |P(i and j) - P(i) P(j)|, frequencies over the samples. Both are 0 for independent
    events in the limit of many samples; a sampler that draws one image-wide switch for all the
    events gives |correlation| 1. Returns two (pairs,) arrays, pairs in (0, 1), (0, 2), .., (1, 2) order."""
    happened = np.asarray(outcomes, dtype=np.float64).reshape(len(outcomes), -1)  # (E, n)
    first, second = np.triu_indices(len(happened), k=1)
    share = happened.mean(axis=1)
    joint = (happened[first] * happened[second]).mean(axis=1)
    covariance = joint - share[first] * share[second]
    spread = np.sqrt(share * (1.0 - share))  # the standard deviation of a 0/1 outcome
    scale = spread[first] * spread[second]
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.where(scale > 0, covariance / scale, np.nan)
    return np.clip(correlation, -1.0, 1.0), np.abs(covariance)


@functools.cache
def _pair_floor(p: float, q: float, n: int) -> float:
    if min(p, q) <= 0.0 or max(p, q) >= 1.0:
        return 0.0  # an event that never or always happens: its share is constant, the gap exactly 0
    # every outcome of n samples, by how many have the first event (K_p ~ Bin(n, p)), how many of
    # those also have the second (~ Bin(K_p, q)) and how many of the rest have it (~ Bin(n - K_p, q))
    expected = 0.0
    for first, chance in enumerate(_binomial(n, p)):
        both = np.arange(first + 1)[:, None]
        only_second = np.arange(n - first + 1)[None, :]
        weight = chance * _binomial(first, q)[:, None] * _binomial(n - first, q)[None, :]
        expected += float((weight * np.abs(both / n - first / n * (both + only_second) / n)).sum())
    return expected


def pair_dependence_floor(probabilities: Iterable[tuple[float, float]], n: int) -> float:
    """What ``event_pairs``' dependence expects of a perfect sampler, whose events are independent,
    at n samples: the mean over pairs (p, q) of E|K_pq / n - K_p K_q / n^2|, computed exactly by
    enumerating the counts, ~n^3 / 6 terms (not 0: at n = 16 and p = q = 0.5 it is ~0.05). A
    sampler's dependence is judged against this, never against 0."""
    floors = [_pair_floor(float(p), float(q), n) for p, q in probabilities]
    if not floors:
        raise ValueError("pair_dependence_floor needs at least one pair")
    return float(np.mean(floors))


def ged_to_distribution(samples: np.ndarray, modes: np.ndarray, weights: np.ndarray, classes: Sequence[int]) -> float:
    """GED against a known distribution given as its modes (M, H, W) and their probabilities (M,):
    2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] with Y's expectations weighted exactly, not estimated
    from a few annotators (the Cityscapes protocol's 32-mode GED)."""
    weights = np.asarray(weights, dtype=np.float64)
    if modes.shape[0] != weights.shape[0] or not math.isclose(weights.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"{modes.shape[0]} modes need as many weights summing to 1, got {weights.tolist()}")
    cross = (pairwise_distances(samples, modes, classes) @ weights).mean()
    within_s = pairwise_distances(samples, samples, classes).mean()
    within_y = weights @ pairwise_distances(modes, modes, classes) @ weights
    return float(2 * cross - within_s - within_y)


def foreground_classes(num_classes: int) -> list[int]:
    """Classes of interest for d: every class but background (index 0)."""
    return list(range(1, num_classes))
