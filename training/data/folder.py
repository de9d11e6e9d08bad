"""The folder format any user can write for their own multi-annotator data:

    ROOT/classes.json                       ["background", "nodule", ...]  (pixel value = index)
    ROOT/{train,val,test}/<case>/image.png  8- or 16-bit, 1 or 3 channels
    ROOT/{train,val,test}/<case>/label_<a>.png   one per annotator (>= 1), pixel = class index

Files and folders the format does not know are ignored. A malformed case raises
``DatasetError`` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.cases import Case

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A data set on disk does not follow its format."""


def read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.json"
    try:
        classes = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: missing (a JSON list of class names)") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{path}: must be a list of at least two class names, got {classes!r}")
    return tuple(classes)


def read_image(path: Path) -> np.ndarray:
    """An image file -> (H, W, C) uint8 or uint16 with C in {1, 3}."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(im).astype(np.uint16)
            elif im.mode in ("L", "RGB"):
                array = np.asarray(im)
            elif im.mode in ("LA", "P", "RGBA"):
                array = np.asarray(im.convert("RGB"))
            else:
                raise DatasetError(f"{path}: unsupported image mode {im.mode}")
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    return array[:, :, None] if array.ndim == 2 else array


def read_label(path: Path, num_classes: int, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            label = np.asarray(im)
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    if label.ndim != 2:
        raise DatasetError(f"{path}: a label map must have one channel, got shape {label.shape}")
    if label.shape != shape:
        raise DatasetError(f"{path}: label shape {label.shape} differs from the image's {shape}")
    if label.max() >= num_classes:
        raise DatasetError(f"{path}: pixel value {int(label.max())} is not a class index (< {num_classes})")
    return label.astype(np.uint8)


@dataclass(frozen=True)
class FolderDataset:
    root: Path
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DatasetError(f"unknown split {self.split!r}; expected one of {SPLITS}")
        object.__setattr__(self, "_classes", read_classes(self.root))
        split_dir = self.root / self.split
        cases = sorted(p for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []
        if not cases:
            raise DatasetError(f"{split_dir}: no cases")
        object.__setattr__(self, "_cases", cases)
        first = read_image(cases[0] / "image.png") if (cases[0] / "image.png").exists() else None
        object.__setattr__(self, "_channels", first.shape[2] if first is not None else 1)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes  # type: ignore[attr-defined]

    @property
    def in_channels(self) -> int:
        return self._channels  # type: ignore[attr-defined]

    @property
    def description(self) -> dict[str, object]:
        return {"source": f"folder:{self.root.name}", "split": self.split, "cases": len(self)}

    def __len__(self) -> int:
        return len(self._cases)  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> Case:
        case_dir: Path = self._cases[index]  # type: ignore[attr-defined]
        image_path = case_dir / "image.png"
        if not image_path.exists():
            raise DatasetError(f"{image_path}: missing")
        image = read_image(image_path)
        if image.shape[2] != self.in_channels:
            raise DatasetError(f"{image_path}: {image.shape[2]} channels, the data set has {self.in_channels}")
        label_paths = sorted(case_dir.glob("label_*.png"))
        if not label_paths:
            raise DatasetError(f"{case_dir}: no label_<annotator>.png")
        labels = np.stack([read_label(p, len(self.classes), image.shape[:2]) for p in label_paths])
        return Case(case_dir.name, image, labels)


def write_case(split_dir: Path, case: Case) -> None:
    case_dir = split_dir / case.case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    image = case.image[:, :, 0] if case.image.shape[2] == 1 else case.image
    Image.fromarray(image).save(case_dir / "image.png")
    for a, label in enumerate(case.labels):
        Image.fromarray(label).save(case_dir / f"label_{a}.png")


def write_classes(root: Path, classes: tuple[str, ...]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(list(classes)) + "\n")
