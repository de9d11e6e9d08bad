"""NIfTI in and out (nibabel): a 2-D image or a 3-D volume -> a ``Volume`` of axial slices in
display orientation, and result arrays -> NIfTI files on the input's own grid and affine.

The header is read and checked before the voxels: dimensions, dtype and the decompressed size of a
``.nii.gz`` (inflated only as far as the header says the file holds, so a gzip bomb costs nothing)."""

from __future__ import annotations

import gzip
import io
import zlib

import numpy as np

from service.codecs.volume import DISPLAY, InputLimits, Volume, Window, check_volume
from service.errors import InvalidImage, InvalidParameter

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER = 348
NIFTI2_HEADER = 540
NIFTI_MEDIA_TYPE = "application/x-nifti"
_NUMERIC = "biuf"


def _header_size(head: bytes) -> int | None:
    for size in (NIFTI1_HEADER, NIFTI2_HEADER):
        for order in ("<", ">"):
            if len(head) >= 4 and int(np.frombuffer(head[:4], dtype=f"{order}i4")[0]) == size:
                return size
    return None


def _looks_nifti(head: bytes) -> bool:
    size = _header_size(head[:4])
    return (size == NIFTI1_HEADER and head[344:348] == b"n+1\x00") or (size == NIFTI2_HEADER and head[4:8] == b"n+2\x00")


def is_nifti(data: bytes) -> bool:
    """A single-file NIfTI-1/2 (``.nii``), or a gzip whose content starts like one."""
    if data.startswith(GZIP_MAGIC):
        try:
            head = zlib.decompressobj(wbits=31).decompress(data[:65536], NIFTI1_HEADER)
        except zlib.error:
            return False
        return _looks_nifti(head)
    return _looks_nifti(data[:NIFTI1_HEADER])


def _inflate(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of a gzip: a file that says it is small is read as small, whatever follows."""
    try:
        return zlib.decompressobj(wbits=31).decompress(data, size)
    except zlib.error as exc:
        raise InvalidImage(f"the .nii.gz file is not valid gzip ({exc})") from exc


def _header(data: bytes):
    """The header alone (inflating only its bytes), to check before any voxel is read."""
    import nibabel as nib

    head = _inflate(data, NIFTI2_HEADER) if data.startswith(GZIP_MAGIC) else data[:NIFTI2_HEADER]
    klass = nib.Nifti2Header if _header_size(head[:4]) == NIFTI2_HEADER else nib.Nifti1Header
    try:
        return klass.from_fileobj(io.BytesIO(head), check=True)
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, EOFError... for a bad header
        raise InvalidImage(f"the NIfTI header could not be read ({type(exc).__name__}: {exc})") from exc


def _load(data: bytes, header, voxels: int):
    """The image, inflating no more than the header's offset plus its voxels."""
    import nibabel as nib

    if data.startswith(GZIP_MAGIC):
        size = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
        data = _inflate(data, size)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        return klass.from_bytes(data)
    except Exception as exc:
        raise InvalidImage(f"the NIfTI file could not be read ({type(exc).__name__}: {exc})") from exc


def decode_nifti(data: bytes, limits: InputLimits, channels: int, window: Window | None) -> Volume:
    """A 2-D or 3-D NIfTI (a trailing axis of 1 allowed) -> a ``Volume`` of axial slices, float32 in [0, 1]."""
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    header = _header(data)
    shape = tuple(int(n) for n in header.get_data_shape())
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise InvalidParameter(f"a NIfTI image must be 2-D or 3-D, this one is {len(shape)}-D {shape}")
    if channels != 1:
        raise InvalidParameter(f"the model takes {channels}-channel images; NIfTI inputs are greyscale")
    dtype = header.get_data_dtype()
    if dtype.kind not in _NUMERIC or dtype.fields is not None:
        raise InvalidParameter(f"NIfTI data type {dtype} is not supported; use an integer or float type")
    shape3 = (*shape, 1)[:3]
    source = np.asarray(header.get_best_affine(), dtype=float)
    to_display = ornt_transform(io_orientation(source), DISPLAY)
    check_volume(*_display_shape(shape3, to_display), limits)
    image = _load(data, header, int(np.prod(shape3)))
    try:
        values = np.asarray(image.dataobj, dtype=np.float32).reshape(shape3)  # scl_slope/inter applied
    except Exception as exc:
        raise InvalidImage(f"the NIfTI voxel data could not be read ({type(exc).__name__}: {exc})") from exc
    if not np.isfinite(values).all():
        raise InvalidParameter("the NIfTI image contains NaN or infinite values")
    display = apply_orientation(values, to_display)
    if window is None and dtype == np.uint8:
        window = Window(127.5, 255.0)  # an 8-bit picture saved as NIfTI reads as its PNG would
    slices = (window or Window.spanning(display)).apply(display)[..., None]
    zooms = header.get_zooms()[:3]
    spacing = tuple(float(zooms[int(axis)]) if int(axis) < len(zooms) else 1.0 for axis in _source_axes(to_display))
    return Volume(np.ascontiguousarray(slices), "nifti", affine=source, ornt=ornt_transform(DISPLAY, io_orientation(source)),
                  spacing=spacing)  # type: ignore[arg-type]


def _display_shape(shape: tuple[int, int, int], to_display: np.ndarray) -> tuple[int, int, int]:
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(to_display):
        out[int(target)] = shape[axis]
    return out[0], out[1], out[2]


def _source_axes(to_display: np.ndarray) -> list[int]:
    """For each display axis (D, H, W), the source axis it came from."""
    axes = [0, 0, 0]
    for axis, (target, _) in enumerate(to_display):
        axes[int(target)] = axis
    return axes


def encode_nifti(array: np.ndarray, volume: Volume, description: str) -> bytes:
    """(D, H, W[, n]) in display order -> a gzipped NIfTI-1 on the input's grid and affine (the n
    maps, e.g. the k samples, on the 4th axis)."""
    import nibabel as nib

    data = volume.to_source(array)
    image = nib.Nifti1Image(data, volume.affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
    # gzip level 1: the masks compress ~20x even so, and level 9 costs ~5x the time for a few percent
    raw = image.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()
