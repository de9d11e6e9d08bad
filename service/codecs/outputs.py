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


def wants_npz(accept: str | None) -> bool:
    return bool(accept) and NPZ_MEDIA_TYPE in accept  # type: ignore[operator]
