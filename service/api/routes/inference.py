"""``POST /v1/models/{name}/samples`` and ``/uncertainty``: thin over ``Segmenter``. A request is
admitted (key, rate, in-flight caps, the model's queue) before its body is read, and its response
is encoded in a worker thread: PNG-encoding k masks would otherwise stall every other request.

The response's format comes from ``format`` or else the ``Accept`` header: JSON (2-D inputs),
npz, NIfTI on the input's grid and affine, or DICOM SEG referencing a DICOM input's instances.
The binary formats carry the model, version, k and seed in ``X-Carseg-*`` headers."""

from __future__ import annotations

import asyncio
import time
from enum import StrEnum
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request, Response

from service.api.admission import admitted
from service.api.auth import authenticated
from service.api.body import openapi_body, read_body
from service.api.deps import MetricsDep, SegmenterDep
from service.api.schemas import ErrorResponse, SampleResponse, UncertaintyResponse
from service.codecs.dicom_seg import encode_dicom_seg
from service.codecs.nifti import encode_nifti
from service.codecs.outputs import NPZ_MEDIA_TYPE, b64, heat_png, npy_bytes, npz_bytes, png_bytes, zip_bytes
from service.errors import NotAcceptable
from service.jobs import Output
from service.segmentation import Segmentation, Segmenter

router = APIRouter(prefix="/v1/models", tags=["inference"], dependencies=[Depends(authenticated)])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 406, 413, 415, 422, 429, 500, 503, 504)}
# what each response needs of the runner, and the names it gives them: nothing else is computed
SAMPLES_JSON = {Output.LABELS: "masks"}
SAMPLES_NPZ = {Output.LABELS: "masks", Output.P_F: "probabilities", Output.ALEATORIC_ENTROPY: "entropy"}
UNCERTAINTY = {
    Output.P_F: "probabilities", Output.ALEATORIC_ENTROPY: "aleatoric_entropy", Output.SAMPLE_ENTROPY: "sample_entropy",
    Output.MUTUAL_INFORMATION: "mutual_information", Output.SAMPLE_VARIANCE: "sample_variance",
}
UNCERTAINTY_NIFTI = {**UNCERTAINTY, Output.LABELS: "mean"}  # the sample mean needs the samples
NIFTI_MEDIA_TYPE, ZIP_MEDIA_TYPE = "application/x-nifti", "application/zip"


class Format(StrEnum):
    JSON = "json"
    NPZ = "npz"
    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"


# what an Accept header names -> the format it gets when ``format`` is absent
ACCEPTED = {
    NPZ_MEDIA_TYPE: Format.NPZ, NIFTI_MEDIA_TYPE: Format.NIFTI, "application/gzip": Format.NIFTI,
    "application/dicom": Format.DICOM_SEG, "application/json": Format.JSON,
}
FormatQuery = Annotated[
    Format | None,
    Query(description="json (2-D inputs), npz, nifti (.nii.gz, k on the 4th axis) or dicom-seg (DICOM inputs: a zip of a "
          "BINARY and a FRACTIONAL SEG); default from Accept, else json"),
]
UncertaintyFormatQuery = Annotated[
    Literal["json", "npz", "nifti"] | None,
    Query(description="json (2-D inputs), npz or nifti (a zip of float volumes with the sample mean); default from Accept, else json"),
]
KQuery = Annotated[int | None, Query(description="number of samples (1..max_k, default 16)")]
SeedQuery = Annotated[int | None, Query(description="noise seed; the same (image, seed, k) gives the same masks")]
VersionQuery = Annotated[str | None, Query(description="pin a model version (default: latest)")]
AcceptHeader = Annotated[str | None, Header()]


async def _segment(
    request: Request, segmenter: Segmenter, name: str, version: str | None, k: int | None, seed: int | None, outputs: dict[Output, str],
) -> Segmentation:
    """Admit, read the body, run the domain call; parameters in a JSON body win over the query's."""
    if k is not None:  # a query value out of its bounds is refused even where the body overrides it
        segmenter.check_k(k)
    if seed is not None:
        segmenter.check_seed(seed)
    async with admitted(request, name, version) as (entry, deadline):
        body = await read_body(request)
        k, seed = k if body.k is None else body.k, seed if body.seed is None else body.seed
        request.state.job = {"model": entry.name, "version": entry.version, "k": k}  # for the access log
        return await segmenter.segment(entry, body.files, k, seed, frozenset(outputs), deadline)


def negotiate(format: Format | None, accept: str | None, allowed: tuple[Format, ...]) -> Format:
    """``format`` if given, else the first media type of ``Accept`` that names one, else JSON."""
    if format is None:
        named = [ACCEPTED[t.split(";")[0].strip()] for t in (accept or "").split(",") if t.split(";")[0].strip() in ACCEPTED]
        format = named[0] if named else Format.JSON
    if format not in allowed:
        raise NotAcceptable(f"this endpoint answers in {', '.join(f.value for f in allowed)}, not {format.value}")
    return format


def _named(seg: Segmentation, outputs: dict[Output, str]) -> dict[str, np.ndarray]:
    """The arrays of a 2-D input as they are; of a volume, with the slice axis after the sample or
    class axis: masks (k, D, H, W), probabilities (C, D, H, W), maps (D, H, W)."""
    if len(seg.results) == 1:
        return {label: seg.result[output] for output, label in outputs.items()}
    stacked = {label: seg.stacked(output) for output, label in outputs.items()}
    return {label: np.moveaxis(a, 0, 1) if a.ndim == 4 else a for label, a in stacked.items()}


