"""``POST /v1/models/{name}/samples`` and ``/uncertainty``: thin over ``Segmenter.segment``."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, Query, Request, Response

from service.api.body import OPENAPI_BODY, read_body
from service.api.deps import MetricsDep, SegmenterDep
from service.codecs.outputs import NPZ_MEDIA_TYPE, b64, heat_png, npy_bytes, npz_bytes, png_bytes, wants_npz
from service.schemas import ErrorResponse, SampleResponse, UncertaintyResponse
from service.segmentation import Segmentation, Segmenter

router = APIRouter(prefix="/v1/models", tags=["inference"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503, 504)}
UNCERTAINTY_MAPS = ("aleatoric_entropy", "sample_entropy", "mutual_information", "sample_variance")
KQuery = Annotated[int | None, Query(description="number of samples (1..max_k, default 16)")]
SeedQuery = Annotated[int | None, Query(description="noise seed; the same (image, seed, k) gives the same masks")]
VersionQuery = Annotated[str | None, Query(description="pin a model version (default: latest)")]
AcceptHeader = Annotated[str | None, Header()]


async def _segment(request: Request, segmenter: Segmenter, name: str, version: str | None, k: int | None, seed: int | None) -> Segmentation:
    """Read the body and run the domain call; parameters in a JSON body win over the query's."""
    body = await read_body(request)
    return await segmenter.segment(name, version, body.data, k if body.k is None else body.k, seed if body.seed is None else body.seed)


@router.post(
    "/{name}/samples", response_model=SampleResponse, responses={**ERRORS, 200: {"content": {NPZ_MEDIA_TYPE: {}}}},
    openapi_extra=OPENAPI_BODY,
)
async def post_samples(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None, accept: AcceptHeader = None,
) -> Response:
    """k sampled masks of an image (JSON with base64 PNGs, or an npz with masks, p_F and entropy)."""
    seg = await _segment(request, segmenter, name, version, k, seed)
    started = time.perf_counter()
    result = seg.result
    if wants_npz(accept):
        content = npz_bytes({"masks": result.labels, "probabilities": result.probabilities, "entropy": result.aleatoric_entropy})
        response: Response = Response(content, media_type=NPZ_MEDIA_TYPE)
        fmt = "npz"
    else:
        height, width = result.labels.shape[1:]
        payload = SampleResponse(
            model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
            classes=seg.entry.classes, masks=[b64(png_bytes(mask)) for mask in result.labels],
        )
        response = Response(payload.model_dump_json(), media_type="application/json")
        fmt = "json"
    metrics.encode_seconds.labels(fmt).observe(time.perf_counter() - started)
    return response


@router.post(
    "/{name}/uncertainty", response_model=UncertaintyResponse, responses={**ERRORS, 200: {"content": {NPZ_MEDIA_TYPE: {}}}},
    openapi_extra=OPENAPI_BODY,
)
async def post_uncertainty(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None, accept: AcceptHeader = None,
    preview: Annotated[bool, Query(description="add a PNG heat map of sample_entropy")] = False,
) -> Response:
    """p_F and the uncertainty maps computed from k samples."""
    seg = await _segment(request, segmenter, name, version, k, seed)
    started = time.perf_counter()
    result = seg.result
    arrays = {"probabilities": result.probabilities, **{m: getattr(result, m) for m in UNCERTAINTY_MAPS}}
    if wants_npz(accept):
        response: Response = Response(npz_bytes(arrays), media_type=NPZ_MEDIA_TYPE)
        fmt = "npz"
    else:
        height, width = result.probabilities.shape[1:]
        heat = b64(heat_png(result.sample_entropy, float(np.log(len(seg.entry.classes))))) if preview else None
        payload = UncertaintyResponse(
            model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
            classes=seg.entry.classes, arrays={key: b64(npy_bytes(value)) for key, value in arrays.items()}, preview=heat,
        )
        response = Response(payload.model_dump_json(), media_type="application/json")
        fmt = "json"
    metrics.encode_seconds.labels(fmt).observe(time.perf_counter() - started)
    return response
