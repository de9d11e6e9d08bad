"""MONAI Label's REST dialect, so that its 3D Slicer and OHIF v3 plugins and its Python client use
carseg unchanged: ``GET /info/``, ``POST /infer/{model}`` (multipart ``file`` + ``params`` JSON,
``output=image|json|all``) and the sessions Slicer uploads a local volume through.

The label a viewer gets is one volume, the samples' majority (a class wins a voxel where more
than half of the k samples mark it). The rest of the method comes through ``params``: ``k`` and
``seed`` in, and out, in the result's ``params``, how the samples disagree (each sample's lesion
volume, the mean uncertainties); ``"samples": true`` adds the k samples and the sample mean as
NIfTI files to an ``output=all`` answer. Shapes follow MONAI Label's own server
(``monailabel/endpoints/infer.py``, ``interfaces/app.py``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.datastructures import UploadFile

from service.api.admission import admitted
from service.api.auth import authenticated
from service.api.deps import RegistryDep, SettingsDep
from service.api.schemas import ErrorResponse
from service.api.sessions import Sessions
from service.codecs.nifti import encode_nifti
from service.codecs.nrrd import encode_nrrd
from service.dicomweb import DicomWeb
from service.errors import InvalidParameter, InvalidRequest
from service.jobs import Output
from service.segmentation import Segmentation

router = APIRouter(tags=["MONAI Label"], dependencies=[Depends(authenticated)])
# MONAI Label's login: the viewers ask /auth/ whether to prompt, then trade a user name and password
# for a bearer token. Here the password is an API key and the token is that key.
login = APIRouter(prefix="/auth", tags=["MONAI Label"])
VERSION = "0.1.0"
OUTPUTS = frozenset({Output.LABELS, Output.ALEATORIC_ENTROPY, Output.MUTUAL_INFORMATION})
EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
DTYPES = ("uint8", "uint16")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def _multipart_body(properties: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": bool(required), "content": {"multipart/form-data": {"schema": schema}}}}


BINARY = {"type": "string", "format": "binary"}
INFER_BODY = _multipart_body({
    "file": {**BINARY, "description": "the image: NIfTI, DICOM (an instance or a zip of a series), PNG, JPEG or .npy"},
    "params": {"type": "string", "description": 'JSON: {"k", "seed", "samples", "result_extension", "result_dtype", "result_compress"}'},
}, [])
SESSION_BODY = _multipart_body({"files": {"type": "array", "items": BINARY, "description": "an image, or a DICOM series' files"}}, ["files"])
TOKEN_BODY = {"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "required": ["username", "password"],
    "properties": {"username": {"type": "string"}, "password": {"type": "string", "description": "an API key"},
                   "grant_type": {"type": "string"}},
}}}}}
INFER_RESPONSES = {
    **_errors(400, 401, 404, 413, 415, 422, 429, 500, 502, 503, 504),
    200: {"description": "output=all: multipart (params, then the label file); json: params; image: the label file",
          "content": {"multipart/form-data": {}, "application/json": {}, "application/octet-stream": {}}},
}


class ResultType(StrEnum):
    image = "image"
    json = "json"
    all = "all"


def _labels(classes: list[str]) -> dict[str, int]:
    """MONAI Label's label map: the foreground classes by their index (0 is background)."""
    return {name: index for index, name in enumerate(classes) if index > 0}


@login.get("/")
async def auth_enabled(request: Request) -> dict[str, Any]:
    return {"enabled": request.app.state.api_keys.required, "client_id": "carseg", "realm-uri": ""}


@login.post("/token", responses=_errors(400, 401), openapi_extra=TOKEN_BODY)
async def auth_token(request: Request) -> dict[str, Any]:
    """OAuth2's password grant, as the MONAI Label client sends it: any user name, an API key as the password."""
    async with request.form(max_files=0, max_fields=8) as form:
        password = form.get("password")
    if not isinstance(password, str) or not password:
        raise InvalidRequest("send the form fields username and password (an API key)")
    request.app.state.api_keys.caller(f"Bearer {password}")  # Unauthorized unless it is a key
    return {"access_token": password, "token_type": "Bearer"}


@login.get("/token/valid", dependencies=[Depends(authenticated)], responses=_errors(401))
async def auth_token_valid() -> dict[str, Any]:
    return {"valid": True}


@router.get("/info/", responses=_errors(401))
async def info(request: Request, registry: RegistryDep, settings: SettingsDep) -> dict[str, Any]:
    """The app as MONAI Label describes one: each model an inferer of type segmentation."""
    models = {}
    for name in registry.names():
        entry = registry.get(name)
        models[name] = {
            "type": "segmentation", "labels": _labels(entry.classes), "dimension": 3,
            "description": f"carseg {name} v{entry.version}: the majority of k calibrated samples (CAR); "
                           "params k, seed; 'samples': true adds the samples and their mean",
            "config": {"k": settings.default_k, "seed": 0, "samples": False, "result_extension": ".nii.gz", "result_dtype": "uint8"},
        }
    labels: list[str] = []
    for model in models.values():
        labels += [label for label in model["labels"] if label not in labels]
    return {
        "name": "carseg", "description": "Calibrated stochastic segmentation (CAR)", "version": VERSION, "labels": labels,
        "models": models, "trainers": {}, "strategies": {}, "scoring": {}, "train_stats": {},
        "datastore": {"total": len(request.app.state.sessions), "completed": 0, "label_tags": {}},
    }


