"""The one in-memory shape every data source produces: an image, its annotators' label maps and,
for synthetic data, the true label distribution they were drawn from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Event:
    """One ambiguous object: all pixels of ``region`` take ``on_label`` with ``probability``,
    else ``off_label``, together (the paper's Cityscapes protocol)."""

    region: np.ndarray  # (H, W) bool
    kind: str
    probability: float
    on_label: int
    off_label: int


@dataclass(frozen=True)
class KnownDistribution:
    """A label distribution that is a fixed ``base`` map plus independent all-or-nothing events."""

    base: np.ndarray  # (H, W) uint8
    events: tuple[Event, ...]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n label maps (n, H, W) uint8 drawn from the distribution."""
        out = np.repeat(self.base[None], n, axis=0)
        for event in self.events:
            on = rng.random(n) < event.probability
            out[:, event.region] = np.where(on[:, None], event.on_label, event.off_label).astype(np.uint8)
        return out

    def modes(self, max_modes: int = 64) -> tuple[np.ndarray, np.ndarray] | None:
        """Every label map the distribution can give (M, H, W) uint8 with its probability (M,):
        2^events maps (32 for the Cityscapes protocol), or None when that exceeds ``max_modes``."""
        count = 2 ** len(self.events)
        if count > max_modes:
            return None
        maps = np.repeat(self.base[None], count, axis=0)
        weights = np.ones(count)
        for bit, event in enumerate(self.events):
            on = (np.arange(count) >> bit) & 1 == 1
            maps[:, event.region] = np.where(on[:, None], event.on_label, event.off_label).astype(np.uint8)
            weights *= np.where(on, event.probability, 1.0 - event.probability)
        return maps, weights

    def with_certain_pixels(self, maps: np.ndarray) -> np.ndarray:
        """``maps`` (n, H, W) with every pixel outside the events' regions set to ``base``: what a
        sampler would give if it got all that is certain right and kept its own ambiguous objects."""
        uncertain = np.zeros(self.base.shape, dtype=bool)
        for event in self.events:
            uncertain |= event.region
        return np.where(uncertain, maps, self.base[None]).astype(maps.dtype)

    def marginals(self, num_classes: int) -> np.ndarray:
        """Per-pixel class probabilities (C, H, W) float32."""
        probs = np.eye(num_classes, dtype=np.float32)[self.base].transpose(2, 0, 1).copy()
        for event in self.events:
            probs[:, event.region] = 0.0
            probs[event.on_label, event.region] += event.probability
            probs[event.off_label, event.region] += 1.0 - event.probability
        return probs


@dataclass(frozen=True)
class Case:
    case_id: str
    image: np.ndarray  # (H, W, C) uint8 or uint16
    labels: np.ndarray  # (A, H, W) uint8, pixel = class index, one map per annotator
    truth: KnownDistribution | None = field(default=None)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])
