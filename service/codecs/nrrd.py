"""NRRD out: what OHIF's MONAI Label extension asks for (``result_extension: .nrrd``). A text
header with the geometry in LPS (NRRD's ``left-posterior-superior`` space, as DICOM and Slicer
use), then the voxels, raw or gzipped."""

from __future__ import annotations

import gzip

import numpy as np

from service.codecs.volume import LPS_TO_RAS, Volume

_TYPES = {"uint8": "uint8", "uint16": "uint16", "int16": "int16", "float32": "float"}


def _vector(values: np.ndarray) -> str:
    return "(" + ",".join(f"{float(v):.10g}" for v in values) + ")"


def encode_nrrd(array: np.ndarray, volume: Volume, compress: bool) -> bytes:
    """(D, H, W) in display order -> NRRD bytes on the input's grid (the source voxel order)."""
    data = volume.to_source(array)
    if data.dtype.name not in _TYPES:
        raise ValueError(f"NRRD output of {data.dtype} is not supported")
    lps = LPS_TO_RAS @ volume.affine  # RAS -> LPS is the same sign flip
    directions = " ".join(_vector(lps[:3, axis]) for axis in range(3))
    header = (
        "NRRD0004\n# written by carseg\n"
        f"type: {_TYPES[data.dtype.name]}\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {' '.join(str(n) for n in data.shape[:3])}\nspace directions: {directions}\n"
        "kinds: domain domain domain\nendian: little\n"
        f"encoding: {'gzip' if compress else 'raw'}\nspace origin: {_vector(lps[:3, 3])}\n\n"
    )
    # NRRD's fastest axis is the first: Fortran order of the (i, j, k) array
    raw = np.asfortranarray(data.astype(data.dtype.newbyteorder("<"))).tobytes(order="F")
    return header.encode("ascii") + (gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw)