def _params(text: str | None) -> dict[str, Any]:
    try:
        params = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise InvalidParameter(f"'params' is not valid JSON ({exc})") from exc
    if not isinstance(params, dict):
        raise InvalidParameter("'params' must be a JSON object")
    return params


def _int_param(params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).lstrip("-").isdigit():
        raise InvalidParameter(f"params.{name} must be an integer, got {value!r}")
    return int(value)


def _sessions(request: Request) -> Sessions:
    return request.app.state.sessions


async def _files(request: Request, form: Any, image: str, session_id: str) -> list[bytes]:
    """The image to segment: an uploaded ``file``, a session's files, or (not kept here) an id."""
    upload = form.get("file")
    if isinstance(upload, UploadFile):
        return [await upload.read()]
    if session_id:
        return _sessions(request).get(session_id).files
    if image and image in _sessions(request):
        return _sessions(request).get(image).files  # uploaded by id (PUT /datastore/?image=ID)
    settings = request.app.state.settings
    if image and settings.dicomweb_url:
        token = settings.dicomweb_token.get_secret_value() if settings.dicomweb_token else None
        return await DicomWeb(settings.dicomweb_url, token, settings.max_upload_bytes, settings.request_timeout_s).series(image)
    if image:
        raise InvalidRequest(
            f"image id {image!r} names no uploaded image and no PACS is configured (CARSEG_DICOMWEB_URL): send the image as "
            "the multipart field 'file', or upload it first (PUT /datastore/?image=ID, or PUT /session/ and pass session_id)"
        )
    raise InvalidRequest("neither a 'file', an image id nor a session_id was given")


def _majority(seg: Segmentation, labels: np.ndarray) -> np.ndarray:
    """``labels`` (D, k, H, W) -> (D, H, W): the class more than half of the samples mark; background where none does."""
    counts = np.stack([(labels == c).sum(axis=1) for c in range(len(seg.entry.classes))], axis=1)
    winner = counts.argmax(axis=1)
    return np.where(counts.max(axis=1) * 2 > seg.k, winner, 0).astype(np.uint8)


def _summary(seg: Segmentation, labels: np.ndarray) -> dict[str, Any]:
    """How the k samples (``labels`` (D, k, H, W)) disagree, in numbers a viewer can show beside the label."""
    areas = {name: [int((labels[:, s] == index).sum()) for s in range(seg.k)] for name, index in _labels(seg.entry.classes).items()}
    voxel_ml = float(np.prod(seg.volume.spacing)) / 1000.0
    return {
        "model": seg.entry.name, "version": seg.entry.version, "k": seg.k, "seed": seg.seed,
        "sample_volumes_ml": {name: [round(a * voxel_ml, 4) for a in counts] for name, counts in areas.items()}
        if seg.volume.kind != "image" else None,
        "sample_areas_px": areas,
        "mean_aleatoric_entropy": float(seg.stacked(Output.ALEATORIC_ENTROPY).mean()),
        "mean_mutual_information": float(seg.stacked(Output.MUTUAL_INFORMATION).mean()),
    }


def _label_file(seg: Segmentation, labels: np.ndarray, extension: str, dtype: str, compress: bool) -> tuple[str, bytes]:
    majority = _majority(seg, labels).astype(dtype)
    if extension == ".nrrd":
        return "label.nrrd", encode_nrrd(majority, seg.volume, compress)
    data = encode_nifti(majority, seg.volume, f"carseg {seg.entry.name} majority of k={seg.k}")
    if extension == ".nii":
        import gzip

        return "label.nii", gzip.decompress(data)
    return "label.nii.gz", data


