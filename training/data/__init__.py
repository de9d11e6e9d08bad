"""Data sources behind one spec string: a folder in the folder format, ``lidc-sample``,
``synthetic:{halo,flips,cells,cells_rare}``, or a literature data set in its published on-disk format:
``lidc-v2:PATH`` (Kohl et al.'s 180x180 PNG crops), ``lidc-v1:PATH`` (the PHiSeg/SSN pickle) and
``cityscapes:PATH`` (Cityscapes with injected ambiguity). Each yields ``Case`` objects and knows its
classes and channels. ``SPEC+SPEC`` trains on several at once (``training.data.mixture``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.cases import Case, Event, KnownDistribution
from training.data.folder import DatasetError, FolderDataset
from training.data.lidc_sample import LidcSample, default_root
from training.data.mixture import Mixture, split_spec
from training.data.protocol import Dataset


def draw_indices(dataset: Dataset, rng: np.random.Generator, count: int) -> list[int]:
    """A training batch's cases: by the parts' shares in a mixture, else uniform over the cases."""
    if isinstance(dataset, Mixture):
        return [dataset.draw(rng) for _ in range(count)]
    return [int(i) for i in rng.integers(0, len(dataset), count)]


def open_dataset(spec: str, split: str, length: int | None = None) -> Dataset:
    """``spec`` is ``SPEC+SPEC[+...]`` (a mixture, each part optionally ``SPEC@SHARE``), or one of:
    a folder path, ``lidc-sample[:PATH]``, ``synthetic:NAME``, ``lidc-v2:PATH`` (the
    crops' root holding ``{train,val,test}/{images,gt}``), ``lidc-v1:PATH`` (``data_lidc.pickle``
    itself) or ``cityscapes:PATH`` (the root holding ``leftImg8bit/`` and ``gtFine/``); ``length``
    caps how many synthetic cases a pass visits (default: the split's usual size)."""
    if "+" in spec and not Path(spec).is_dir():  # a folder whose name holds a "+" is still a folder
        parts = split_spec(spec)
        return Mixture.of([_open_one(name, split, length) for name, _ in parts], [share for _, share in parts])
    return _open_one(spec, split, length)


def _open_one(spec: str, split: str, length: int | None) -> Dataset:
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
    protocol, _, path = spec.partition(":")
    if protocol in ("lidc-v2", "lidc-v1", "cityscapes"):
        # the literature's data sets, each read from its published on-disk format
        from training.data.cityscapes import Cityscapes
        from training.data.lidc_v1 import LidcV1
        from training.data.lidc_v2 import LidcV2

        if not path:
            raise DatasetError(f"{spec}: expected {protocol}:PATH")
        loaders: dict[str, type[Dataset]] = {"lidc-v2": LidcV2, "lidc-v1": LidcV1, "cityscapes": Cityscapes}
        return loaders[protocol](Path(path), split)
    root = Path(spec)
    if not root.is_dir():
        raise DatasetError(f"{spec}: not a folder, 'lidc-sample', 'synthetic:NAME', 'lidc-v2:PATH', 'lidc-v1:PATH' or 'cityscapes:PATH'")
    return FolderDataset(root, split)


__all__ = ["Case", "Dataset", "DatasetError", "Event", "KnownDistribution", "Mixture", "draw_indices", "open_dataset"]
