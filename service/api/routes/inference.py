"""``POST /v1/models/{name}/samples`` and ``/uncertainty``: thin over ``Segmenter.segment``."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, Query, Request, Response

from service.api.body import OPENAPI_BODY, read_body
from service.api.deps import MetricsDep, SegmenterDep
from service.api.schemas import ErrorResponse, SampleResponse, UncertaintyResponse
from service.codecs.outputs import NPZ_MEDIA_TYPE, b64, heat_png, npy_bytes, npz_bytes, png_bytes, wants_npz
from service.jobs import Output
from service.segmentation import Segmentation, Segmenter

router = APIRouter(prefix="/v1/models", tags=["inference"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503, 504)}
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
    """Read the body and run the domain call; parameters in a JSON body win over the query's."""
    body = await read_body(request)
    k, seed = k if body.k is None else body.k, seed if body.seed is None else body.seed
    return await segmenter.segment(name, version, body.data, k, seed, frozenset(outputs))


def _named(seg: Segmentation, outputs: dict[Output, str]) -> dict[str, np.ndarray]:
    return {label: seg.result[output] for output, label in outputs.items()}


@router.post(
    "/{name}/samples", response_model=SampleResponse, responses={**ERRORS, 200: {"content": {NPZ_MEDIA_TYPE: {}}}},
    openapi_extra=OPENAPI_BODY,
)
async def post_samples(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None, accept: AcceptHeader = None,
) -> Response:
    """k sampled masks of an image (JSON with base64 PNGs, or an npz with masks, p_F and entropy)."""
    npz = wants_npz(accept)
    seg = await _segment(request, segmenter, name, version, k, seed, SAMPLES_NPZ if npz else SAMPLES_JSON)
    started = time.perf_counter()
    if npz:
        response: Response = Response(npz_bytes(_named(seg, SAMPLES_NPZ)), media_type=NPZ_MEDIA_TYPE)
        fmt = "npz"
    else:
        masks = seg.result[Output.LABELS]
        height, width = masks.shape[1:]
        payload = SampleResponse(
            model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
            classes=seg.entry.classes, masks=[b64(png_bytes(mask)) for mask in masks],
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
    seg = await _segment(request, segmenter, name, version, k, seed, UNCERTAINTY)
    started = time.perf_counter()
    arrays = _named(seg, UNCERTAINTY)
    if wants_npz(accept):
        response: Response = Response(npz_bytes(arrays), media_type=NPZ_MEDIA_TYPE)
        fmt = "npz"
    else:
        height, width = arrays["probabilities"].shape[1:]
        heat = b64(heat_png(arrays["sample_entropy"], float(np.log(len(seg.entry.classes))))) if preview else None
        payload = UncertaintyResponse(
            model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
            classes=seg.entry.classes, arrays={key: b64(npy_bytes(value)) for key, value in arrays.items()}, preview=heat,
        )
        response = Response(payload.model_dump_json(), media_type="application/json")
        fmt = "json"
    metrics.encode_seconds.labels(fmt).observe(time.perf_counter() - started)
    return response
