"""Several data sources trained as one: ``SPEC+SPEC[+...]``, each part optionally ``SPEC@SHARE``.

Training draws each batch element's source by its share (equal by default), then a case of it
uniformly, so 19 real crops beside a million synthetic ones still make up their share of the
steps. A pass over the mixture (validation, evaluation) visits every part's cases once, in order.
The parts must agree on classes and channels: one network serves them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.data.cases import Case
from training.data.folder import DatasetError
from training.data.protocol import Dataset


def split_spec(spec: str) -> list[tuple[str, float]]:
    """``a@3+b`` -> [("a", 3.0), ("b", 1.0)]; a spec without ``+`` is one part of share 1."""
    parts = []
    for item in spec.split("+"):
        name, at, share = item.rpartition("@") if "@" in item else (item, "", "")
        if not name:
            raise DatasetError(f"{spec}: empty part in a mixture")
        try:
            weight = float(share) if at else 1.0
        except ValueError as exc:
            raise DatasetError(f"{spec}: share {share!r} of {name!r} is not a number") from exc
        if not weight > 0:
            raise DatasetError(f"{spec}: share of {name!r} must be > 0, not {share}")
        parts.append((name, weight))
    return parts


@dataclass(frozen=True)
class Mixture:
    parts: tuple[Dataset, ...]
    shares: tuple[float, ...]  # normalised to sum to 1

    def __post_init__(self) -> None:
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.classes, part.in_channels) != (first.classes, first.in_channels):
                raise DatasetError(
                    f"a mixture's parts must agree: {part.description['source']} has classes {part.classes} on "
                    f"{part.in_channels} channels, {first.description['source']} {first.classes} on {first.in_channels}"
                )
        # where each part's cases begin in the mixture's index
        object.__setattr__(self, "_starts", np.cumsum([0] + [len(p) for p in self.parts]))

    @classmethod
    def of(cls, parts: Sequence[Dataset], weights: Sequence[float]) -> Mixture:
        total = float(sum(weights))
        return cls(tuple(parts), tuple(w / total for w in weights))

    @property
    def classes(self) -> tuple[str, ...]:
        return self.parts[0].classes

    @property
    def in_channels(self) -> int:
        return self.parts[0].in_channels

    @property
    def description(self) -> dict[str, object]:
        return {
            "source": "+".join(str(p.description["source"]) for p in self.parts),
            "parts": [{**p.description, "share": round(s, 4)} for p, s in zip(self.parts, self.shares, strict=True)],
        }

    def __len__(self) -> int:
        return int(self._starts[-1])  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> Case:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self._starts, index, side="right")) - 1  # type: ignore[attr-defined]
        return self.parts[part][index - int(self._starts[part])]  # type: ignore[attr-defined]

    def draw(self, rng: np.random.Generator) -> int:
        """An index into the mixture: a part by its share, then one of its cases uniformly."""
        part = int(rng.choice(len(self.parts), p=self.shares))
        return int(self._starts[part]) + int(rng.integers(len(self.parts[part])))  # type: ignore[attr-defined]
