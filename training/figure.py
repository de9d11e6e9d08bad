"""A figure of cases side by side: image, annotators, samples and uncertainty maps, one row per
case, drawn with PIL (no plotting stack to install)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from training.data import Case
from training.sampling import ALEATORIC_ENTROPY, LABELS, MUTUAL_INFORMATION, P_F, SAMPLE_ENTROPY

# what a figure row shows of a case's samples: pass these to training.evaluate.sample_case
FIGURE_OUTPUTS = (LABELS, P_F, ALEATORIC_ENTROPY, SAMPLE_ENTROPY, MUTUAL_INFORMATION)

_PALETTE = np.array(
    [[0, 0, 0], [255, 255, 255], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    dtype=np.uint8,
)


def colourise(labels: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8."""
    return _PALETTE[labels % len(_PALETTE)]


def heat(values: np.ndarray, high: float) -> np.ndarray:
    """(H, W) float in [0, high] -> (H, W, 3) uint8, black -> red -> yellow."""
    t = np.clip(values / max(high, 1e-8), 0, 1)
    return (np.stack([np.clip(2 * t, 0, 1), np.clip(2 * t - 1, 0, 1), np.zeros_like(t)], -1) * 255).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    unit = image.astype(np.float32) / (np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0)
    rgb = np.repeat(unit, 3, axis=2) if unit.shape[2] == 1 else unit
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def case_row(case: Case, out: dict[str, Tensor], max_samples: int = 6) -> tuple[list[np.ndarray], list[str]]:
    """One row: the image, the graders, samples and three uncertainty maps; ``out`` holds ``FIGURE_OUTPUTS``."""
    samples = out[LABELS].cpu().numpy()
    log_c = float(np.log(out[P_F].shape[0]))
    tiles = [_grey(case.image)] + [colourise(a) for a in case.labels] + [colourise(s) for s in samples[:max_samples]]
    tiles += [heat(out[name].cpu().numpy(), log_c) for name in (ALEATORIC_ENTROPY, SAMPLE_ENTROPY, MUTUAL_INFORMATION)]
    names = ["image"] + [f"grader {a}" for a in range(len(case.labels))] + [f"sample {i}" for i in range(min(max_samples, len(samples)))]
    names += ["H(p_F)", "H(mean)", "MI"]
    return tiles, names


def save_figure(rows: list[tuple[list[np.ndarray], list[str]]], path: Path, scale: int = 2) -> None:
    height = max(t.shape[0] for tiles, _ in rows for t in tiles)
    width = max(t.shape[1] for tiles, _ in rows for t in tiles)
    columns = max(len(tiles) for tiles, _ in rows)
    pad, header = 4, 14
    canvas = Image.new("RGB", (columns * (width * scale + pad), len(rows) * (height * scale + pad) + header), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(rows[0][1]):
        draw.text((c * (width * scale + pad) + 2, 1), name, fill=(230, 230, 230))
    for r, (tiles, _) in enumerate(rows):
        for c, tile in enumerate(tiles):
            im = Image.fromarray(tile).resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
            canvas.paste(im, (c * (width * scale + pad), header + r * (height * scale + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
