"""Reading an inference request body: multipart field ``image`` (repeated for the instances of a
DICOM series) or JSON ``{"image": base64}``.

The body is read as a stream, never cached on the request: the size limit (``BodyLimit``) holds
while it arrives, a multipart file goes to a spooled temporary file, and a JSON body is parsed and
dropped before its base64 is decoded (``binascii`` reads the parsed string in place)."""

from __future__ import annotations

import binascii
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api.schemas import ImageJSON
from service.codecs.outputs import b64, png_bytes
from service.errors import InvalidParameter, InvalidRequest, UnsupportedMediaType

IMAGE_MEDIA_TYPES = (
    "PNG (8/16-bit grey or RGB), JPEG, .npy (uint8, uint16, float32/float64 in [0, 1]), DICOM (one instance, or a zip of "
    "a series), NIfTI (.nii, .nii.gz; a 3-D volume is segmented slice by slice); repeat the field for a DICOM series"
)
# a request that works, shown in the docs and tried first by schema-driven clients: a 16 x 16 grey PNG
EXAMPLE = {"image": b64(png_bytes(np.full((16, 16), 128, dtype=np.uint8))), "k": 4, "seed": 1}


def openapi_body() -> dict:
    """The two body shapes the inference routes accept, for their OpenAPI operation."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary", "description": IMAGE_MEDIA_TYPES}},
                    },
                    "encoding": {"image": {"contentType": "image/png, image/jpeg, application/dicom, application/octet-stream"}},
                },
                "application/json": {"schema": ImageJSON.model_json_schema(), "example": EXAMPLE},
            },
        }
    }


@dataclass
class ImageBody:
    files: list[bytes]  # one file, or the instances of a DICOM series
    k: int | None
    seed: int | None


async def read_stream(request: Request) -> bytearray:
    """The body as it streams in, never cached on the request: ``BodyLimit`` stops it at the size limit."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


async def read_body(request: Request) -> ImageBody:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        max_files = request.app.state.settings.max_slices
        async with request.form(max_files=max_files, max_fields=8) as form:
            uploads = [item for item in form.getlist("image") if isinstance(item, UploadFile)]
            if not uploads:
                raise InvalidRequest("multipart body has no file field 'image'")
            return ImageBody([await upload.read() for upload in uploads], None, None)
    if content_type == "application/json":
        body = await read_stream(request)
        try:
            payload = ImageJSON.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidParameter(f"invalid JSON body: {exc.errors(include_url=False, include_input=False)}") from exc
        del body
        try:
            data = binascii.a2b_base64(payload.image, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"'image' is not valid base64 ({exc})") from exc
        return ImageBody([data], payload.k, payload.seed)
    raise UnsupportedMediaType(f"send multipart/form-data with a file field 'image' or application/json, not {content_type or 'nothing'}")
