"""LIDC-IDRI, protocol v2: Kohl et al.'s 2D crops (Probabilistic U-Net 2018, released with the
Hierarchical Probabilistic U-Net 2019; used by Prob. U-Net, HPU-Net, CAR, CCDM). Spec ``lidc-v2:PATH``.

On-disk format of the public release (the ``hpunet-data/lidc_crops`` bucket, one tar.gz per split)::

    PATH/{train,val,test}/images/LIDC-IDRI-XXXX/z-<imageZposition>_c<crop>.png
    PATH/{train,val,test}/gt/LIDC-IDRI-XXXX/z-<imageZposition>_c<crop>_l<grader>.png

Crops are 180x180 (CT resampled to 0.5 mm in-plane, centred on the abnormality); four graders each;
the release's own split is 8843 / 1993 / 1980 images over 530 / 111 / 103 patients (70:15:15 by
patient), and we use it as is.

Assumptions, and what they rest on:

- Grader suffixes ``_l0``..``_l3``: the layout every public loader of this release lists. The
  release README says "labeller id in [1,4]", so ``_l1``..``_l4`` is accepted too when no ``_l0``
  file exists.
- Masks are 0/255 8-bit PNGs (the CAR loader maps 255 -> 1); any value > 0 is taken as nodule, so a
  0/1 mask reads the same. An all-zero mask is a grader who marked nothing there: kept, as in the
  literature.
- Images are 8-bit grey PNGs; an RGB/palette PNG is reduced to grey (its channels are identical).
- Each split folder is what the tar.gz unpacks to, moved so that ``images/`` and ``gt/`` sit directly
  under ``PATH/<split>`` (the CAR repository nests them one level deeper; point PATH accordingly).
- Centre crop 180 -> 128 at offset ``(size - 128) // 2`` = 26, as the CAR loader does; a crop of any
  size >= 128 is accepted and centre-cropped the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.cases import Case
from training.data.folder import SPLITS, DatasetError

CLASSES = ("background", "nodule")
CROP = 128
GRADERS = 4
_GRADER_IDS = ((0, 1, 2, 3), (1, 2, 3, 4))  # the files' convention, then the README's


def centre_crop(array: np.ndarray, size: int = CROP) -> np.ndarray:
    """The central ``size`` x ``size`` window of an (H, W, ...) array; the offset rounds down, so a
    180 crop keeps rows/columns 26..153."""
    height, width = array.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return array[top : top + size, left : left + size]


def _read_grey(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB", "RGBA", "P", "LA", "1"):
                raise DatasetError(f"{path}: unsupported PNG mode {im.mode} (expected 8-bit grey)")
            return np.asarray(im.convert("L"))
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc


def grader_paths(gt_dir: Path, stem: str) -> list[Path]:
    """The four grader masks of one crop, in grader order; DatasetError names the first missing one."""
    zero_based, one_based = ([gt_dir / f"{stem}_l{g}.png" for g in ids] for ids in _GRADER_IDS)
    # _l4 only exists under the README's 1-based naming; otherwise report against the usual _l0.._l3
    paths = one_based if not zero_based[0].exists() and one_based[-1].exists() else zero_based
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetError(f"{missing[0]}: grader mask missing ({len(missing)} of {GRADERS} absent for crop {stem})")
    return paths


@dataclass(frozen=True)
class LidcV2:
    """One split of the v2 crops; a case is (patient, crop), read lazily."""

    root: Path
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DatasetError(f"unknown split {self.split!r}; expected one of {SPLITS}")
        split_dir = self.root / self.split
        for sub in ("images", "gt"):
            if not (split_dir / sub).is_dir():
                raise DatasetError(f"{split_dir / sub}: missing (LIDC v2 expects PATH/{{train,val,test}}/{{images,gt}}/<patient>/)")
        items = sorted((patient.name, png.stem) for patient in (split_dir / "images").iterdir() if patient.is_dir() for png in patient.glob("*.png"))
        if not items:
            raise DatasetError(f"{split_dir / 'images'}: no <patient>/<crop>.png files")
        object.__setattr__(self, "_items", items)

    classes = CLASSES
    in_channels = 1

    @property
    def description(self) -> dict[str, object]:
        return {
            "source": "lidc-v2",
            "root": str(self.root),
            "split": self.split,
            "cases": len(self),
            "patients": len({patient for patient, _ in self._items}),  # type: ignore[attr-defined]
            "annotators": GRADERS,
        }

    def __len__(self) -> int:
        return len(self._items)  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> Case:
        patient, stem = self._items[index]  # type: ignore[attr-defined]
        image_path = self.root / self.split / "images" / patient / f"{stem}.png"
        image = _read_grey(image_path)
        if min(image.shape) < CROP:
            raise DatasetError(f"{image_path}: {image.shape[1]}x{image.shape[0]} is smaller than the {CROP}x{CROP} centre crop")
        masks = []
        for path in grader_paths(self.root / self.split / "gt" / patient, stem):
            mask = _read_grey(path)
            if mask.shape != image.shape:
                raise DatasetError(f"{path}: mask shape {mask.shape} differs from the image's {image.shape} ({image_path.name})")
            masks.append(centre_crop(mask) > 0)
        labels = np.stack(masks).astype(np.uint8)
        return Case(f"{patient}_{stem}", np.ascontiguousarray(centre_crop(image))[:, :, None], labels)
