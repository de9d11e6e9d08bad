"""Decode an uploaded image file (PNG 8/16-bit, JPEG or ``.npy``) into an (H, W, C) array,
enforcing the size limits before any pixel is decoded, so a decompression bomb costs nothing."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.errors import InvalidImage, InvalidParameter, PayloadTooLarge, UnsupportedMediaType

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_NPY = b"\x93NUMPY"
NPY_DTYPES = ("uint8", "uint16", "float32", "float64")


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_side: int
    max_pixels: int
    max_pixel_samples: int  # height x width x k: what a request costs
    k: int = 1  # the samples this request asks for


def sniff(data: bytes) -> str:
    """The format by magic bytes, not by a client-supplied name or content type."""
    if data.startswith(_PNG):
        return "png"
    if data.startswith(_JPEG):
        return "jpeg"
    if data.startswith(_NPY):
        return "npy"
    raise UnsupportedMediaType("the image must be a PNG, JPEG or .npy file")


def check_size(height: int, width: int, limits: Limits) -> None:
    """One image's sides, pixels and pixel-samples (x k) against the limits, from its header."""
    if height < 1 or width < 1:
        raise InvalidImage(f"the image is empty ({height} x {width})")
    if height > limits.max_side or width > limits.max_side or height * width > limits.max_pixels:
        raise PayloadTooLarge(
            f"{height} x {width} pixels exceeds the limit ({limits.max_side} per side, {limits.max_pixels} in all)"
        )
    if height * width * limits.k > limits.max_pixel_samples:
        raise PayloadTooLarge(
            f"{height} x {width} pixels x k={limits.k} samples is {height * width * limits.k} pixel-samples, over the limit of "
            f"{limits.max_pixel_samples}: ask for fewer samples (at most {max(1, limits.max_pixel_samples // (height * width))} "
            "at this size) or send a smaller image"
        )


def _decode_pil(data: bytes, limits: Limits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            check_size(height, width, limits)  # from the header, before decoding pixels
            im.load()
    except (PayloadTooLarge, InvalidImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"decompression bomb refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the image could not be decoded ({exc})") from exc
    if im.mode in ("I;16", "I;16B", "I;16L"):
        array = np.asarray(im).astype(np.uint16)
    elif im.mode == "I":
        array = np.asarray(im)
        if array.min() < 0 or array.max() > 65535:
            raise InvalidImage("32-bit integer images are not supported; send 8- or 16-bit")
        array = array.astype(np.uint16)
    elif im.mode in ("L", "RGB"):
        array = np.asarray(im)
    elif im.mode in ("LA", "RGBA", "P", "PA", "1", "CMYK", "YCbCr"):
        array = np.asarray(im.convert("L" if im.mode in ("LA", "1") else "RGB"))
    else:
        raise InvalidImage(f"unsupported image mode {im.mode}")
    return array


def _decode_npy(data: bytes, limits: Limits) -> np.ndarray:
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(buf)  # the header only: no pixel is read before the limits pass
    except (ValueError, OSError, SyntaxError) as exc:
        raise InvalidImage(f"the .npy header could not be read ({exc})") from exc
    if dtype.hasobject or dtype.name not in NPY_DTYPES:
        raise InvalidParameter(f".npy dtype {dtype} is not accepted; use one of {', '.join(NPY_DTYPES)}")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise InvalidParameter(f".npy shape {shape} is not (H, W) or (H, W, C) with C in (1, 3)")
    check_size(shape[0], shape[1], limits)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidImage(f"the .npy file is truncated or corrupt ({exc})") from exc
    if array.dtype.kind == "f":
        check_unit_interval(array, "a float .npy image")
        array = array.astype(np.float32)
    return array


def check_unit_interval(array: np.ndarray, what: str) -> None:
    """Float pixels are intensities in [0, 1], finite: the contract of a job's float image."""
    if not np.isfinite(array).all():
        raise InvalidParameter(f"{what} contains NaN or infinite values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise InvalidParameter(f"{what} must hold intensities in [0, 1]")


def check_image(image: np.ndarray, limits: Limits, channels: int) -> None:
    """An array decoded elsewhere (a tensor, a DICOM or NIfTI slice) meets the same limits as a file."""
    if image.ndim != 3 or image.shape[2] != channels:
        raise InvalidParameter(f"the model takes (H, W, {channels}) images, got shape {tuple(image.shape)}")
    check_size(image.shape[0], image.shape[1], limits)


def decode_image(data: bytes, limits: Limits, channels: int) -> np.ndarray:
    """Bytes of an image file -> (H, W, channels) array (uint8, uint16 or float32 in [0, 1])."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    kind = sniff(data)
    array = _decode_npy(data, limits) if kind == "npy" else _decode_pil(data, limits)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == channels:
        return array
    if channels == 1 and array.shape[2] == 3 and (array == array[:, :, :1]).all():
        return np.ascontiguousarray(array[:, :, :1])  # grey saved as RGB, as viewers often export
    raise InvalidParameter(f"the model takes {channels}-channel images, this one has {array.shape[2]}")
