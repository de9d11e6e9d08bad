"""Probability iso-contours of a class's sample frequency, as closed polygons a viewer can draw or
an RTSTRUCT can carry, and the image as an 8-bit picture to draw them over.

Coordinates are image coordinates: x = column, y = row, pixel centres at integers. A polygon is
(N, 2) [x, y] with N >= 3 and is implicitly closed: the last vertex joins the first (as in an
RTSTRUCT CLOSED_PLANAR contour and a canvas ``closePath``), so the first vertex is not repeated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import contourpy
import numpy as np

from service.errors import InvalidImage

LEVELS = (0.1, 0.5, 0.9)


def iso_contours(frequency: np.ndarray, levels: Sequence[float] = LEVELS) -> dict[float, list[np.ndarray]]:
    """(H, W) frequency in [0, 1] -> for each level, the closed polygons of ``frequency == level``.

    The map is padded with a zero border first: a region that touches the image's edge would
    otherwise give an open line ending at the edge, not a polygon. Its vertices then lie half a
    pixel outside the image and are clipped back onto the edge pixels' centres."""
    if frequency.ndim != 2:
        raise ValueError(f"a frequency map is (H, W), not {frequency.shape}")
    height, width = frequency.shape
    padded = np.pad(np.asarray(frequency, dtype=np.float64), 1)
    # the padding shifts the grid by one pixel: give contourpy the image coordinates directly
    x, y = np.arange(-1, width + 1, dtype=np.float64), np.arange(-1, height + 1, dtype=np.float64)
    generator = contourpy.contour_generator(x, y, padded, line_type=contourpy.LineType.Separate)
    out: dict[float, list[np.ndarray]] = {}
    for level in levels:
        lines = cast(list[np.ndarray], generator.lines(level))  # what LineType.Separate returns
        polygons = (_clip_polygon(line, width, height) for line in lines)
        out[level] = [p for p in polygons if p is not None]
    return out


def _clip_polygon(line: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """A closed contourpy line -> an implicitly closed polygon inside the image, or None where
    clipping leaves fewer than three distinct vertices."""
    points = np.column_stack([np.clip(line[:, 0], 0, width - 1), np.clip(line[:, 1], 0, height - 1)])
    # clipping folds runs of vertices outside the image onto one point: keep one of each
    keep = np.any(np.diff(points, axis=0) != 0, axis=1)
    points = points[1:][keep]  # drops contourpy's repeated first vertex too (it ends each closed line)
    if len(points) > 1 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    return points if len(np.unique(points, axis=0)) >= 3 else None


@dataclass(frozen=True)
class PlaneGeometry:
    """Where an image plane lies in patient space, as DICOM states it (all in mm)."""

    origin: tuple[float, float, float]  # ImagePositionPatient: the centre of the first pixel (row 0, column 0)
    row_cosine: tuple[float, float, float]  # ImageOrientationPatient[:3]: the direction of increasing column (x)
    column_cosine: tuple[float, float, float]  # ImageOrientationPatient[3:]: the direction of increasing row (y)
    pixel_spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns), i.e. (dy, dx)

    @classmethod
    def from_dicom(cls, position: Sequence[float], orientation: Sequence[float], spacing: Sequence[float]) -> PlaneGeometry:
        if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2:
            raise InvalidImage("the image's geometry needs 3 position, 6 orientation and 2 spacing values")
        px, py, pz = map(float, position)
        rx, ry, rz, cx, cy, cz = map(float, orientation)
        dy, dx = map(float, spacing)
        geometry = cls((px, py, pz), (rx, ry, rz), (cx, cy, cz), (dy, dx))
        geometry.check()
        return geometry

    def check(self) -> None:
        """A plane a contour can be placed on: unit, orthogonal direction cosines, positive spacing."""
        row, column = np.asarray(self.row_cosine), np.asarray(self.column_cosine)
        if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(column), 1, atol=1e-3)):
            raise InvalidImage(f"the image's orientation cosines are not unit vectors: {self.row_cosine}, {self.column_cosine}")
        if abs(float(row @ column)) > 1e-3:
            raise InvalidImage(f"the image's row and column directions are not orthogonal: {self.row_cosine}, {self.column_cosine}")
        if min(self.pixel_spacing) <= 0:
            raise InvalidImage(f"the image's pixel spacing must be positive, not {self.pixel_spacing}")


def to_patient(polygon: np.ndarray, geometry: PlaneGeometry) -> list[float]:
    """(N, 2) [x, y] pixel coordinates -> flat [x1, y1, z1, x2, ...] patient coordinates in mm, the
    layout of an RTSTRUCT's ContourData (DICOM PS3.3 C.7.6.2.1.1)."""
    dy, dx = geometry.pixel_spacing
    steps = np.column_stack([polygon[:, 0] * dx, polygon[:, 1] * dy])  # mm along the row and column directions
    axes = np.stack([geometry.row_cosine, geometry.column_cosine])  # (2, 3)
    points = np.asarray(geometry.origin) + steps @ axes
    return [float(v) for v in points.ravel()]


def display_image(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8, uint16 or float32 in [0, 1] -> (H, W) grey or (H, W, 3) RGB uint8: the
    image as the model saw it, for a viewer that cannot decode the upload itself (DICOM, NIfTI).
    Two channels show the first one; more than three, the first three."""
    if image.dtype == np.uint8:
        scaled = image
    elif image.dtype == np.uint16:
        scaled = (image.astype(np.float32) * (255 / 65535) + 0.5).astype(np.uint8)
    else:
        scaled = unit_8bit(image)
    return scaled[..., :3] if scaled.shape[-1] >= 3 else scaled[..., 0]


def unit_8bit(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (a frequency, a float image) -> uint8 (value * 255, rounded)."""
    return (np.clip(values.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
