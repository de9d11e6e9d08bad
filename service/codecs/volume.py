"""What every input decodes to: a stack of 2-D slices in display orientation, and the geometry to
write results back where they came from.

The model sees each slice as a radiologist's viewer shows an axial image (rows run anterior to
posterior, columns patient right to left, as DICOM stores it and as the training crops are). A
result computed on those slices goes back to the source's own voxel order (``to_source``) and its
affine, so that a NIfTI answer overlays its input exactly, whatever orientation the input had."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.codecs.images import Limits, check_size
from service.errors import PayloadTooLarge

# NIfTI world coordinates are RAS+, DICOM's LPS+: the two differ by the sign of x and y
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class InputLimits:
    image: Limits  # per slice: bytes, sides, pixels, pixel-samples at this k
    max_slices: int
    max_files: int
    max_volume_pixel_samples: int  # slices x height x width x k


MAPS_PER_VOXEL = 8


def check_volume(depth: int, rows: int, cols: int, limits: InputLimits) -> None:
    """A volume's size and cost from its header, before a voxel is read or inflated."""
    check_size(rows, cols, limits.image)
    if depth > limits.max_slices:
        raise PayloadTooLarge(f"{depth} slices exceed the limit of {limits.max_slices}")
    # k samples per voxel cost compute; the answer holds up to ~8 float maps per voxel (p_F, the
    # uncertainty maps, the mean) whatever k is: a voxel costs at least that much memory
    per_voxel = max(limits.image.k, MAPS_PER_VOXEL)
    cost = depth * rows * cols * per_voxel
    if depth > 1 and cost > limits.max_volume_pixel_samples:
        raise PayloadTooLarge(
            f"{depth} slices x {rows} x {cols} pixels x max(k={limits.image.k}, {MAPS_PER_VOXEL}) is {cost} pixel-samples, over "
            f"the volume limit of {limits.max_volume_pixel_samples}: send fewer slices (or ask for fewer samples)"
        )


@dataclass(frozen=True)
class Window:
    """Maps physical values (CT Hounsfield units, MR signal) onto [0, 1]: [center - width/2,
    center + width/2] linearly, clipped: the window the model was trained to see."""

    center: float
    width: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        low = self.center - self.width / 2.0
        return np.clip((values.astype(np.float32) - np.float32(low)) / np.float32(self.width), 0.0, 1.0)

    @staticmethod
    def spanning(values: np.ndarray) -> Window:
        """The window over the whole range of ``values`` (when nobody declared one)."""
        low, high = float(values.min()), float(values.max())
        return Window((low + high) / 2.0, max(high - low, 1e-6))


@dataclass
class Volume:
    """``slices`` (D, H, W, C): uint8, uint16 or float32 in [0, 1], one image per slice.
    ``affine`` (4 x 4, RAS) is the source array's voxel -> world map, and ``to_source`` turns an
    array whose first three axes are (D, H, W) into the source's voxel order (any trailing axes,
    such as the k samples, stay last)."""

    slices: np.ndarray
    kind: str  # "image" (PNG/JPEG/npy), "dicom" or "nifti"
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    # the source's axes as a nibabel orientation from display order (D, H, W) -> source (i, j, k)
    ornt: np.ndarray = field(default_factory=lambda: np.array([[2, 1], [1, 1], [0, 1]]))
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (slice, row, column) in mm
    sources: tuple[Any, ...] = ()  # DICOM: the source datasets in slice order (headers only)

    @property
    def depth(self) -> int:
        return int(self.slices.shape[0])

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """(D, H, W, ...) in display order -> the source array's voxel order (..., trailing axes)."""
        from nibabel.orientations import apply_orientation

        return np.ascontiguousarray(apply_orientation(array, self.ornt))


# the display order (D, H, W) as a nibabel orientation: slices run inferior -> superior, rows
# anterior -> posterior, columns patient right -> left
DISPLAY = np.array([[2, 1], [1, -1], [0, -1]])


def from_image(image: np.ndarray) -> Volume:
    """A 2-D picture (H, W, C): one slice; as NIfTI it is (W, H, 1), unit spacing, with an affine
    that a NIfTI viewer shows the way the picture looks."""
    return Volume(image[None], "image", affine=LPS_TO_RAS.copy())