def _headers(seg: Segmentation, filename: str) -> dict[str, str]:
    return {
        "Content-Disposition": f'attachment; filename="{filename}"', "X-Carseg-Model": seg.entry.name,
        "X-Carseg-Version": seg.entry.version, "X-Carseg-K": str(seg.k), "X-Carseg-Seed": str(seg.seed),
    }


@router.post(
    "/{name}/samples", response_model=SampleResponse,
    responses={**ERRORS, 200: {"content": {NPZ_MEDIA_TYPE: {}, NIFTI_MEDIA_TYPE: {}, ZIP_MEDIA_TYPE: {}}}},
    openapi_extra=openapi_body(),
)
async def post_samples(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None, accept: AcceptHeader = None, format: FormatQuery = None,
) -> Response:
    """k sampled masks of an image or a volume: JSON with base64 PNGs, an npz with masks, p_F and
    entropy, a NIfTI of the samples, or DICOM SEG (samples, iso-regions and the sample mean)."""
    chosen = negotiate(format, accept, (Format.JSON, Format.NPZ, Format.NIFTI, Format.DICOM_SEG))
    seg = await _segment(request, segmenter, name, version, k, seed, SAMPLES_NPZ if chosen is Format.NPZ else SAMPLES_JSON)
    started = time.perf_counter()
    response = await asyncio.to_thread(_samples_response, seg, chosen)
    metrics.encode_seconds.labels(chosen.value).observe(time.perf_counter() - started)
    return response


def _samples_response(seg: Segmentation, chosen: Format) -> Response:
    if chosen is Format.NPZ:
        return Response(npz_bytes(_named(seg, SAMPLES_NPZ)), media_type=NPZ_MEDIA_TYPE, headers=_headers(seg, "samples.npz"))
    if chosen is Format.NIFTI:
        data = encode_nifti(seg.per_voxel(seg.stacked(Output.LABELS)), seg.volume, f"carseg {seg.entry.name} k={seg.k} seed={seg.seed}")
        return Response(data, media_type=NIFTI_MEDIA_TYPE, headers=_headers(seg, "samples.nii.gz"))
    if chosen is Format.DICOM_SEG:
        data = encode_dicom_seg(seg.volume, seg.stacked(Output.LABELS), seg.sample_mean(), seg.entry.classes, seg.entry.name, seg.entry.version)
        return Response(data, media_type=ZIP_MEDIA_TYPE, headers=_headers(seg, "segmentation.zip"))
    masks = seg.result[Output.LABELS]
    height, width = masks.shape[1:]
    payload = SampleResponse(
        model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
        classes=seg.entry.classes, masks=[b64(png_bytes(mask)) for mask in masks],
    )
    return Response(payload.model_dump_json(), media_type="application/json")


@router.post(
    "/{name}/uncertainty", response_model=UncertaintyResponse,
    responses={**ERRORS, 200: {"content": {NPZ_MEDIA_TYPE: {}, ZIP_MEDIA_TYPE: {}}}},
    openapi_extra=openapi_body(),
)
async def post_uncertainty(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None, accept: AcceptHeader = None,
    preview: Annotated[bool, Query(description="add a PNG heat map of sample_entropy")] = False, format: UncertaintyFormatQuery = None,
) -> Response:
    """p_F and the uncertainty maps computed from k samples (JSON, npz, or a zip of NIfTI volumes
    that adds the sample mean)."""
    chosen = negotiate(Format(format) if format else None, accept, (Format.JSON, Format.NPZ, Format.NIFTI))
    seg = await _segment(request, segmenter, name, version, k, seed, UNCERTAINTY_NIFTI if chosen is Format.NIFTI else UNCERTAINTY)
    started = time.perf_counter()
    response = await asyncio.to_thread(_uncertainty_response, seg, chosen, preview)
    metrics.encode_seconds.labels(chosen.value).observe(time.perf_counter() - started)
    return response


def _uncertainty_response(seg: Segmentation, chosen: Format, preview: bool) -> Response:
    if chosen is Format.NIFTI:
        description = f"carseg {seg.entry.name} k={seg.k} seed={seg.seed}"
        volumes = {f"{label}.nii.gz": encode_nifti(seg.per_voxel(seg.stacked(output)), seg.volume, description) for output, label in UNCERTAINTY.items()}
        volumes["mean.nii.gz"] = encode_nifti(seg.per_voxel(seg.sample_mean()), seg.volume, description)
        return Response(zip_bytes(volumes), media_type=ZIP_MEDIA_TYPE, headers=_headers(seg, "uncertainty.zip"))
    if chosen is Format.JSON:
        seg.result  # noqa: B018 - a volume has no JSON form; this refuses it with the formats that fit
    arrays = _named(seg, UNCERTAINTY)
    if chosen is Format.NPZ:
        return Response(npz_bytes(arrays), media_type=NPZ_MEDIA_TYPE, headers=_headers(seg, "uncertainty.npz"))
    height, width = arrays["probabilities"].shape[1:]
    heat = b64(heat_png(arrays["sample_entropy"], float(np.log(len(seg.entry.classes))))) if preview else None
    payload = UncertaintyResponse(
        model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
        classes=seg.entry.classes, arrays={key: b64(npy_bytes(value)) for key, value in arrays.items()}, preview=heat,
    )
    return Response(payload.model_dump_json(), media_type="application/json")
