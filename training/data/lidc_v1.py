"""LIDC-IDRI, protocol v1: the 15,096-slice pickle ``data_lidc.pickle`` distributed with Knegt's
Probabilistic-Unet-Pytorch and used by PHiSeg, SSN, MoSE, CCDM and ATFM. Spec ``lidc-v1:PATH`` with
PATH the pickle file itself.

Format (what every public loader of the file reads: ``value['image']``, ``value['masks']``,
``value['series_uid']``)::

    {slice_name: {"image": (128, 128) float32 in [0, 1],
                  "masks": [4 x (128, 128) uint8],      # one per grader, empty masks included
                  "series_uid": str},                    # the CT series, i.e. the patient
     ...}

Reading it safely: a pickle can name any importable callable, and unpickling calls it. The file is
read with ``SafeUnpickler``, whose ``find_class`` hands out only the numpy entry points an array
needs and refuses everything else with a DatasetError before anything is called. Containers,
strings and numbers are built by pickle opcodes, not by ``find_class``, so they need nothing.

Splits: the file has none. 60:20:20 by ``series_uid`` (patient level, as PHiSeg/SSN): the uids are
sorted, shuffled with a fixed seed and cut, so no patient is in two splits and every run gets the same
split. Proportions hold for patients, not slices.

Assumptions: masks may be 0/1 or 0/255 (binarised with > 0); an image of shape (H, W, 1) is taken as
(H, W); the image is stored as uint16 (``round(x * 65535)``): lossless for data that was 8-bit before
it was scaled to [0, 1] (k/255 -> 257 k), near-lossless otherwise, and read back /65535 like any
uint16 image. A Python 2 pickle is read with ``encoding="latin1"`` (numpy's advice for such files).
"""

from __future__ import annotations

import functools
import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data.cases import Case
from training.data.folder import SPLITS, DatasetError

CLASSES = ("background", "nodule")
SPLIT_SEED = 20180613  # fixed: the split must be the same in every process and on every machine
FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
_TOLERANCE = 1e-3  # float images slightly outside [0, 1] from rounding are clipped, not refused


def _numpy_core(module: str) -> Any:
    """``numpy.core.X`` or ``numpy._core.X``, whichever this numpy has: numpy 2 moved numpy.core to
    numpy._core (importing the old name warns), and files written by either name the one they had."""
    new, old = module.replace("numpy.core", "numpy._core", 1), module.replace("numpy._core", "numpy.core", 1)
    try:
        return importlib.import_module(new)
    except ImportError:
        return importlib.import_module(old)


def _allowed() -> dict[tuple[str, str], Any]:
    """(module, name) -> the object; everything an ndarray/dtype/numpy scalar needs under every
    pickle protocol (2: bytes via _codecs.encode; 5: _frombuffer) and either numpy layout."""
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        multiarray = _numpy_core(f"{core}.multiarray")
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _numpy_core(f"{core}.numeric")._frombuffer
    allowed[("_codecs", "encode")] = importlib.import_module("_codecs").encode  # str -> bytes, protocol 2
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays inside plain containers and nothing else."""

    _ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(f"pickle refers to {module}.{name}, which is not a numpy array part: refused (nothing was run)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError("pickle uses persistent ids: refused")


def safe_load(path: Path) -> Any:
    """The object in a pickle file, built with ``SafeUnpickler``; DatasetError names the file."""
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            return SafeUnpickler(f, encoding="latin1").load()
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: missing (the LIDC v1 pickle, data_lidc.pickle)") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DatasetError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, size: int) -> dict[str, dict[str, Any]]:
    # keyed on mtime and size too, so a file rewritten in place (tests do) is read again
    data = safe_load(Path(path))
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{path}: expected a non-empty dict {{slice_name: {{image, masks, series_uid}}}}, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, dict) or not {"image", "masks", "series_uid"} <= value.keys():
            found = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DatasetError(f"{path}: slice {key!r} must be a dict with 'image', 'masks' and 'series_uid', got {found}")
    return data


def load_pickle(path: Path) -> dict[str, dict[str, Any]]:
    """The pickle's dict, read once per process per file: the real file is ~1 GB and each of the
    three splits needs all of it."""
    resolved = path.resolve()
    try:
        stat = resolved.stat()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: missing (the LIDC v1 pickle, data_lidc.pickle)") from exc
    return _load_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


def split_patients(uids: set[str], split: str) -> set[str]:
    """The patients of one split: sorted, shuffled with ``SPLIT_SEED``, cut 60:20:20."""
    order = sorted(uids)
    np.random.default_rng(SPLIT_SEED).shuffle(order)
    n_train = round(FRACTIONS["train"] * len(order))
    n_val = round(FRACTIONS["val"] * len(order))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(order))}
    start, stop = bounds[split]
    return set(order[start:stop])


def _image(value: Any, where: str) -> np.ndarray:
    image = np.asarray(value)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2 or image.dtype.kind not in "fiu":
        raise DatasetError(f"{where}: 'image' must be a 2-D numeric array, got {image.dtype} {image.shape}")
    if image.dtype.kind == "f":
        low, high = float(image.min()), float(image.max())
        if low < -_TOLERANCE or high > 1 + _TOLERANCE:
            raise DatasetError(f"{where}: float 'image' must lie in [0, 1], found [{low:.4g}, {high:.4g}]")
        image = np.rint(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    elif image.dtype != np.uint8:
        raise DatasetError(f"{where}: integer 'image' must be uint8, got {image.dtype}")
    return image[:, :, None]


def _masks(value: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    if not isinstance(value, (list, tuple)) or not value:
        raise DatasetError(f"{where}: 'masks' must be a non-empty list of grader masks, got {type(value).__name__}")
    masks = []
    for grader, mask in enumerate(value):
        mask = np.asarray(mask)
        if mask.shape != shape or mask.dtype.kind not in "biuf":
            raise DatasetError(f"{where}: mask {grader} is {mask.dtype} {mask.shape}, expected numeric {shape} like the image")
        masks.append(mask > 0)
    return np.stack(masks).astype(np.uint8)


@dataclass(frozen=True)
class LidcV1:
    """One patient-level split of the v1 pickle; slices in name order."""

    path: Path
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DatasetError(f"unknown split {self.split!r}; expected one of {SPLITS}")
        data = load_pickle(self.path)
        patients = split_patients({str(v["series_uid"]) for v in data.values()}, self.split)
        keys = sorted(k for k, v in data.items() if str(v["series_uid"]) in patients)
        if not keys:
            raise DatasetError(f"{self.path}: split {self.split!r} has no slices ({len(data)} slices in the file)")
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_patients", patients)

    classes = CLASSES
    in_channels = 1

    @property
    def patients(self) -> frozenset[str]:
        """The series uids in this split (for checks that no patient is in two splits)."""
        return frozenset(self._patients)  # type: ignore[attr-defined]

    @property
    def description(self) -> dict[str, object]:
        return {
            "source": "lidc-v1",
            "root": str(self.path),
            "split": self.split,
            "cases": len(self),
            "patients": len(self.patients),
        }

    def __len__(self) -> int:
        return len(self._keys)  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> Case:
        key = self._keys[index]  # type: ignore[attr-defined]
        entry = self._data[key]  # type: ignore[attr-defined]
        where = f"{self.path} [{key!r}]"
        image = _image(entry["image"], where)
        labels = _masks(entry["masks"], image.shape[:2], where)
        return Case(str(key), image, labels)
