"""Synthetic data whose true label distribution is known, so calibration can be measured exactly.

``halo``  binary, LIDC-like: 128x128 grayscale crops of a lung-like texture (parenchyma, vessels,
          often soft tissue) centred on one nodule. A solid nodule's core is always annotated; a
          rim, when it has one, is annotated, all of it or none, with a probability set by how
          bright the rim is relative to the core (faint rim 0.3, bright rim 0.7). A faint nodule
          with no solid core is annotated at all with probability 0.5 (the empty-mask readings
          LIDC graders give).
``flips`` multi-class shapes on colour noise, 64x64 RGB: each shape class relabels, all pixels
          together, to a twin class with a known probability (the paper's Cityscapes protocol).
``cells`` 64x64 RGB fields of 2-4 cells of three types whose doubt is read from the image: a cell's
          colour mixes two types' colours and says how likely each label is (``training.data.cells``).
``cells_rare`` the same, but a mixed cell's second reading is rare (p 0.05 or 0.95) or even (0.5).

Every case is a pure function of (generator, split, index), so data sets are reproducible and
unbounded; four annotators per case are drawn from the true distribution, as LIDC has four graders.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import ndimage

from training.data.cases import Case, Event, KnownDistribution
from training.data.cells import CELL_CLASSES, CELL_KINDS, RARE_CELL_KINDS, RARE_COLOUR_JITTER, RARE_MIX_LEVELS, draw_cells

ANNOTATORS = 4
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
HALO_CLASSES = ("background", "nodule")
HALO_KINDS = {"rim_faint": 0.3, "rim_bright": 0.7, "faint_nodule": 0.5}
FLIP_SHAPES = ("disc", "square", "triangle", "ring")
FLIP_PROBABILITIES = (8 / 17, 7 / 17, 5 / 17, 4 / 17)
FLIP_CLASSES = ("background", *FLIP_SHAPES, *(f"{s}_twin" for s in FLIP_SHAPES))
_PARENCHYMA = 12.0  # the lung's mean intensity, as in the LIDC sample's crops
_FLIP_COLOURS = np.array([[220, 60, 60], [60, 200, 70], [70, 90, 230], [230, 200, 50]], dtype=np.float32)


def _rng(generator: str, split: str, index: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, and cases must be reproducible.
    return np.random.default_rng([zlib.crc32(generator.encode()), SPLIT_SEEDS[split], index])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _blob_radius(rng: np.random.Generator, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Normalised radial coordinate of a lumpy blob: < 1 inside, = 1 on its boundary."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = 1.0 + sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(yy - cy, xx - cx) / (radius * wobble)


def _vessels(rng: np.random.Generator, size: int) -> np.ndarray:
    """How much of the slice's thickness is vessel at each pixel, in [0, 1]: long tapering vessels
    (80-240 px) with side branches in the slice, short straight pieces of vessels that cross it
    obliquely, and round cross-sections of vessels seen end on, radius 1-3 px (the classic nodule
    look-alikes). Along the vessels radii are up to 1.6 px, tapering below half a pixel. A vessel of
    radius r fills the chord 2 sqrt((r + 1/2)^2 - d^2) of a slice 4 px thick at distance d from its
    centre line (the half pixel: centres are rounded to pixels), so a vessel thinner than 1.5 px
    never shows its full contrast (partial volume) and thick ones have soft edges."""
    centres: list[np.ndarray] = []
    radii: list[np.ndarray] = []

    def walk(start: np.ndarray, angle: float, steps: int, r_start: float, r_end: float) -> tuple[np.ndarray, np.ndarray]:
        # a random walk with momentum, one pixel a step
        angles = angle + np.cumsum(rng.normal(0, 0.12, steps))
        path = start + np.cumsum(np.stack([np.sin(angles), np.cos(angles)], axis=1), axis=0)
        centres.append(path)
        radii.append(np.linspace(r_start, r_end, steps))
        return path, angles

    for _ in range(rng.integers(3, 7)):
        r_start = rng.uniform(0.4, 1.6)
        path, angles = walk(rng.uniform(0, size, 2), rng.uniform(0, 2 * np.pi), int(rng.integers(80, 240)), r_start, 0.4 * r_start)
        widths = radii[-1]
        for _ in range(rng.integers(0, 3)):  # side branches, thinner than the vessel where they leave it
            at = int(rng.integers(len(path)))
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
            walk(path[at], angles[at] + turn, int(rng.integers(20, 80)), 0.6 * widths[at], 0.3)
    # short straight pieces, 2-9 px, of vessels that cross the slice obliquely
    pieces = int(rng.integers(15, 40))
    angle = rng.uniform(0, 2 * np.pi, pieces)
    steps = np.arange(10)
    along = rng.uniform(0, size, (pieces, 1, 2)) + steps[None, :, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)[:, None]
    drawn = steps[None] < rng.integers(2, 10, pieces)[:, None]
    centres.append(along[drawn])
    radii.append(np.repeat(rng.uniform(0.3, 0.8, (pieces, 1)), len(steps), axis=1)[drawn])
    ends = int(rng.integers(3, 10))  # cross-sections: one centre each
    centres.append(rng.uniform(0, size, (ends, 2)))
    radii.append(rng.uniform(1.0, 3.0, ends))
    points = np.round(np.concatenate(centres)).astype(np.int64)
    reach = (np.concatenate(radii) + 0.5) ** 2
    inside = ((points >= 0) & (points < size)).all(axis=1)
    squared = np.full((size, size), -100.0)
    np.maximum.at(squared, (points[inside, 0], points[inside, 1]), reach[inside])
    # max over centres of (r + 1/2)^2 - d^2, a dilation by -d^2 that splits into rows then columns
    # (3.5 px, the widest reach, needs offsets to 3)
    offsets = -(np.arange(-3, 4, dtype=np.float64) ** 2)
    depth = ndimage.grey_dilation(ndimage.grey_dilation(squared, structure=offsets[None, :]), structure=offsets[:, None])
    return np.minimum(1.0, np.sqrt(np.clip(depth, 0.0, None)) / 2.0)  # chord / 4 px


def _lung_background(rng: np.random.Generator, size: int, wall_side: int | None, wall_edge: float | None) -> np.ndarray:
    """Parenchyma, vessels (``_vessels``: never annotated), and often soft tissue (chest wall with
    ribs, or a mediastinum) at the intensities of the LIDC sample's JPEG crops (measured on its 28
    crops): parenchyma ~12 (5th-95th percentile 4-20 there, 3-21 here), vessels 100-130 above it
    at full contrast, soft tissue anywhere in 55-115 (the sample's crops come in more than one
    window) and ribs 130-180. ``wall_side``/``wall_edge`` place a wall the caller wants (a
    juxtapleural nodule); None draws one at random, or none."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = _PARENCHYMA + 5 * _smooth_noise(rng, (size, size), 4) + 4 * rng.standard_normal((size, size))
    img += rng.uniform(100, 130) * _vessels(rng, size)
    if wall_side is None and rng.random() < 0.6:
        wall_side, wall_edge = int(rng.integers(4)), float(rng.uniform(6, 40))
    if wall_side is not None and wall_edge is not None:
        # a soft-tissue band behind a smooth curved boundary on one side, often with ribs
        coord = [xx, yy, size - 1 - xx, size - 1 - yy][wall_side]
        other = [yy, xx, yy, xx][wall_side]
        edge = wall_edge + rng.uniform(2, 6) * np.sin(other / size * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6))
        wall = coord < edge
        level = rng.uniform(55, 115)
        img = np.where(wall, level + 6 * _smooth_noise(rng, (size, size), 2), img)
        for _ in range(rng.integers(0, 3)):
            depth = rng.uniform(4, 30)
            rib = wall & (np.abs(coord - edge + depth + 3 * np.sin(other / rng.uniform(8, 20))) < rng.uniform(1.5, 3.5))
            img = np.where(rib, rng.uniform(130, 180), img)
    elif rng.random() < 0.4:
        # mediastinum-like mass entering from a corner
        cy, cx = rng.choice([-20.0, size + 20.0], 2)
        mass = np.hypot(yy - cy, xx - cx) < rng.uniform(40, 70)
        img = np.where(mass, rng.uniform(55, 115) + 6 * _smooth_noise(rng, (size, size), 3), img)
    return img


