"""``cells``: microscopy-like fields whose ambiguity is read from the image itself, not set by a prior.

64x64 RGB fields of 2-4 cells, never overlapping, of three types on a pale background. The types'
prototype colours form a chain a - b - c: a cell's colour is the mix (1 - t) a + t b (or the same of
b and c), t one of 0, 1/4, 1/2, 3/4, 1, and annotators label it the second type with probability t.
So a pure cell (t = 0 or 1, a quarter of them) is never in doubt, and a mixed cell's colour alone
says how likely each reading is. A pure cell may have a faint membrane drawn at contrast c (0.3 or
0.6) against the background, which annotators include in the cell with probability c.

Each mixed cell and each membrane is one independent all-or-nothing event (``KnownDistribution``),
about 2.7 per image. Its kind (``mix_0.25`` .. ``mix_0.75``, ``membrane_0.3``, ``membrane_0.6``) names
its probability, so calibration pooled per kind compares events of one probability only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from training.data.cases import Event, KnownDistribution

SIZE = 64
CELL_CLASSES = ("background", "cell_a", "cell_b", "cell_c")
# prototype colours of classes 1..3; a and c are far apart and never mix, so no mixed colour of one
# pair is a mixed colour of the other
CELL_COLOURS = np.array([[205, 60, 75], [125, 60, 175], [45, 140, 200]], dtype=np.float32)
MIX_PAIRS = ((1, 2), (2, 3))  # (first, second) class of each pair of types that mix
MIX_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
# ``cells_rare``: readings that 1 grader in 20 gives. By exact enumeration the paper's L_cal alone, at
# n = 8 saturated samples, has its expected minimum at a share of 0.005 for p_F 0.05 (the reverse KL
# is mode-seeking), so this is where a sampler that drops rare readings shows it. A 0.05 mix is 6.4
# colour units from its pure type, so its cells' colour strays by 0.5 per channel, not 4: the image
# must still say which cells are in doubt, or the truth is not what the image shows
RARE_MIX_LEVELS = (0.0, 0.05, 0.5, 0.95, 1.0)
RARE_COLOUR_JITTER = 0.5
_MIX_SHARES = (0.125, 0.25, 0.25, 0.25, 0.125)  # a quarter of the cells pure
MEMBRANE_CONTRASTS = (0.3, 0.6)
_MEMBRANE_SHARE = 0.6  # of the pure cells
_MEMBRANE_WIDTH = 2.0


def _cell_kinds(levels: tuple[float, ...]) -> dict[str, float]:
    """Event kinds and their probabilities for cells mixed at ``levels`` (the first and last pure)."""
    return {f"mix_{t:g}": t for t in levels[1:-1]} | {f"membrane_{c:g}": c for c in MEMBRANE_CONTRASTS}


CELL_KINDS = _cell_kinds(MIX_LEVELS)
RARE_CELL_KINDS = _cell_kinds(RARE_MIX_LEVELS)
_BACKGROUND = np.array([228, 218, 210], dtype=np.float32)
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _place(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """Centre and outer radius (membrane included) of up to ``count`` cells whose bounding circles
    keep a pixel apart, so no two cells, or a cell and another's membrane, ever share a pixel."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _ in range(30):
            outer = float(rng.uniform(6.5, 10.0))
            cy, cx = rng.uniform(outer + 1, SIZE - outer - 1, 2)
            if all(np.hypot(cy - y, cx - x) > outer + r + 1 for y, x, r in placed):
                placed.append((float(cy), float(cx), outer))
                break
    return placed


def _ellipse_radius(rng: np.random.Generator, cy: float, cx: float, major: float) -> np.ndarray:
    """Normalised radial coordinate of a randomly squashed and turned ellipse: < 1 inside."""
    minor = major * float(rng.uniform(0.7, 1.0))
    angle = rng.uniform(0, np.pi)
    u = (_YY - cy) * np.cos(angle) + (_XX - cx) * np.sin(angle)
    v = (_XX - cx) * np.cos(angle) - (_YY - cy) * np.sin(angle)
    return np.hypot(u / major, v / minor)


def draw_cells(
    rng: np.random.Generator, levels: tuple[float, ...] = MIX_LEVELS, colour_jitter: float = 4.0
) -> tuple[np.ndarray, KnownDistribution]:
    """One field: the (64, 64, 3) uint8 image and the true distribution of its label maps; a
    cell's mix t is one of ``levels``, whose first and last are the two pure types, and its colour
    strays from its mix by ``colour_jitter`` per channel."""
    shading = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 8)
    img = _BACKGROUND + 8 * (shading / (shading.std() + 1e-8))[:, :, None]  # uneven light, not uneven stain
    base = np.zeros((SIZE, SIZE), np.uint8)
    events: list[Event] = []
    for cy, cx, outer in _place(rng, int(rng.integers(2, 5))):
        rho = _ellipse_radius(rng, cy, cx, outer - _MEMBRANE_WIDTH)
        cell = rho < 1.0
        first, second = MIX_PAIRS[int(rng.integers(len(MIX_PAIRS)))]
        t = float(rng.choice(levels, p=_MIX_SHARES))
        colour = (1 - t) * CELL_COLOURS[first - 1] + t * CELL_COLOURS[second - 1] + rng.normal(0, colour_jitter, 3)
        img[cell] = colour
        img[rho < 0.45] = 0.75 * colour  # a darker nucleus of the same hue: the hue, not the shade, holds t
        if t in (0.0, 1.0):
            label = first if t == 0.0 else second
            base[cell] = label
            if rng.random() < _MEMBRANE_SHARE:
                # only pure cells: a membrane's label is its cell's, and a mixed cell's label is itself
                # random, so a membrane there would not be independent of its cell's event
                contrast = float(rng.choice(MEMBRANE_CONTRASTS))
                ring = ~cell & (rho < 1.0 + _MEMBRANE_WIDTH / (outer - _MEMBRANE_WIDTH))
                img[ring] = _BACKGROUND + contrast * (colour - _BACKGROUND)
                events.append(Event(ring, f"membrane_{contrast:g}", contrast, on_label=label, off_label=0))
        else:
            base[cell] = first
            events.append(Event(cell, f"mix_{t:g}", t, on_label=second, off_label=first))
    img += 7 * rng.standard_normal((SIZE, SIZE, 3))
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, KnownDistribution(base, tuple(events))
