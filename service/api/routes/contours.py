"""``POST /v1/models/{name}/contours``: where the k samples agree, as 10/50/90% iso-contours of each
foreground class's sample frequency, with the frequency maps and the input as 8-bit PNGs so that a
viewer can draw the overlay for inputs a browser cannot show (DICOM, NIfTI). Only the label maps
are computed; the same (image, seed, k) gives the same samples as ``/samples``."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

from service.api.auth import authenticated
from service.api.body import openapi_body
from service.api.deps import MetricsDep, SegmenterDep
from service.api.routes.inference import ERRORS, KQuery, SeedQuery, VersionQuery, _segment
from service.api.schemas import ContourLevel, ContourResponse
from service.codecs.contours import LEVELS, display_image, iso_contours, unit_8bit
from service.codecs.outputs import b64, png_bytes
from service.jobs import Output
from service.segmentation import Segmentation

router = APIRouter(prefix="/v1/models", tags=["inference"], dependencies=[Depends(authenticated)])

CONTOURS = {Output.LABELS: "masks"}
DECIMALS = 3  # a thousandth of a pixel: beyond what any display shows, and it keeps the JSON small


@router.post("/{name}/contours", response_model=ContourResponse, responses=ERRORS, openapi_extra=openapi_body())
async def post_contours(
    name: str, request: Request, segmenter: SegmenterDep, metrics: MetricsDep,
    k: KQuery = None, seed: SeedQuery = None, version: VersionQuery = None,
) -> Response:
    """10/50/90% iso-contours of each foreground class's frequency across k samples."""
    seg = await _segment(request, segmenter, name, version, k, seed, CONTOURS)
    started = time.perf_counter()
    response = await asyncio.to_thread(_contours_response, seg)
    metrics.encode_seconds.labels("json").observe(time.perf_counter() - started)
    return response


def _contours_response(seg: Segmentation) -> Response:
    labels = seg.result[Output.LABELS]  # a volume is refused here: its contours have no JSON form yet
    height, width = labels.shape[1:]
    contours, means = {}, {}
    for name, frequency in zip(seg.entry.classes[1:], seg.sample_mean()[0], strict=True):
        by_level = iso_contours(frequency, LEVELS)
        contours[name] = [
            ContourLevel(level=level, polygons=[np.round(p, DECIMALS).tolist() for p in polygons]) for level, polygons in by_level.items()
        ]
        means[name] = b64(png_bytes(unit_8bit(frequency)))
    payload = ContourResponse(
        model=seg.entry.name, version=seg.entry.version, k=seg.k, seed=seg.seed, height=height, width=width,
        classes=seg.entry.classes, levels=list(LEVELS), contours=contours, mean=means, image=b64(png_bytes(display_image(seg.image))),
    )
    return Response(payload.model_dump_json(), media_type="application/json")
