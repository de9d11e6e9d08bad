"""The LIDC sample the repository ships in ``data/lidc-sample``: ``{training,testing}/<case>/image_<n>.jpg`` and
``label0_.jpg``..``label3_.jpg`` (JPEG, so binarised with ``pixel > 127``; an all-black mask is a
grader who marked no nodule). ``train`` and ``val`` read the 19 ``training`` crops, ``test`` the 9
``testing`` ones: the sample is far too small to hold out a third part, and selecting versions on
the test crops would leak them into the test score. Validating on the training crops cannot pick
the version that generalises best; on a set this small it mostly guards against divergence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.cases import Case
from training.data.folder import DatasetError

CLASSES = ("background", "nodule")
_SPLIT_DIRS = {"train": "training", "val": "training", "test": "testing"}


def default_root() -> Path:
    """``$CARSEG_LIDC_SAMPLE``, else the copy in the repository's ``data/`` (a fresh clone has it)."""
    env = os.environ.get("CARSEG_LIDC_SAMPLE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data" / "lidc-sample"


@dataclass(frozen=True)
class LidcSample:
    root: Path
    split: str

    def __post_init__(self) -> None:
        if self.split not in _SPLIT_DIRS:
            raise DatasetError(f"unknown split {self.split!r}; expected one of {tuple(_SPLIT_DIRS)}")
        split_dir = self.root / _SPLIT_DIRS[self.split]
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: LIDC sample not found (set CARSEG_LIDC_SAMPLE)")
        object.__setattr__(self, "_cases", sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name) if p.name.isdigit() else p.name))

    classes = CLASSES
    in_channels = 1

    @property
    def description(self) -> dict[str, object]:
        return {"source": "lidc-sample", "split": self.split, "cases": len(self), "annotators": 4}

    def __len__(self) -> int:
        return len(self._cases)  # type: ignore[attr-defined]

    def image_path(self, index: int) -> Path:
        """The case's CT crop as shipped (a JPEG), for whoever sends the file itself, as a viewer does."""
        case_dir: Path = self._cases[index]  # type: ignore[attr-defined]
        images = sorted(case_dir.glob("image_*.jpg"))
        if len(images) != 1:
            raise DatasetError(f"{case_dir}: expected one image_<n>.jpg, found {len(images)}")
        return images[0]

    def __getitem__(self, index: int) -> Case:
        case_dir: Path = self._cases[index]  # type: ignore[attr-defined]
        image = np.asarray(Image.open(self.image_path(index)).convert("L"))[:, :, None]
        label_paths = sorted(case_dir.glob("label*_.jpg"))
        if not label_paths:
            raise DatasetError(f"{case_dir}: no label<a>_.jpg")
        labels = np.stack([(np.asarray(Image.open(p).convert("L")) > 127).astype(np.uint8) for p in label_paths])
        if labels.shape[1:] != image.shape[:2]:
            raise DatasetError(f"{label_paths[0]}: label shape {labels.shape[1:]} differs from the image's {image.shape[:2]}")
        return Case(f"lidc-{case_dir.name}", image, labels)
