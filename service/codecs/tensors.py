"""KServe v2 / Open Inference Protocol tensors over HTTP: inference requests and responses as JSON
(``data`` flattened row-major, or nested) or with the binary tensor data extension.

A binary body is ``Inference-Header-Content-Length`` bytes of JSON followed by the raw tensors
(little-endian, row-major) of the inputs that name a ``parameters.binary_data_size``, in input
order. Every size is checked against the declared shape before an array is built, so a request
whose parts disagree is refused (400) instead of being read past its end or reshaped silently.

This module knows the protocol, not the models: which inputs and outputs a model has is the route's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidParameter, InvalidRequest, PayloadTooLarge, UnsupportedMediaType

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"
# what a body may be labelled: tritonclient sends no content type, curl and perf_analyzer send these
ACCEPTED_MEDIA_TYPES = ("", JSON_MEDIA_TYPE, BINARY_MEDIA_TYPE)

DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in (
        ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
        ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
        ("FP32", np.float32), ("FP64", np.float64),
    )
}
# the protocol's other types: named so that a client gets "not supported" rather than "unknown"
REFUSED_DATATYPES = ("BOOL", "BYTES", "FP16", "BF16")
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# the protocol's shared-memory and classification extensions: asked for, they would change what a
# request means, so they are refused rather than ignored
_UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str  # "" when the request has none
    inputs: dict[str, np.ndarray]  # name -> array of the declared datatype and shape, in request order
    outputs: list[RequestedOutput] | None  # None: the request named none (the model's default set)
    binary_output: bool  # the request-level default for outputs it does not name
    parameters: dict[str, Any]


@dataclass(frozen=True)
class InferResponse:
    body: bytes
    header_length: int | None  # set when binary tensors follow the JSON

    @property
    def media_type(self) -> str:
        return JSON_MEDIA_TYPE if self.header_length is None else BINARY_MEDIA_TYPE

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {HEADER_LENGTH: str(self.header_length)}


def check_media(content_type: str | None, content_encoding: str | None) -> None:
    """Refuse what this codec cannot read before the body is: forms, and compressed bodies (whose
    decompressed size the body limit would not bound)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in ACCEPTED_MEDIA_TYPES:
        raise UnsupportedMediaType(f"send a KServe v2 request as {JSON_MEDIA_TYPE} or {BINARY_MEDIA_TYPE}, not {media}")
    if (content_encoding or "identity").strip().lower() != "identity":
        raise UnsupportedMediaType(f"compressed request bodies ({content_encoding}) are not accepted; send the body uncompressed")


def datatype(name: Any) -> np.dtype:
    if name in DATATYPES:
        return DATATYPES[name]
    if name in REFUSED_DATATYPES:
        raise InvalidParameter(f"datatype {name} is not supported; use one of {', '.join(DATATYPES)}")
    raise InvalidParameter(f"unknown datatype {name!r}; use one of {', '.join(DATATYPES)}")