def _multipart(params: dict[str, Any], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data answer as MONAI Label sends one: ``params`` (JSON) then the files."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'.encode()
        + json.dumps(params).encode() + b"\r\n"
    ]
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name.split(".")[0]}"; filename="{name}"\r\n'
        parts.append((head + "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _answer(seg: Segmentation, params: dict[str, Any], output: ResultType, timings: dict[str, float]) -> Response:
    extension = str(params.get("result_extension") or ".nii.gz")
    dtype = str(params.get("result_dtype") or "uint8")
    if extension not in EXTENSIONS:
        raise InvalidParameter(f"params.result_extension must be one of {EXTENSIONS}, got {extension!r}")
    if dtype not in DTYPES:
        raise InvalidParameter(f"params.result_dtype must be one of {DTYPES}, got {dtype!r}")
    started = time.perf_counter()
    labels = seg.stacked(Output.LABELS)  # (D, k, H, W), once for the label, the summary and the samples
    result: dict[str, Any] = {"label_names": _labels(seg.entry.classes), "centroids": {}, "carseg": _summary(seg, labels)}
    name, label = _label_file(seg, labels, extension, dtype, bool(params.get("result_compress", True)))
    timings["write"] = time.perf_counter() - started
    result["latencies"] = {**{key: round(value, 3) for key, value in timings.items()}, "invert": 0.0, "transform": None,
                           "total": round(sum(timings.values()), 3)}
    if output is ResultType.json:
        return Response(json.dumps(result), media_type="application/json")
    if output is ResultType.image:
        return Response(label, media_type="application/octet-stream", headers={"Content-Disposition": f'attachment; filename="{name}"'})
    files = [(name, label)]
    if params.get("samples"):
        description = f"carseg {seg.entry.name} k={seg.k} seed={seg.seed}"
        samples, mean = seg.per_voxel(labels), seg.per_voxel(seg.sample_mean())
        files += [("samples.nii.gz", encode_nifti(samples, seg.volume, description)), ("mean.nii.gz", encode_nifti(mean, seg.volume, description))]
        result["carseg"]["files"] = [f for f, _ in files]
    body, content_type = _multipart(result, files)
    return Response(body, media_type=content_type)


@router.post("/infer/{model}", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def infer(
    model: str, request: Request,
    image: Annotated[str, Query(description="an image id (carseg keeps no datastore: use file or session_id)")] = "",
    session_id: Annotated[str, Query(description="a session made by PUT /session/")] = "",
    output: Annotated[ResultType | None, Query(description="image: the label file; json: params; all (default): both")] = None,
) -> Response:
    """Segment the uploaded ``file`` (or a session's image): the samples' majority as a label volume."""
    segmenter = request.app.state.segmenter
    started = time.perf_counter()
    async with admitted(request, model, None) as (entry, deadline):
        async with request.form(max_files=2, max_fields=8) as form:
            params = _params(form.get("params") if isinstance(form.get("params"), str) else None)  # type: ignore[arg-type]
            if params.get("version") is not None:  # a pinned version comes in the body; the queue admitted the model
                entry = segmenter.registry.get(model, str(params["version"]))
            files = await _files(request, form, image, session_id)
        request.state.job = {"model": entry.name, "version": entry.version, "k": params.get("k")}
        pre = time.perf_counter()
        seg = await segmenter.segment(entry, files, _int_param(params, "k"), _int_param(params, "seed"), OUTPUTS, deadline)
        timings = {"pre": 0.0, "infer": time.perf_counter() - pre}
        timings["pre"] = pre - started
        return await asyncio.to_thread(_answer, seg, params, output or ResultType.all, timings)


UPLOAD_BODY = _multipart_body({"file": {**BINARY, "description": "the image (MONAI Label's params field is accepted and ignored)"}}, ["file"])


@router.put("/datastore/", responses=_errors(400, 401, 413, 422), openapi_extra=UPLOAD_BODY)
@router.put("/datastore/image", responses=_errors(400, 401, 413, 422), openapi_extra=UPLOAD_BODY)
async def upload_image(request: Request, image: Annotated[str | None, Query(description="the id to keep it under")] = None) -> dict[str, Any]:
    """Keep an image under an id to segment by ``/infer/{model}?image=ID`` (3D Slicer's upload). It
    lives in this process's memory like a session, and expires like one."""
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("multipart body has no file field 'file'")
        data, filename = await upload.read(), upload.filename or "image"
    name = image or filename.split(".")[0] or uuid.uuid4().hex
    _sessions(request).add([data], [filename], 0, name=name)
    return {"image": name}


@router.head("/datastore/image", responses=_errors(401, 404))
async def image_exists(request: Request, image: str) -> Response:
    _sessions(request).get(image)
    return Response(status_code=200, media_type="application/json")


@router.put("/session/", responses=_errors(400, 401, 413, 422), openapi_extra=SESSION_BODY)
async def create_session(
    request: Request,
    expiry: Annotated[int, Query(description="seconds to keep it (0: the server's maximum)")] = 0,
    uncompress: Annotated[bool, Query(description="accepted for compatibility: archives are read as they are")] = False,
) -> dict[str, Any]:
    """Keep an image (or a DICOM series' files) to segment by ``session_id``."""
    settings = request.app.state.settings
    async with request.form(max_files=settings.max_slices, max_fields=8) as form:
        uploads = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
        if not uploads:
            raise InvalidRequest("multipart body has no file field 'files'")
        files = [await upload.read() for upload in uploads]
        names = [upload.filename or "image" for upload in uploads]
    session = _sessions(request).add(files, names, expiry)
    return {"session_id": session.id, "session_info": session.info()}


@router.get("/session/{session_id}", responses=_errors(401, 404))
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    return _sessions(request).get(session_id).info()


@router.delete("/session/{session_id}", responses=_errors(401, 404))
async def remove_session(session_id: str, request: Request) -> dict[str, Any]:
    return _sessions(request).remove(session_id).info()
