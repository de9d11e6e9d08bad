"""``POST /v1/models/{name}/samples`` and ``/uncertainty``: thin over ``Segmenter``. A request is
admitted (key, rate, in-flight caps, the model's queue) before its body is read, and its response
is encoded in a worker thread: PNG-encoding k masks would otherwise stall every other request."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request, Response

from service.api.auth import Caller, authenticated
from service.api.body import openapi_body, read_body
from service.api.deps import MetricsDep, SegmenterDep
from service.api.schemas import ErrorResponse, SampleResponse, UncertaintyResponse
from service.codecs.outputs import NPZ_MEDIA_TYPE, b64, heat_png, npy_bytes, npz_bytes, png_bytes, wants_npz
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
    deadline = time.time() + request.app.state.settings.request_timeout_s  # the upload counts against it
    caller: Caller = request.state.caller
    async with request.app.state.admission.slot(caller.id):
        entry = await segmenter.admit(name, version, deadline)
        body = await read_body(request)
        k, seed = k if body.k is None else body.k, seed if body.seed is None else body.seed
        request.state.job = {"model": entry.name, "version": entry.version, "k": k}  # for the access log
        return await segmenter.segment(entry, body.data, k, seed, frozenset(outputs), deadline)


def _named(seg: Segmentation, outputs: dict[Output, str]) -> dict[str, np.ndarray]:
    return {label: seg.result[output] for output, label in outputs.items()}


@router.post(
    "/{name}/samples", response_model=SampleResponse, responses={**ERRORS, 200: {"content": {NPZ_MEDIA_TYPE: {}}}},
    openapi_extra=openapi_body(),
)
async def post_samples(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None, accept: AcceptHeader = None,
) -> Response:
    """k sampled masks of an image (JSON with base64 PNGs, or an npz with masks, p_F and entropy)."""
    npz = wants_npz(accept)
    seg = await _segment(request, segmenter, name, version, k, seed, SAMPLES_NPZ if npz else SAMPLES_JSON)
    started = time.perf_counter()
    response = await asyncio.to_thread(_samples_response, seg, npz)
    metrics.encode_seconds.labels("npz" if npz else "json").observe(time.perf_counter() - started)
    return response


def _samples_response(seg: Segmentation, npz: bool) -> Response:
    if npz:
        return Response(npz_bytes(_named(seg, SAMPLES_NPZ)), media_type=NPZ_MEDIA_TYPE)
    masks = seg.result[Output.LABELS]
    height, width = masks.shape[1:]
    payload = SampleResponse(
        model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
        classes=seg.entry.classes, masks=[b64(png_bytes(mask)) for mask in masks],
    )
    return Response(payload.model_dump_json(), media_type="application/json")


@router.post(
    "/{name}/uncertainty", response_model=UncertaintyResponse, responses={**ERRORS, 200: {"content": {NPZ_MEDIA_TYPE: {}}}},
    openapi_extra=openapi_body(),
)
async def post_uncertainty(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None, accept: AcceptHeader = None,
    preview: Annotated[bool, Query(description="add a PNG heat map of sample_entropy")] = False,
) -> Response:
    """p_F and the uncertainty maps computed from k samples."""
    npz = wants_npz(accept)
    seg = await _segment(request, segmenter, name, version, k, seed, UNCERTAINTY)
    started = time.perf_counter()
    response = await asyncio.to_thread(_uncertainty_response, seg, npz, preview)
    metrics.encode_seconds.labels("npz" if npz else "json").observe(time.perf_counter() - started)
    return response


def _uncertainty_response(seg: Segmentation, npz: bool, preview: bool) -> Response:
    arrays = _named(seg, UNCERTAINTY)
    if npz:
        return Response(npz_bytes(arrays), media_type=NPZ_MEDIA_TYPE)
    height, width = arrays["probabilities"].shape[1:]
    heat = b64(heat_png(arrays["sample_entropy"], float(np.log(len(seg.entry.classes))))) if preview else None
    payload = UncertaintyResponse(
        model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
        classes=seg.entry.classes, arrays={key: b64(npy_bytes(value)) for key, value in arrays.items()}, preview=heat,
    )
    return Response(payload.model_dump_json(), media_type="application/json")