def datatype_name(dtype: np.dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise ValueError(f"no KServe v2 datatype for {dtype}") from None


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON part's length from ``Inference-Header-Content-Length``; None when the whole body is JSON."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 20:
        raise InvalidRequest(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    length = int(text)
    if length > body_size:
        raise InvalidRequest(f"{HEADER_LENGTH} is {length} but the body holds only {body_size} bytes")
    return length


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = _object(holder.get("parameters", {}), f"{what}'s parameters")
    for name in _UNSUPPORTED_PARAMETERS:
        if name in parameters:
            raise InvalidRequest(f"{what}: parameter {name!r} is not supported (no shared memory or classification extension)")
    return parameters


def _flag(parameters: dict[str, Any], name: str, what: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what}: parameter {name!r} must be true or false")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    # bool is an int to Python, not to a client that sent `true` for a dimension
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidRequest(f"{what}: shape must be a list of integers")
    if any(d < 0 for d in value):
        raise InvalidRequest(f"{what}: shape {value} has a negative dimension")
    return tuple(value)


def _from_json(data: Any, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    """``data`` (flat or nested lists of numbers) -> a flat array of ``dtype`` holding ``count`` values."""
    if not isinstance(data, list):
        raise InvalidRequest(f"{what}: data must be a list of numbers")
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError) as exc:  # ragged nesting, or an integer no dtype holds
        raise InvalidRequest(f"{what}: data is not a regular array of numbers ({exc})") from None
    if values.size != count:
        raise InvalidRequest(f"{what}: data holds {values.size} values, its shape needs {count}")
    if count == 0:
        return np.zeros(0, dtype)
    # JSON true/false, strings and objects are no numbers; an integer type takes integers only
    allowed = "iu" if dtype.kind in "iu" else "iuf"
    if values.dtype.kind not in allowed:
        kind = "integers" if dtype.kind in "iu" else "numbers"
        raise InvalidParameter(f"{what}: {_NAMES[dtype]} data must hold {kind}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = int(values.min()), int(values.max())
        if low < info.min or high > info.max:
            raise InvalidParameter(f"{what}: values {low}..{high} do not fit {_NAMES[dtype]}")
    return values.reshape(-1).astype(dtype)


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    binary_size: int | None  # the bytes it takes after the JSON, or None when it carries ``data``
    data: list[Any] | None


def _spec(value: Any, index: int) -> _Spec:
    """One input's description, checked in form only: a request malformed anywhere is refused as
    malformed (400) before any of its sizes are weighed (413)."""
    spec = _object(value, f"inputs[{index}]")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"inputs[{index}] has no name")
    what = f"input {name!r}"
    dtype = datatype(spec.get("datatype"))
    shape = _shape(spec.get("shape"), what)
    size = _parameters(spec, what).get("binary_data_size")
    if size is None:
        if not isinstance(spec.get("data"), list):
            raise InvalidRequest(f"{what} needs data (a list of numbers) or parameters.binary_data_size")
        return _Spec(name, dtype, shape, None, spec["data"])
    if "data" in spec:
        raise InvalidRequest(f"{what} has both data and parameters.binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequest(f"{what}: binary_data_size must be a non-negative integer")
    return _Spec(name, dtype, shape, size, None)


def _tensor(spec: _Spec, binary: memoryview | None, offset: int, max_bytes: int) -> np.ndarray:
    """The array an input describes: its data, or its bytes of the binary part from ``offset``."""
    what, type_name = f"input {spec.name!r}", _NAMES[spec.dtype]
    count = math.prod(spec.shape)
    nbytes = count * spec.dtype.itemsize
    if nbytes > max_bytes:  # before any data is touched: the shape alone can promise anything
        raise PayloadTooLarge(f"{what}: shape {list(spec.shape)} of {type_name} is {nbytes} bytes, over the limit of {max_bytes}")
    if spec.binary_size is None:
        return _from_json(spec.data, spec.dtype, count, what).reshape(spec.shape)
    if spec.binary_size != nbytes:
        raise InvalidRequest(f"{what}: binary_data_size is {spec.binary_size} bytes, shape {list(spec.shape)} of {type_name} needs {nbytes}")
    if binary is None:
        raise InvalidRequest(f"{what} gives binary_data_size but the request has no {HEADER_LENGTH} header")
    if offset + nbytes > len(binary):
        raise InvalidRequest(f"{what}: its {nbytes} bytes run past the end of the body ({len(binary) - offset} left)")
    raw = np.frombuffer(binary, dtype=spec.dtype.newbyteorder("<"), count=count, offset=offset)
    return raw.astype(spec.dtype).reshape(spec.shape)  # a copy in native order: the body can go


def _requested_outputs(request: dict[str, Any], binary_default: bool) -> list[RequestedOutput] | None:
    value = request.get("outputs", [])
    if value == []:  # as Triton reads it: no output named, every output returned
        return None
    if not isinstance(value, list):
        raise InvalidRequest("outputs must be a list")
    outputs, seen = [], set()
    for index, spec in enumerate(value):
        spec = _object(spec, f"outputs[{index}]")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"outputs[{index}] has no name")
        if name in seen:
            raise InvalidRequest(f"output {name!r} is requested twice")
        seen.add(name)
        parameters = _parameters(spec, f"output {name!r}")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidRequest(f"output {name!r}: parameter 'binary_data' must be true or false")
        outputs.append(RequestedOutput(name, binary_default if binary is None else binary))
    return outputs


def parse_request(body: bytes, header: str | None, max_tensor_bytes: int) -> InferRequest:
    """A request body and its ``Inference-Header-Content-Length`` header value -> its tensors.
    ``max_tensor_bytes`` bounds what one input's shape may declare."""
    length = header_length(header, len(body))
    view = memoryview(body)
    head, binary = (view, None) if length is None else (view[:length], view[length:])
    try:
        request = json.loads(bytes(head))
    except RecursionError:
        raise InvalidRequest("the request JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer too long to convert
        raise InvalidRequest(f"the request is not valid JSON ({exc})") from None
    request = _object(request, "the request")
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest("id must be a string")
    parameters = _parameters(request, "the request")
    binary_output = _flag(parameters, "binary_data_output", "the request")
    given = request.get("inputs")
    if not isinstance(given, list) or not given:
        raise InvalidRequest("inputs must be a non-empty list")
    specs = [_spec(spec, index) for index, spec in enumerate(given)]
    outputs = _requested_outputs(request, binary_output)
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        if spec.name in inputs:
            raise InvalidRequest(f"input {spec.name!r} is given twice")
        inputs[spec.name] = _tensor(spec, binary, offset, max_tensor_bytes)
        offset += spec.binary_size or 0
    if binary is not None and offset != len(binary):
        raise InvalidRequest(f"the inputs' binary_data_size add up to {offset} bytes but {len(binary)} follow the JSON")
    return InferRequest(request_id, inputs, outputs, binary_output, parameters)


def _encode(tensors: list[tuple[str, np.ndarray, bool]], header: dict[str, Any], key: str) -> tuple[bytes, int | None]:
    """(name, array, binary) per tensor into ``header[key]`` -> (body, JSON length when binary data follows)."""
    specs, blobs = [], []
    for name, array, binary in tensors:
        spec: dict[str, Any] = {"name": name, "datatype": datatype_name(array.dtype), "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = array.reshape(-1).tolist()
        specs.append(spec)
    header[key] = specs
    head = json.dumps(header, separators=(",", ":")).encode()
    return (head, None) if not blobs else (b"".join([head, *blobs]), len(head))


def build_response(
    model: str, version: str, request_id: str, outputs: list[tuple[str, np.ndarray, bool]], parameters: dict[str, Any] | None = None,
) -> InferResponse:
    """(name, array, binary) per output, in the order given -> the response body: plain JSON, or
    JSON followed by the binary outputs when any output is binary."""
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id:  # perf_analyzer sends "id": "" for no id
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    return InferResponse(*_encode(outputs, header, "outputs"))


def build_request(
    inputs: list[tuple[str, np.ndarray, bool]], outputs: list[tuple[str, bool]] | None = None, parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """(name, array, binary) per input -> (body, headers): the client's side, for callers that speak
    the protocol without tritonclient (hand-made requests in tests)."""
    header: dict[str, Any] = {}
    if parameters:
        header["parameters"] = parameters
    if outputs is not None:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": binary}} for name, binary in outputs]
    body, length = _encode(inputs, header, "inputs")
    if length is None:
        return body, {"Content-Type": JSON_MEDIA_TYPE}
    return body, {"Content-Type": BINARY_MEDIA_TYPE, HEADER_LENGTH: str(length)}
