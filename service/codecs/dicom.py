"""DICOM in: single-frame CT/MR instances (one file, or a series as several) -> a ``Volume``.

Stored values go through the modality LUT (rescale slope/intercept, so CT is in Hounsfield units)
and then the window the model's manifest declares (the instance's own VOI window when the
manifest has none, the series' range when neither does). Slices are ordered along the normal of
the image plane, as viewers order them, not by file order or instance number; the geometry
(position, orientation, spacing) becomes the NIfTI affine of the result."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from service.codecs.volume import LPS_TO_RAS, InputLimits, Volume, Window, check_volume
from service.errors import InvalidImage, InvalidParameter, UnsupportedMediaType

DICOM_MAGIC_OFFSET = 128
# the pixel module and overlays: what a SEG's source reference never needs, and the bulk of a file
_BULK = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _read(data: bytes) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, OSError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidImage(f"the DICOM file could not be read ({exc})") from exc


def _check_header(ds: pydicom.Dataset) -> tuple[int, int]:
    """Rows x columns from the header (the limits are checked on the whole series next)."""
    if "PixelData" not in ds:
        raise InvalidImage("the DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnsupportedMediaType(f"multi-frame DICOM ({frames} frames) is not supported; send single-frame instances")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise InvalidImage(f"the DICOM image is empty ({rows} x {cols})")
    return rows, cols


def _modality_values(ds: pydicom.Dataset, channels: int) -> np.ndarray:
    """(H, W) float32 physical values, or (H, W, 3) uint8 for colour."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds for a corrupt or unsupported encoding
        raise InvalidImage(f"the DICOM pixel data could not be decoded ({type(exc).__name__}: {exc})") from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        if channels != 3:
            raise InvalidParameter(f"the model takes {channels}-channel images, this DICOM is colour")
        if str(ds.get("PhotometricInterpretation", "RGB")) != "RGB":
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, str(ds.PhotometricInterpretation), "RGB")
        return np.asarray(pixels, dtype=np.uint8)
    if samples != 1 or pixels.ndim != 2:
        raise InvalidImage(f"unsupported DICOM pixel layout: {samples} samples per pixel, shape {pixels.shape}")
    values = pixels.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() + values.min() - values  # stored bright-is-dark: turn it so dense is bright
    return values


def _first(value: object) -> float:
    """A DICOM value that may hold several (WindowCenter "40\\400"): the first."""
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)  # type: ignore[arg-type]


def _file_window(ds: pydicom.Dataset) -> Window | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    return Window(_first(center), _first(width)) if _first(width) > 0 else None


def _normal(ds: pydicom.Dataset) -> np.ndarray | None:
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    return np.cross(row, col)


def _order(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Slices along the plane normal (the position's projection); instance number without geometry."""
    normal = _normal(datasets[0])
    if normal is not None and all("ImagePositionPatient" in ds for ds in datasets):
        keyed = [(float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))), ds) for ds in datasets]
        keyed.sort(key=lambda pair: pair[0])
        positions = [key for key, _ in keyed]
        if len(set(np.round(positions, 4))) != len(positions):
            raise InvalidParameter("two instances of the series lie at the same position; send one series per request")
        return [ds for _, ds in keyed]
    return sorted(datasets, key=lambda ds: int(ds.get("InstanceNumber", 0) or 0))


def _affine(ordered: list[pydicom.Dataset]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The RAS affine of the array (column, row, slice) and the (slice, row, column) spacing."""
    first = ordered[0]
    spacing = first.get("PixelSpacing") or [1.0, 1.0]
    row_mm, col_mm = float(spacing[0]), float(spacing[1])
    orientation = first.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0]
    along_row, along_col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    origin = np.asarray(first.get("ImagePositionPatient") or [0.0, 0.0, 0.0], dtype=float)
    if len(ordered) > 1 and "ImagePositionPatient" in ordered[-1]:
        step = (np.asarray(ordered[-1].ImagePositionPatient, dtype=float) - origin) / (len(ordered) - 1)
    else:
        thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        step = np.cross(along_row, along_col) * thickness
    lps = np.eye(4)
    # a column index moves along the row direction by the column spacing, a row index along the column direction
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = along_row * col_mm, along_col * row_mm, step, origin
    return LPS_TO_RAS @ lps, (float(np.linalg.norm(step)), row_mm, col_mm)


def _header_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset without its pixels: what a SEG needs to reference it, without holding the image twice."""
    for tag in _BULK:
        if tag in ds:
            del ds[tag]
    return ds


def decode_dicom(files: list[bytes], limits: InputLimits, channels: int, window: Window | None) -> Volume:
    """Instances of one series (any order) -> a ``Volume`` in [0, 1] (float32) or uint8 for colour."""
    datasets = [_read(data) for data in files]
    shapes = {_check_header(ds) for ds in datasets}
    if len(shapes) != 1:
        raise InvalidParameter(f"the series' instances differ in size: {sorted(shapes)}")
    check_volume(len(datasets), *shapes.pop(), limits)  # before a compressed frame is decoded
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) != 1:
        raise InvalidParameter("the files belong to more than one series; send one series per request")
    ordered = _order(datasets)
    values = np.stack([_modality_values(ds, channels) for ds in ordered])
    if values.dtype == np.uint8:
        slices = values
    else:
        chosen = window or _file_window(ordered[0]) or Window.spanning(values)
        slices = chosen.apply(values)[..., None]
        if channels != 1:
            raise InvalidParameter(f"the model takes {channels}-channel images, this DICOM is greyscale")
    affine, spacing = _affine(ordered)
    return Volume(slices, "dicom", affine=affine, spacing=spacing, sources=tuple(_header_only(ds) for ds in ordered))
