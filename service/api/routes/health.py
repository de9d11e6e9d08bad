"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.auth import metrics_caller
from service.api.deps import MetricsDep, RegistryDep

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request, registry: RegistryDep) -> JSONResponse:
    if registry.names():
        ok, why = await request.app.state.queue.ready(registry.names())
    else:
        ok, why = False, "no models loaded"
    return JSONResponse({"status": "ok" if ok else "unavailable", "detail": why, "models": registry.names()}, status_code=200 if ok else 503)


@router.get(
    "/metrics", dependencies=[Depends(metrics_caller)], response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request, m: MetricsDep) -> Response:
    await request.app.state.queue.observe()
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
