"""Per-image summaries of a segmentation's uncertainty: the numbers that move when the inputs drift
(another scanner, protocol or modality) before anyone sees a wrong mask. The sampler computes them
for every request (``training.sampling.SUMMARY``, computed there: this module is torch-free, as the
API process reads the names and the manifest's band), the service exports them as Prometheus histograms
per model, and training records their quantiles over the validation set in the manifest
(``uncertainty_reference``): the band a Prometheus rule holds the live median to.

Each mean is over the image's foreground region, the pixels where F gives the non-background
classes (class 0 is the background, as in every dataset ``carseg train`` reads) a probability of at
least ``FOREGROUND_THRESHOLD``; entropies are divided by log C, so every summary lies in [0, 1]
whatever the class count:

- ``aleatoric_entropy``: H(p_F) / log C, F's own doubt;
- ``mutual_information``: (H(mean) - mean H(sample)) / log C, how much the samples disagree beyond
  what each one doubts (needs k >= ``MIN_K_MUTUAL_INFORMATION``: with fewer it is an underestimate);
- ``sample_diversity``: the chance that two of the k samples label a pixel differently, the unbiased
  estimate k / (k - 1) (1 - sum_c f_c^2) from the classes' frequencies f_c (needs k >= 2);
- ``foreground_fraction``: the region's share of the image.

An image without a foreground region has 0 for the three means: nothing there, and no doubt about
it. A summary that needs more samples than were drawn is NaN, and not observed."""

from __future__ import annotations

from typing import Any

import numpy as np

NAMES = ("aleatoric_entropy", "mutual_information", "sample_diversity", "foreground_fraction")
# low enough that a faint reading of a lesion counts, high enough that F's background haze does not
FOREGROUND_THRESHOLD = 0.05
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# the mutual information is estimated from the k samples' mean, low for small k: on the 28 LIDC crops
# (default v2) its median was 0.289 at k = 16, 0.223 at k = 4 and 0.089 at k = 2, below the validation
# set's 5th percentile (0.147); so k = 2 and 3 do not count towards it
MIN_K_MUTUAL_INFORMATION = 4


def reference(summaries: np.ndarray, k: int) -> dict[str, Any]:
    """The validation set's band: each summary's ``QUANTILES`` over the images (n, 4) summarised at
    ``k`` samples, NaN (undefined) values left out; what the manifest records as ``uncertainty_reference``."""
    summaries = np.asarray(summaries, dtype=np.float64).reshape(-1, len(NAMES))
    quantiles: dict[str, dict[str, float]] = {}
    for name, column in zip(NAMES, summaries.T, strict=True):
        defined = column[~np.isnan(column)]
        if defined.size:
            quantiles[name] = {str(q): round(float(np.quantile(defined, q)), 6) for q in QUANTILES}
    return {"k": k, "cases": int(summaries.shape[0]), "threshold": FOREGROUND_THRESHOLD, "quantiles": quantiles}
