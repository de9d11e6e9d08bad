"""Any accepted upload -> a ``Volume``: the format is told by magic bytes, never by a file name or
a client's content type. One file: PNG, JPEG, ``.npy``, DICOM, NIfTI (``.nii``/``.nii.gz``) or a
zip of one DICOM series; several files (a multipart set): the instances of one DICOM series."""

from __future__ import annotations

import io
import zipfile
from typing import Any

from service.codecs.dicom import decode_dicom, is_dicom
from service.codecs.images import decode_image
from service.codecs.nifti import decode_nifti, is_nifti
from service.codecs.volume import InputLimits, Volume, Window, from_image
from service.errors import InvalidImage, InvalidParameter, PayloadTooLarge, UnsupportedMediaType

ZIP_MAGIC = b"PK\x03\x04"
FORMATS = "PNG, JPEG, .npy, DICOM (one instance, a zip of a series or several files), NIfTI (.nii, .nii.gz)"


def window_of(manifest: dict[str, Any]) -> Window | None:
    """The window a model was trained to see physical values through (``window`` in its manifest)."""
    declared = manifest.get("window")
    if not declared:
        return None
    try:
        return Window(float(declared["center"]), float(declared["width"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidParameter(f"the model's manifest has a malformed window {declared!r}") from exc


def _unzip(data: bytes, limits: InputLimits) -> list[bytes]:
    """The DICOM members of a zip, checked by their declared sizes before any is inflated."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir() and m.filename.rsplit("/", 1)[-1].upper() != "DICOMDIR"]
        if len(members) > limits.max_files:
            raise PayloadTooLarge(f"the zip holds {len(members)} files, over the limit of {limits.max_files}")
        if sum(m.file_size for m in members) > limits.image.max_bytes:
            raise PayloadTooLarge(f"the zip inflates past {limits.image.max_bytes} bytes")
        files = []
        for member in members:
            with archive.open(member) as fh:
                content = fh.read(member.file_size + 1)
            if len(content) > member.file_size:
                raise InvalidImage(f"zip member {member.filename} is larger than its header says")
            if is_dicom(content):
                files.append(content)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise InvalidImage(f"the zip could not be read ({exc})") from exc
    if not files:
        raise InvalidImage("the zip holds no DICOM file (files with the DICM preamble)")
    return files


def decode_input(files: list[bytes], limits: InputLimits, channels: int, manifest: dict[str, Any]) -> Volume:
    if not files or not any(files):
        raise InvalidImage("the image is empty (0 bytes)")
    total = sum(len(data) for data in files)
    if total > limits.image.max_bytes:
        raise PayloadTooLarge(f"{total} bytes exceeds the limit of {limits.image.max_bytes}")
    if len(files) > limits.max_files:
        raise PayloadTooLarge(f"{len(files)} files exceed the limit of {limits.max_files}")
    first = files[0]
    series = _unzip(first, limits) if len(files) == 1 and first.startswith(ZIP_MAGIC) else files
    if all(is_dicom(data) for data in series):
        if len(series) > limits.max_slices:
            raise PayloadTooLarge(f"{len(series)} slices exceed the limit of {limits.max_slices}")
        return decode_dicom(series, limits, channels, window_of(manifest))
    if len(files) > 1:
        raise UnsupportedMediaType("several files are accepted only as the instances of one DICOM series")
    if is_nifti(first):
        return decode_nifti(first, limits, channels, window_of(manifest))
    try:
        return from_image(decode_image(first, limits.image, channels))
    except UnsupportedMediaType as exc:
        raise UnsupportedMediaType(f"the image must be {FORMATS}") from exc
