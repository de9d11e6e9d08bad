"""Evaluation of a sampler on a data set, with the metric names ``carseg evaluate`` writes:

- any data: ``ged_16`` (GED with n = 16 samples), ``hm_iou_16``, ``diversity_16``, ``ged_100``
  when asked for, ``far_marks_16``: pixels per sample marked farther than 5 px from every
  grader's mark (``metrics.far_marks``: false marks apart from the lesion, such as vessels), ``ece``: the ECE of p_F over the pixels that can be in doubt
  (``metrics.ambiguous_pixels``), and ``ece_samples``: the same for the share of the n samples
  that mark each pixel (what G adds or loses: two methods that share F differ only there), each
  with its reliability diagram;
- data whose true distribution is known: ``ged_truth_16`` (GED against every mode, weighted by its
  probability), the oracle values a perfect sampler gets at the same n (``oracle_ged_16``,
  ``oracle_ged_truth_16``; ratios only where the oracle is > 0), ``ged_truth_events_16`` (the same
  with the samples' certain pixels, those outside every event, set to the truth: what is left is the
  error in the ambiguous objects; the drop from ``ged_truth_16`` is what the certain structure,
  boundaries, misses and false marks, costs), ``calibration_error`` (each
  kind's events pooled) next to ``calibration_error_p_f`` (the same of F's probability of each
  event's label, averaged over its region; per kind as ``p_f``: where the two differ, G's samples
  left p_F), ``event_calibration_error`` (event by event) next to
  ``event_calibration_floor`` (what a perfect sampler scores at n = 16), ``coherence``, and, where
  some image has two or more events (independent in truth), whether the samples keep them
  independent (``metrics.event_pairs``, over every pair of an image's events): ``pairs``,
  ``pair_correlation`` (the mean over the ``pair_correlation_pairs`` pairs where both events vary
  across the samples; 0 for the truth), ``pair_dependence`` (mean |P(i and j) - P(i) P(j)|) next
  to ``pair_dependence_floor`` (what a sampler with independent events scores at n = 16).

The sampler is anything ``training.sampling.sample`` runs: CAR's F and G, a baseline
(``training.baselines``) or the peer method, so every method is judged by the same code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training import metrics, uncertainty_summary
from training.data import Case, Dataset
from training.sampling import LABELS, P_F, SUMMARY, Networks, sample


@dataclass
class Evaluation:
    summary: dict[str, Any]
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    # reliability diagrams by what they judge: "p_f" (F's probabilities), "samples" (the samples' shares)
    reliability: dict[str, metrics.Reliability] = field(default_factory=dict)
    # the cases' uncertainty summaries' quantiles (training.uncertainty_summary.reference): on the
    # validation set, the band that drift monitoring holds the served model to
    uncertainty: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary, "per_kind": self.per_kind, "reliability": {k: r.to_json() for k, r in self.reliability.items()},
            "uncertainty": self.uncertainty,
        }


def sample_case(networks: Networks, case: Case, k: int, seed: int, outputs: tuple[str, ...] = (LABELS, P_F)) -> dict[str, torch.Tensor]:
    """The ``outputs`` of k samples of one case (names in ``training.sampling.OUTPUTS``)."""
    return sample(networks, networks.prepare([case.image]), [k], [seed], outputs)[0]


class _Tally:
    """What the cases add up to, kept per metric so that missing ones (no truth) stay absent."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        # per judged map ("p_f", "samples"): the predicted probabilities and the frequencies there
        self.confidences: dict[str, list[np.ndarray]] = {"p_f": [], "samples": []}
        self.frequencies: dict[str, list[np.ndarray]] = {"p_f": [], "samples": []}
        self.records: list[tuple[str, float, np.ndarray]] = []
        # the same events judged by F: its probability of each event's label, averaged over the region
        self.records_p_f: list[tuple[str, float, np.ndarray]] = []
        # per pair of one image's events: their probabilities, correlation (nan: undefined) and dependence
        self.pair_probabilities: list[tuple[float, float]] = []
        self.pair_correlations: list[float] = []
        self.pair_dependences: list[float] = []

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def mean(self, name: str) -> float:
        return float(np.mean(self.values[name]))


def _add_pixels(tally: _Tally, case: Case, p_f: np.ndarray, samples: np.ndarray, classes: list[int]) -> None:
    """p_F and the samples' shares against the truth's marginals where they are known, else against
    the annotators' mean, each over its own ambiguous pixels."""
    truth = case.truth.marginals(p_f.shape[0]) if case.truth is not None else None
    for c in classes:
        frequency = truth[c] if truth is not None else (case.labels == c).mean(axis=0)
        marked = np.maximum(frequency, (case.labels == c).any(axis=0))
        for name, predicted in (("p_f", p_f[c]), ("samples", (samples == c).mean(axis=0))):
            keep = metrics.ambiguous_pixels(marked, predicted)
            tally.confidences[name].append(predicted[keep])
            tally.frequencies[name].append(frequency[keep])


