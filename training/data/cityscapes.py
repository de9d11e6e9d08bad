"""Cityscapes with injected ambiguity (Kohl et al. 2018's protocol, used by Kassapis et al.'s CAR).
Spec ``cityscapes:PATH`` with PATH the Cityscapes root as the official packages unpack
(``leftImg8bit_trainvaltest.zip``, ``gtFine_trainvaltest.zip``)::

    PATH/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png   8-bit RGB
    PATH/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     8-bit, pixel = labelId

Labels: labelIds -> the 19 trainIds with the table of cityscapesScripts' ``helpers/labels.py``
(``LABEL_TO_TRAIN`` below, copied from it); ids it maps to 255 (unlabeled, ego vehicle, parking,
guard rail, caravan, ...) and ids it does not list are void. Our class index is trainId + 1: index 0
is ``void`` (pixels nobody should be scored on: our metrics' classes of interest are every class
but 0), 1..19 road..bicycle, 20..24 the twins ``sidewalk_2 person_2 car_2 vegetation_2 road_2``.

Ambiguity: per image and per class, ALL pixels of sidewalk / person / car / vegetation / road take
the twin class together, with probability 8/17, 7/17, 6/17, 5/17, 4/17 (``FLIP_PROBABILITIES``).
``Case.truth`` holds that distribution exactly (one event per flippable class present in the image),
and ``Case.labels`` are four annotators drawn from it with a per-case seed, so they never change.

Size: x0.25 (2048x1024 -> 512x256) as CAR's preprocessing does: image bilinear, labels nearest (the
label map is converted to class indices first; nearest keeps them exact). The target is
``(H // 4, W // 4)`` of the file, so small fixtures work too.

Splits: the official test split has no public labels. Like Kohl et al. and CAR, our ``test`` is the
official ``val`` (500 images) and our ``val`` is the training cities Darmstadt, Mönchengladbach and
Ulm (274 images; CAR's ``move_bb_preds.py`` moves exactly these), held out of our ``train``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.cases import Case, Event, KnownDistribution
from training.data.folder import SPLITS, DatasetError

# cityscapesScripts helpers/labels.py: labelId -> trainId for every id with trainId != 255
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
TRAIN_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
FLIP_PROBABILITIES: dict[str, float] = {"sidewalk": 8 / 17, "person": 7 / 17, "car": 6 / 17, "vegetation": 5 / 17, "road": 4 / 17}
TWINS: dict[str, str] = {name: f"{name}_2" for name in FLIP_PROBABILITIES}
CLASSES = ("void", *TRAIN_CLASSES, *TWINS.values())
# (class index, twin index, probability) per flippable class, in FLIP_PROBABILITIES' order
FLIP_TABLE: tuple[tuple[int, int, float], ...] = tuple((CLASSES.index(c), CLASSES.index(TWINS[c]), p) for c, p in FLIP_PROBABILITIES.items())

VOID = 0
ANNOTATORS = 4
SCALE = 4
VAL_CITIES = ("darmstadt", "monchengladbach", "ulm")  # held out of the official train split
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
_SEED = zlib.crc32(b"cityscapes")  # crc32, not hash(): str hashes are salted per process
_OFFICIAL = {"train": "train", "val": "train", "test": "val"}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def _lookup() -> np.ndarray:
    table = np.full(256, VOID, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        table[label_id] = train_id + 1
    return table


_LUT = _lookup()


def to_classes(label_ids: np.ndarray) -> np.ndarray:
    """A labelIds map (H, W) uint8 -> our class indices (void 0, road 1 .. bicycle 19)."""
    return _LUT[label_ids]


def truth_of(base: np.ndarray) -> KnownDistribution:
    """The injected-ambiguity distribution of one class map: one all-or-nothing event per
    flippable class present."""
    events = []
    for index, twin, probability in FLIP_TABLE:
        region = base == index
        if region.any():
            events.append(Event(region=region, kind=CLASSES[index], probability=probability, on_label=twin, off_label=index))
    return KnownDistribution(base=base, events=tuple(events))


def _open(path: Path, what: str) -> Image.Image:
    if not path.exists():
        raise DatasetError(f"{path}: {what} missing")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    return im


def _list_images(image_dir: Path, split: str) -> list[tuple[str, str]]:
    """(city, frame prefix) of every image of one of our splits, sorted."""
    items = []
    for city in sorted(p for p in image_dir.iterdir() if p.is_dir()):
        held_out = city.name in VAL_CITIES
        if _OFFICIAL[split] == "train" and held_out != (split == "val"):
            continue
        items += [(city.name, png.name[: -len(_IMAGE_SUFFIX)]) for png in sorted(city.glob(f"*{_IMAGE_SUFFIX}"))]
    return items


@dataclass(frozen=True)
class Cityscapes:
    """One split (see the module docstring for which official split and cities it reads)."""

    root: Path
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DatasetError(f"unknown split {self.split!r}; expected one of {SPLITS}")
        official = _OFFICIAL[self.split]
        image_dir, label_dir = self.root / "leftImg8bit" / official, self.root / "gtFine" / official
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: missing (Cityscapes expects PATH/leftImg8bit/<split>/<city>/ and PATH/gtFine/<split>/<city>/)")
        items = _list_images(image_dir, self.split)
        if not items:
            which = f"cities {', '.join(VAL_CITIES)}" if self.split == "val" else "cities"
            raise DatasetError(f"{image_dir}: no <city>/*{_IMAGE_SUFFIX} for split {self.split!r} (reads {which} of official {official!r})")
        object.__setattr__(self, "_items", items)

    classes = CLASSES
    in_channels = 3

    @property
    def description(self) -> dict[str, object]:
        return {
            "source": "cityscapes",
            "root": str(self.root),
            "split": self.split,
            "official_split": _OFFICIAL[self.split],
            "cases": len(self),
            "annotators": ANNOTATORS,
            "scale": 1 / SCALE,
        }

    def __len__(self) -> int:
        return len(self._items)  # type: ignore[attr-defined]

    def _read(self, city: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """Image (h, w, 3) uint8 and class map (h, w) uint8 at a quarter of the file's size."""
        official = _OFFICIAL[self.split]
        image_path = self.root / "leftImg8bit" / official / city / f"{prefix}{_IMAGE_SUFFIX}"
        label_path = self.root / "gtFine" / official / city / f"{prefix}{_LABEL_SUFFIX}"
        with _open(image_path, "image") as im, _open(label_path, "labelIds map") as lab:
            if lab.mode not in ("L", "P"):
                raise DatasetError(f"{label_path}: labelIds must be an 8-bit one-channel PNG, got mode {lab.mode}")
            if lab.size != im.size:
                raise DatasetError(f"{label_path}: size {lab.size} differs from the image's {im.size} ({image_path.name})")
            width, height = im.size
            size = (width // SCALE, height // SCALE)
            if min(size) < 1:
                raise DatasetError(f"{image_path}: {width}x{height} is too small to downscale x{1 / SCALE}")
            image = np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR))
            classes = to_classes(np.asarray(lab))
        base = np.asarray(Image.fromarray(classes).resize(size, Image.Resampling.NEAREST))
        return image, base

    def __getitem__(self, index: int) -> Case:
        city, prefix = self._items[index]  # type: ignore[attr-defined]
        image, base = self._read(city, prefix)
        truth = truth_of(base)
        rng = np.random.default_rng([_SEED, SPLIT_SEEDS[self.split], index])
        return Case(prefix, image, truth.sample(rng, ANNOTATORS), truth)