def draw_halo(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, KnownDistribution]:
    """One LIDC-like crop, centred on its lesion as LIDC crops are. A quarter each: a solid nodule
    without rim (always annotated; a quarter of those touch the chest wall), a solid core with a
    bright or a faint rim, and a faint nodule with no core."""
    cy, cx = size / 2 + rng.uniform(-6, 6, 2)
    kind = ("solid", "rim_bright", "rim_faint", "faint_nodule")[int(rng.integers(4))]
    radius = rng.uniform(3, 10) if kind != "faint_nodule" else rng.uniform(2.5, 8)
    wall_side = wall_edge = None
    if kind == "solid" and rng.random() < 0.25:
        # juxtapleural: the wall's boundary runs through the nodule, which bulges into the lung
        wall_side = int(rng.integers(4))
        wall_edge = [cx, cy, size - 1 - cx, size - 1 - cy][wall_side] - radius * rng.uniform(0.2, 0.6)
    img = _lung_background(rng, size, wall_side, wall_edge)
    base = np.zeros((size, size), np.uint8)
    events: list[Event] = []
    core_level = rng.uniform(70, 130)
    if kind == "faint_nodule":
        lesion = _blob_radius(rng, size, cy, cx, radius) < 1.0
        img = np.where(lesion, rng.uniform(30, 48) + 4 * rng.standard_normal((size, size)), img)
        events.append(Event(lesion, kind, HALO_KINDS[kind], on_label=1, off_label=0))
    else:
        rho = _blob_radius(rng, size, cy, cx, radius)
        core = rho < 1.0
        if kind != "solid":
            # the rim's brightness relative to the core (not its absolute level, which the window sets)
            # says how likely a grader includes it
            rim_width = rng.uniform(2.5, 4.5)
            rim = (~core) & (rho < 1.0 + rim_width / radius)
            share = 0.68 if kind == "rim_bright" else 0.40
            img = np.where(rim, _PARENCHYMA + share * (core_level - _PARENCHYMA) + 4 * rng.standard_normal((size, size)), img)
            events.append(Event(rim, kind, HALO_KINDS[kind], on_label=1, off_label=0))
        img = np.where(core, core_level + 6 * rng.standard_normal((size, size)), img)
        base[core] = 1
    img = ndimage.gaussian_filter(img, 0.7)
    image = np.clip(img, 0, 255).astype(np.uint8)[:, :, None]
    return image, KnownDistribution(base, tuple(events))


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        return np.hypot(dy, dx) < r
    if shape == "square":
        return (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
    if shape == "triangle":
        return (dy < r * 0.7) & (dy > -r + 2 * np.abs(dx) * 0.9)
    if shape == "ring":
        d = np.hypot(dy, dx)
        return (d < r) & (d > r * 0.5)
    raise ValueError(f"unknown shape {shape!r}")


def draw_flips(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, KnownDistribution]:
    img = 110 + 25 * np.stack([_smooth_noise(rng, (size, size), 3) for _ in range(3)], axis=-1)
    img += 12 * rng.standard_normal((size, size, 3))
    base = np.zeros((size, size), np.uint8)
    events: list[Event] = []
    n_shapes = len(FLIP_SHAPES)
    for cls in rng.choice(n_shapes, size=int(rng.integers(1, 4)), replace=False):
        for _ in range(20):  # place without overlapping an earlier shape
            r = rng.uniform(7, 12)
            cy, cx = rng.uniform(r, size - r, 2)
            mask = _shape_mask(FLIP_SHAPES[cls], size, cy, cx, r)
            if not (mask & (base > 0)).any():
                break
        else:
            continue
        colour = _FLIP_COLOURS[cls] + rng.normal(0, 12, 3)
        img[mask] = colour + 10 * rng.standard_normal((int(mask.sum()), 3))
        base[mask] = cls + 1
        events.append(Event(mask, FLIP_SHAPES[cls], FLIP_PROBABILITIES[cls], on_label=cls + 1 + n_shapes, off_label=cls + 1))
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, KnownDistribution(base, tuple(events))


@dataclass(frozen=True)
class Generator:
    """One generator: how it draws an image and its true distribution from a seeded rng, the
    classes and channels of what it draws, and its event kinds with their probabilities."""

    draw: Callable[[np.random.Generator], tuple[np.ndarray, KnownDistribution]]
    classes: tuple[str, ...]
    in_channels: int
    kinds: Mapping[str, float]


_GENERATORS = {
    "halo": Generator(draw_halo, HALO_CLASSES, 1, HALO_KINDS),
    "flips": Generator(draw_flips, FLIP_CLASSES, 3, dict(zip(FLIP_SHAPES, FLIP_PROBABILITIES, strict=True))),
    "cells": Generator(draw_cells, CELL_CLASSES, 3, CELL_KINDS),
    "cells_rare": Generator(partial(draw_cells, levels=RARE_MIX_LEVELS, colour_jitter=RARE_COLOUR_JITTER), CELL_CLASSES, 3, RARE_CELL_KINDS),
}
GENERATORS = tuple(_GENERATORS)


def synthetic_case(generator: str, split: str, index: int) -> Case:
    """Case ``index`` of ``split``: the image and truth, then the annotators, from one seeded rng."""
    rng = _rng(generator, split, index)
    image, truth = _GENERATORS[generator].draw(rng)
    return Case(f"{generator}-{split}-{index}", image, truth.sample(rng, ANNOTATORS), truth)


@dataclass(frozen=True)
class SyntheticDataset:
    """An unbounded synthetic data set; ``length`` only sets how many cases a pass visits."""

    generator: str
    split: str
    length: int

    @property
    def classes(self) -> tuple[str, ...]:
        return _GENERATORS[self.generator].classes

    @property
    def in_channels(self) -> int:
        return _GENERATORS[self.generator].in_channels

    @property
    def description(self) -> dict[str, object]:
        kinds = dict(_GENERATORS[self.generator].kinds)
        return {"source": f"synthetic:{self.generator}", "split": self.split, "annotators": ANNOTATORS, "event_probabilities": kinds}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Case:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return synthetic_case(self.generator, self.split, index)


DEFAULT_LENGTHS = {"train": 1_000_000, "val": 48, "test": 200}
