"""A figure of cases side by side: image, annotators, samples and uncertainty maps, one row per
case, drawn with PIL (no plotting stack to install)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from training.data import Case
from training.metrics import Reliability
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


def save_figure(rows: list[tuple[list[np.ndarray], list[str]]], path: Path, scale: int = 2, footer: list[np.ndarray] | None = None) -> None:
    """Rows of tiles at ``scale``, with ``footer`` tiles (e.g. reliability diagrams) at their own
    size in one row below."""
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
    if footer:
        canvas = _below(canvas, footer, pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def reliability_tile(diagram: Reliability, title: str, size: int = 220) -> np.ndarray:
    """A reliability diagram as an (H, W, 3) tile: per bin, a bar up to the observed frequency
    over the diagonal (perfect calibration), a dot at the mean predicted probability, and the
    bin's pixel count above it, so a gap in a bin of a handful of pixels reads as what it is."""
    pad, top = 24, 16
    canvas = Image.new("RGB", (size, size + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    side = size - 2 * pad
    x0, y0 = pad, top + pad + side  # the origin, bottom left

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + x * side, y0 - y * side

    draw.rectangle([at(0, 1), at(1, 0)], outline=(0, 0, 0))
    draw.line([at(0, 0), at(1, 1)], fill=(150, 150, 150))
    bins = len(diagram.counts)
    for b in range(bins):
        if diagram.counts[b] == 0:
            continue
        left, right = b / bins, (b + 1) / bins
        draw.rectangle([at(left, diagram.frequency[b]), at(right, 0)], fill=(90, 140, 220), outline=(40, 70, 150))
        cx, cy = at(float(diagram.confidence[b]), float(diagram.frequency[b]))
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(220, 60, 40))
        count = int(diagram.counts[b])
        label = f"{count / 1000:.0f}k" if count >= 10_000 else str(count)
        draw.text((at(left, 0)[0] + 1, top + 2 + (b % 2) * 9), label, fill=(60, 60, 60))
    draw.text((2, 1), f"{title}  ECE {diagram.ece:.3f}", fill=(0, 0, 0))
    draw.text((x0, y0 + 4), "predicted p", fill=(0, 0, 0))
    return np.asarray(canvas)


def _below(canvas: Image.Image, tiles: list[np.ndarray], pad: int) -> Image.Image:
    row_height = max(t.shape[0] for t in tiles)
    width = max(canvas.width, sum(t.shape[1] + pad for t in tiles))
    out = Image.new("RGB", (width, canvas.height + row_height + pad), (40, 40, 40))
    out.paste(canvas, (0, 0))
    x = 0
    for tile in tiles:
        out.paste(Image.fromarray(tile), (x, canvas.height + pad))
        x += tile.shape[1] + pad
    return out