def _add_truth(
    tally: _Tally, case: Case, p_f: np.ndarray, samples: np.ndarray, n: int, classes: list[int], rng: np.random.Generator
) -> None:
    truth = case.truth
    assert truth is not None
    tally.add(f"oracle_ged_{n}", metrics.ged(truth.sample(rng, n), case.labels, classes))
    modes = truth.modes()
    if modes is not None:
        tally.add(f"ged_truth_{n}", metrics.ged_to_distribution(samples, *modes, classes))
        tally.add(f"ged_truth_events_{n}", metrics.ged_to_distribution(truth.with_certain_pixels(samples), *modes, classes))
        tally.add(f"oracle_ged_truth_{n}", metrics.ged_to_distribution(truth.sample(rng, n), *modes, classes))
    outcomes = []
    for event in truth.events:
        happened, coherence = metrics.event_outcomes(samples, event)
        tally.records.append((event.kind, event.probability, happened))
        tally.records_p_f.append((event.kind, event.probability, p_f[event.on_label][event.region].mean(keepdims=True)))
        tally.add("coherence", float(coherence.mean()))
        outcomes.append(happened)
    if len(outcomes) >= 2:
        correlation, dependence = metrics.event_pairs(outcomes)
        tally.pair_correlations.extend(correlation.tolist())
        tally.pair_dependences.extend(dependence.tolist())
        tally.pair_probabilities.extend(itertools.combinations([e.probability for e in truth.events], 2))


def _ratio(summary: dict[str, Any], tally: _Tally, name: str, oracle: str, ratio: str) -> None:
    """``name / oracle`` only where the oracle is > 0 (one annotator, or a case with no ambiguity,
    gives an oracle GED of 0, and a ratio to 0 says nothing) and both are means over the same cases:
    in a mixture with real data the oracle covers the synthetic cases only."""
    counts = len(tally.values.get(name, ())), len(tally.values.get(oracle, ()))
    if summary.get(oracle, 0.0) > 0.0 and name in summary and counts[0] == counts[1]:
        summary[ratio] = summary[name] / summary[oracle]


def evaluate(
    networks: Networks,
    dataset: Dataset,
    n_samples: int = 16,
    n_large: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Score ``networks`` on every case of ``dataset``; ``n_large`` adds GED at that many samples
    (the literature's GED_100). The first ``n_samples`` samples of a seed are the same whatever
    the total, so GED_16 is the same with or without ``n_large``."""
    if n_samples < 1 or (n_large is not None and n_large < n_samples):
        raise ValueError(f"need 1 <= n_samples <= n_large, got {n_samples} and {n_large}")
    classes = metrics.foreground_classes(len(dataset.classes))
    rng = np.random.default_rng(seed)
    tally = _Tally()
    n = n_samples
    summaries = []
    for index in range(len(dataset)):
        case = dataset[index]
        out = sample_case(networks, case, n_large or n, seed + index, (LABELS, P_F, SUMMARY))
        if n_large is not None:  # the summaries at n, as requests draw them (the mutual information grows with k)
            out[SUMMARY] = sample_case(networks, case, n, seed + index, (SUMMARY,))[SUMMARY]
        summaries.append(out[SUMMARY].cpu().numpy())
        drawn = out[LABELS].cpu().numpy()  # (n_large or n, H, W)
        samples = drawn[:n]
        tally.add(f"ged_{n}", metrics.ged(samples, case.labels, classes))
        tally.add(f"hm_iou_{n}", metrics.hm_iou(samples, case.labels, classes))
        tally.add(f"diversity_{n}", metrics.diversity(samples, classes))
        tally.add(f"far_marks_{n}", metrics.far_marks(samples, case.labels, classes))
        if n_large is not None:
            tally.add(f"ged_{n_large}", metrics.ged(drawn, case.labels, classes))
        p_f = out[P_F].cpu().numpy()
        _add_pixels(tally, case, p_f, samples, classes)
        if case.truth is not None:
            _add_truth(tally, case, p_f, samples, n, classes, rng)
        if progress is not None:
            progress(1)
    summary: dict[str, Any] = {"n_samples": n, "cases": len(dataset)}
    summary.update({name: tally.mean(name) for name in tally.values})
    reliability = {}
    for name, key in (("p_f", "ece"), ("samples", "ece_samples")):
        confidences = np.concatenate(tally.confidences[name])
        if confidences.size:  # else no class is in doubt anywhere: there is nothing to calibrate
            reliability[name] = metrics.reliability(confidences, np.concatenate(tally.frequencies[name]))
            summary[key] = reliability[name].ece
    if "p_f" in reliability:
        summary["ece_pixels"] = int(reliability["p_f"].counts.sum())
    _ratio(summary, tally, f"ged_{n}", f"oracle_ged_{n}", f"ged_ratio_{n}")
    _ratio(summary, tally, f"ged_truth_{n}", f"oracle_ged_truth_{n}", f"ged_truth_ratio_{n}")
    per_kind: dict[str, dict[str, float]] = {}
    if tally.records:
        summary["calibration_error"], per_kind = metrics.calibration_error(tally.records)
        # the same error of F's probabilities: next to calibration_error it says whose error it is,
        # F's (train F further) or G's (its samples leave p_F)
        summary["calibration_error_p_f"], by_f = metrics.calibration_error(tally.records_p_f)
        for kind, row in per_kind.items():
            row["p_f"] = by_f[kind]["predicted"]
        summary["event_calibration_error"] = metrics.event_calibration_error(tally.records)
        summary["event_calibration_floor"] = metrics.perfect_sampler_floor([p for _, p, _ in tally.records], n)
    if tally.pair_dependences:
        summary["pairs"] = len(tally.pair_dependences)
        summary["pair_dependence"] = float(np.mean(tally.pair_dependences))
        summary["pair_dependence_floor"] = metrics.pair_dependence_floor(tally.pair_probabilities, n)
        defined = [c for c in tally.pair_correlations if not np.isnan(c)]
        summary["pair_correlation_pairs"] = len(defined)
        if defined:  # else no pair has both events varying: a correlation says nothing
            summary["pair_correlation"] = float(np.mean(defined))
    return Evaluation(summary, per_kind, reliability, uncertainty_summary.reference(np.stack(summaries), n))
