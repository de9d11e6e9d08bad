"""The Open Inference Protocol (KServe v2, Triton's HTTP API) over the same models, admission and
``Segmenter`` as ``/v1``: tritonclient, perf_analyzer and KServe tooling talk to the service as
they would to Triton. A request is admitted before its body is read, as on ``/v1``.

A model takes ``image`` (UINT8, UINT16 or FP32 in [0, 1]; [H, W], [H, W, C] or either with a
leading batch of 1) and optionally ``k`` and ``seed`` (one integer each), and answers ``masks``
(k, H, W) UINT8, ``probabilities`` (C, H, W) FP32 (p_F) and ``entropy`` (H, W) FP32 (H(p_F) in
nats): only the outputs a request names are computed. The seed used comes back in the response's
``parameters``, so an unseeded answer can be reproduced.

Errors answer in the protocol's shape, ``{"error": "<reason>: <detail>"}``, with the status and
headers (Retry-After, WWW-Authenticate) that ``/v1`` gives. ``/v2/health/*`` is open, as
``/health`` is, and out of the OpenAPI document (which declares the key on every other route).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from service.api.admission import admitted
from service.api.auth import authenticated
from service.api.body import read_stream
from service.api.deps import MetricsDep, RegistryDep, SegmenterDep
from service.api.routes import health
from service.codecs.images import check_unit_interval
from service.codecs.tensors import DATATYPES, HEADER_LENGTH, InferRequest, build_response, check_media, datatype_name, parse_request
from service.errors import InvalidParameter, InvalidRequest, ServiceError
from service.jobs import Output
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.segmentation import Segmenter
from training.manifest import ModelEntry

PLATFORM = "carseg"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "parameters"]
IMAGE_DATATYPES = ("UINT8", "UINT16", "FP32")
OPTIONAL_INPUTS = {"k": "INT32", "seed": "INT64"}
# the protocol's output names -> what the runner computes; in this order when a request names none
OUTPUTS = {"masks": Output.LABELS, "probabilities": Output.P_F, "entropy": Output.ALEATORIC_ENTROPY}


class ProtocolRoute(APIRoute):
    """A route whose ServiceErrors (its dependencies' too: a missing key) answer in the protocol's
    error shape; the app's handler would answer ``/v1``'s ``{"error", "detail"}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                # the bookkeeping the app's handler does: the error metric and the access log's reason
                request.app.state.metrics.errors.labels(exc.reason).inc()
                request.state.job = {**getattr(request.state, "job", {}), "error": exc.reason}
                return _error(exc.status, exc.reason, exc.detail, exc.headers)

        return answer


def _error(status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": f"{reason}: {detail}"}, status_code=status, headers=headers)


router = APIRouter(prefix="/v2", tags=["kserve-v2"], route_class=ProtocolRoute)
keyed = [Depends(authenticated)]


class ProtocolError(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Readiness(BaseModel):
    ready: bool


class ResponseTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponseDoc(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="k and seed as used")
    outputs: list[ResponseTensor]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ProtocolError} for code in codes}


# the request as the OpenAPI document states it (inline: the document has no room for $defs), in
# form only: which names a model takes is checked after the form, so they are no enum here, or a
# fuzzer's unknown name on an oversized tensor would count its 413 as a malformed request accepted.
# ``service.codecs.tensors`` reads the body, JSON or binary
_PARAMETERS = {"type": "object", "additionalProperties": True}
INFER_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {**_PARAMETERS, "description": "binary_data_output: true for every output in binary"},
        "inputs": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string", "description": "image, k or seed"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"type": "string", "enum": list(DATATYPES)},
                    "parameters": {**_PARAMETERS, "description": "binary_data_size: the tensor's bytes after the JSON"},
                    "data": {"type": "array", "description": "the values, row-major, flat or nested; absent when binary"},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "description": ", ".join(OUTPUTS)},
                    "parameters": {**_PARAMETERS, "description": "binary_data: true for this output's bytes after the JSON"},
                },
            },
        },
    },
}
METADATA_ERRORS = _errors(401, 404)
INFER_ERRORS = _errors(400, 401, 404, 413, 415, 422, 429, 500, 503, 504)
INFER_OPENAPI = {
    "parameters": [{
        "name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
        "description": "binary tensor data extension: the body's first N bytes are the JSON, the tensors follow",
    }],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": INFER_REQUEST_SCHEMA},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}
INFER_RESPONSES = {
    **INFER_ERRORS,
    200: {"model": InferResponseDoc, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
}


# --- health and metadata -------------------------------------------------------------------------


@router.get("/health/live", include_in_schema=False)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", include_in_schema=False)
async def ready(request: Request, registry: RegistryDep) -> Response:
    answer = await health.ready(request, registry)  # /health/ready decides: models loaded and the queue served
    if answer.status_code != 200:
        return _error(answer.status_code, "unavailable", json.loads(bytes(answer.body))["detail"])
    return JSONResponse({"ready": True})


@router.get("", dependencies=keyed, response_model=ServerMetadata, responses=_errors(401))
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="carseg", version=request.app.version, extensions=EXTENSIONS)


def _tensor(name: str, datatype: str, shape: list[int]) -> TensorMetadata:
    return TensorMetadata(name=name, datatype=datatype, shape=shape)


def _inputs(entry: ModelEntry) -> list[TensorMetadata]:
    # one datatype per input in the protocol: UINT8 is named, UINT16 and FP32 are accepted too
    return [_tensor("image", "UINT8", [-1, -1, entry.in_channels]), *(_tensor(n, t, [1]) for n, t in OPTIONAL_INPUTS.items())]


def _outputs(entry: ModelEntry) -> list[TensorMetadata]:
    return [_tensor("masks", "UINT8", [-1, -1, -1]), _tensor("probabilities", "FP32", [len(entry.classes), -1, -1]), _tensor("entropy", "FP32", [-1, -1])]


def _metadata(registry: ModelRegistry, name: str, version: str | None) -> ModelMetadata:
    entry = registry.get(name, version)
    return ModelMetadata(name=entry.name, versions=registry.versions(name), platform=PLATFORM, inputs=_inputs(entry), outputs=_outputs(entry))


@router.get("/models/{model_name}", dependencies=keyed, response_model=ModelMetadata, responses=METADATA_ERRORS)
async def model_metadata(model_name: str, registry: RegistryDep) -> ModelMetadata:
    return _metadata(registry, model_name, None)


@router.get("/models/{model_name}/versions/{model_version}", dependencies=keyed, response_model=ModelMetadata, responses=METADATA_ERRORS)
async def model_version_metadata(model_name: str, model_version: str, registry: RegistryDep) -> ModelMetadata:
    return _metadata(registry, model_name, model_version)


def _config(registry: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    """Triton's model configuration, which perf_analyzer reads beside the metadata: no batch
    dimension (a request is one image; the service batches jobs itself), k and seed optional."""
    entry = registry.get(name, version)

    def tensor(meta: TensorMetadata, optional: bool = False) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": meta.name, "data_type": f"TYPE_{meta.datatype}", "dims": meta.shape}
        return {**spec, "optional": optional} if optional else spec

    return {
        "name": entry.name, "platform": PLATFORM, "backend": PLATFORM, "max_batch_size": 0,
        "version_policy": {"specific": {"versions": [int(entry.version)]}} if version else {"latest": {"num_versions": 1}},
        "input": [tensor(meta, optional=meta.name in OPTIONAL_INPUTS) for meta in _inputs(entry)],
        "output": [tensor(meta) for meta in _outputs(entry)],
        "parameters": {"classes": {"string_value": ",".join(entry.classes)}},
    }


@router.get("/models/{model_name}/config", dependencies=keyed, responses=METADATA_ERRORS)
async def model_config(model_name: str, registry: RegistryDep) -> dict[str, Any]:
    return _config(registry, model_name, None)


@router.get("/models/{model_name}/versions/{model_version}/config", dependencies=keyed, responses=METADATA_ERRORS)
async def model_version_config(model_name: str, model_version: str, registry: RegistryDep) -> dict[str, Any]:
    return _config(registry, model_name, model_version)


async def _model_ready(request: Request, registry: ModelRegistry, name: str, version: str | None) -> Response:
    entry = registry.get(name, version)
    ok, why = await request.app.state.queue.ready([entry.name])
    return JSONResponse({"ready": True}) if ok else _error(503, "unavailable", why)


READY_RESPONSES = {**METADATA_ERRORS, **_errors(503), 200: {"model": Readiness}}


@router.get("/models/{model_name}/ready", dependencies=keyed, responses=READY_RESPONSES)
async def model_ready(model_name: str, request: Request, registry: RegistryDep) -> Response:
    return await _model_ready(request, registry, model_name, None)


@router.get("/models/{model_name}/versions/{model_version}/ready", dependencies=keyed, responses=READY_RESPONSES)
async def model_version_ready(model_name: str, model_version: str, request: Request, registry: RegistryDep) -> Response:
    return await _model_ready(request, registry, model_name, model_version)


# --- inference -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    request: InferRequest
    image: np.ndarray  # (H, W, C) uint8, uint16 or float32 in [0, 1], as Segmenter.run takes it
    k: int | None
    seed: int | None


def _image(array: np.ndarray, channels: int) -> np.ndarray:
    """The ``image`` tensor -> (H, W, C). The size and channel limits are ``Segmenter.run``'s."""
    if array.dtype.name not in ("uint8", "uint16", "float32"):
        raise InvalidParameter(f"input 'image' must be {', '.join(IMAGE_DATATYPES)}, not {datatype_name(array.dtype)}")
    shape = array.shape
    if array.ndim == 4 and shape[0] == 1:  # [1, H, W, C]
        array = array[0]
    elif array.ndim == 3 and shape[2] != channels and shape[0] == 1:  # [1, H, W]; [H, W, C] wins where both read
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise InvalidParameter(f"input 'image' must be [H, W], [H, W, C] or either with a leading batch of 1, got {list(shape)}")
    if array.dtype == np.float32:
        check_unit_interval(array, "an FP32 image")
    return np.ascontiguousarray(array)


def _scalar(inputs: dict[str, np.ndarray], name: str) -> int | None:
    if name not in inputs:
        return None
    value = inputs[name]
    if value.size != 1 or value.dtype.kind not in "iu":
        raise InvalidParameter(f"input {name!r} must hold one integer ({OPTIONAL_INPUTS[name]} [1]), got {datatype_name(value.dtype)} {list(value.shape)}")
    return int(value.reshape(-1)[0])


def _read_inputs(body: bytes, header: str | None, entry: ModelEntry, max_tensor_bytes: int) -> Inputs:
    """Parse the tensors and map them onto this model's inputs; run in a worker thread, as decoding
    an image file is on ``/v1`` (a JSON tensor of a megapixel is millions of numbers to parse)."""
    parsed = parse_request(body, header, max_tensor_bytes)
    unknown = sorted(set(parsed.inputs) - {"image", *OPTIONAL_INPUTS})
    if unknown:
        raise InvalidRequest(f"unknown inputs {unknown}; model {entry.name!r} takes image and optionally k and seed")
    if "image" not in parsed.inputs:
        raise InvalidRequest("the request has no input 'image'")
    image = _image(parsed.inputs["image"], entry.in_channels)
    return Inputs(parsed, image, _scalar(parsed.inputs, "k"), _scalar(parsed.inputs, "seed"))


def _requested(request: InferRequest) -> list[tuple[str, bool]]:
    """(output name, binary) in the order the response lists them."""
    if request.outputs is None:
        return [(name, request.binary_output) for name in OUTPUTS]
    unknown = [o.name for o in request.outputs if o.name not in OUTPUTS]
    if unknown:
        raise InvalidRequest(f"unknown outputs {unknown}; the model gives {', '.join(OUTPUTS)}")
    return [(o.name, o.binary) for o in request.outputs]


async def _infer(request: Request, segmenter: Segmenter, metrics: Metrics, name: str, version: str | None) -> Response:
    check_media(request.headers.get("content-type"), request.headers.get("content-encoding"))
    settings = request.app.state.settings
    async with admitted(request, name, version) as (entry, deadline):
        body = bytes(await read_stream(request))
        inputs = await asyncio.to_thread(_read_inputs, body, request.headers.get(HEADER_LENGTH), entry, settings.max_upload_bytes)
        del body
        wanted = _requested(inputs.request)
        request.state.job = {"model": entry.name, "version": entry.version, "k": inputs.k}  # for the access log
        seg = await segmenter.run(entry, inputs.image, inputs.k, inputs.seed, frozenset(OUTPUTS[n] for n, _ in wanted), deadline)
    request.state.job["k"] = seg.k
    started = time.perf_counter()
    outputs = [(n, seg.result[OUTPUTS[n]], binary) for n, binary in wanted]
    encoded = await asyncio.to_thread(build_response, entry.name, entry.version, inputs.request.id, outputs, {"k": seg.k, "seed": seg.seed})
    metrics.encode_seconds.labels("v2-binary" if encoded.header_length is not None else "v2-json").observe(time.perf_counter() - started)
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


@router.post("/models/{model_name}/infer", dependencies=keyed, responses=INFER_RESPONSES, openapi_extra=INFER_OPENAPI, response_class=Response)
async def infer(model_name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep) -> Response:
    """Segment one image: k sampled masks, p_F and its entropy, as the request names them."""
    return await _infer(request, segmenter, metrics, model_name, None)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer", dependencies=keyed, responses=INFER_RESPONSES, openapi_extra=INFER_OPENAPI,
    response_class=Response,
)
async def infer_version(model_name: str, model_version: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep) -> Response:
    """As ``infer``, on a pinned version of the model."""
    return await _infer(request, segmenter, metrics, model_name, model_version)
