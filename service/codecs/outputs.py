"""Encode results: PNG masks, base64 ``.npy`` arrays, ``.npz`` archives and heat-map previews."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

NPZ_MEDIA_TYPE = "application/x-npz"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W) uint8 or (H, W, 3) uint8 -> PNG bytes (fast compression: speed over size)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def heat_png(values: np.ndarray, high: float) -> bytes:
    """(H, W) float on [0, high] -> an RGB PNG heat map (black -> red -> yellow -> white)."""
    t = np.clip(values / max(high, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return png_bytes((rgb * 255).astype(np.uint8))


def class_frequencies(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(k, ...) class indices -> (C - 1, ...) float32: the share of the k samples that mark each
    foreground class at each pixel (the sample mean, what the iso-contours are drawn on)."""
    return np.stack([(labels == c).mean(axis=0, dtype=np.float32) for c in range(1, num_classes)])


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """Files already compressed (NIfTI .gz, DICOM) stored as they are."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()
