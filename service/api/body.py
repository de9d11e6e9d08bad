"""Reading an inference request body: multipart field ``image`` or JSON ``{"image": base64}``."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api.schemas import ImageJSON
from service.errors import InvalidParameter, InvalidRequest, UnsupportedMediaType

# Shown in OpenAPI: the two body shapes the inference routes accept.
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary", "description": "PNG (8/16-bit), JPEG or .npy"}},
                }
            },
            "application/json": {"schema": ImageJSON.model_json_schema()},
        },
    }
}


@dataclass
class ImageBody:
    data: bytes
    k: int | None
    seed: int | None


async def read_body(request: Request) -> ImageBody:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("multipart body has no file field 'image'")
        return ImageBody(await upload.read(), None, None)
    if content_type == "application/json":
        try:
            payload = ImageJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidParameter(f"invalid JSON body: {exc.errors(include_url=False)}") from exc
        try:
            data = base64.b64decode(payload.image, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"'image' is not valid base64 ({exc})") from exc
        return ImageBody(data, payload.k, payload.seed)
    raise UnsupportedMediaType(f"send multipart/form-data with a file field 'image' or application/json, not {content_type or 'nothing'}")
