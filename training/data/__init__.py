"""Data sources behind one spec string: a folder in the folder format, ``lidc-sample`` or
``synthetic:{halo,flips}``. Each yields ``Case`` objects and knows its classes and channels."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from training.data.cases import Case, Event, KnownDistribution
from training.data.folder import DatasetError, FolderDataset
from training.data.lidc_sample import LidcSample, default_root


class Dataset(Protocol):
    @property
    def classes(self) -> tuple[str, ...]: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def description(self) -> dict[str, object]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Case: ...


def open_dataset(spec: str, split: str, length: int | None = None) -> Dataset:
    """``spec`` is a folder path, ``lidc-sample[:PATH]`` or ``synthetic:NAME``; ``length`` caps how
    many synthetic cases a pass visits (default: the split's usual size)."""
    if spec.startswith("synthetic:"):
        # imported here: the generators need scipy, which the `carseg` command (serve included)
        # would otherwise load at start-up for nothing
        from training.data.synthetic import DEFAULT_LENGTHS, GENERATORS, SyntheticDataset

        name = spec.split(":", 1)[1]
        if name not in GENERATORS:
            raise DatasetError(f"unknown synthetic generator {name!r}; expected one of {GENERATORS}")
        return SyntheticDataset(name, split, length or DEFAULT_LENGTHS[split])
    if spec == "lidc-sample" or spec.startswith("lidc-sample:"):
        root = Path(spec.split(":", 1)[1]) if ":" in spec else default_root()
        return LidcSample(root, split)
    root = Path(spec)
    if not root.is_dir():
        raise DatasetError(f"{spec}: not a folder, 'lidc-sample' or 'synthetic:NAME'")
    return FolderDataset(root, split)


__all__ = ["Case", "Dataset", "DatasetError", "Event", "KnownDistribution", "open_dataset"]
