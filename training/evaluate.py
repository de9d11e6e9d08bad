"""Evaluation of a model on a data set: GED_n, HM-IoU_n, diversity and the ECE of p_F for any
data; oracle GED_n, calibration error and coherence (of G's samples and, for comparison, of
per-pixel independent samples from p_F) where the true label distribution is known."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training import metrics
from training.data import Case, Dataset
from training.sampling import LABELS, P_F, Networks, sample


@dataclass
class Evaluation:
    summary: dict[str, Any]
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)


def sample_case(networks: Networks, case: Case, k: int, seed: int, outputs: tuple[str, ...] = (LABELS, P_F)) -> dict[str, torch.Tensor]:
    """The ``outputs`` of k samples of one case (names in ``training.sampling.OUTPUTS``)."""
    return sample(networks, networks.prepare([case.image]), [k], [seed], outputs)[0]


def _independent_samples(p_f: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k label maps drawn pixel by pixel, independently, from p_F (C, H, W)."""
    cdf = np.cumsum(p_f, axis=0)  # (C, H, W)
    u = rng.random((k, 1, *p_f.shape[1:]))
    return (u > cdf[None]).sum(axis=1).clip(max=p_f.shape[0] - 1)


def evaluate(networks: Networks, dataset: Dataset, n_samples: int = 16, seed: int = 0) -> Evaluation:
    num_classes = len(dataset.classes)
    classes = metrics.foreground_classes(num_classes)
    rng = np.random.default_rng(seed)
    geds, hms, divs, oracle = [], [], [], []
    confidences, frequencies = [], []
    records, records_indep, coherence, coherence_indep = [], [], [], []
    for index in range(len(dataset)):
        case = dataset[index]
        out = sample_case(networks, case, n_samples, seed + index)
        samples = out[LABELS].cpu().numpy()  # (n, H, W)
        p_f = out[P_F].cpu().numpy()  # (C, H, W)
        geds.append(metrics.ged(samples, case.labels, classes))
        hms.append(metrics.hm_iou(samples, case.labels, classes))
        divs.append(metrics.diversity(samples, classes))
        for c in classes:
            confidences.append(p_f[c].ravel())
            frequencies.append((case.labels == c).mean(axis=0).ravel())
        if case.truth is not None:
            oracle.append(metrics.ged(case.truth.sample(rng, n_samples), case.labels, classes))
            independent = _independent_samples(p_f, n_samples, rng)
            for event in case.truth.events:
                happened, coh = metrics.event_outcomes(samples, event)
                records.append((event.kind, event.probability, happened))
                coherence.append(coh.mean())
                happened_i, coh_i = metrics.event_outcomes(independent, event)
                records_indep.append((event.kind, event.probability, happened_i))
                coherence_indep.append(coh_i.mean())
    summary: dict[str, Any] = {
        "n_samples": n_samples,
        "cases": len(dataset),
        "ged": float(np.mean(geds)),
        "hm_iou": float(np.mean(hms)),
        "diversity": float(np.mean(divs)),
        "ece": metrics.ece(np.concatenate(confidences), np.concatenate(frequencies)),
    }
    per_kind: dict[str, dict[str, float]] = {}
    if oracle:
        summary["oracle_ged"] = float(np.mean(oracle))
        summary["ged_ratio"] = summary["ged"] / summary["oracle_ged"]
    if records:
        summary["calibration_error"], per_kind = metrics.calibration_error(records)
        summary["coherence"] = float(np.mean(coherence))
        summary["independent_calibration_error"], _ = metrics.calibration_error(records_indep)
        summary["independent_coherence"] = float(np.mean(coherence_indep))
    return Evaluation(summary, per_kind)
