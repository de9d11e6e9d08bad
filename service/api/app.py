"""The app factory: settings -> registry -> queue -> segmenter, wired in the lifespan. Which queue
is the caller's choice (``service.server.open_queue``): this package never imports torch."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.admission import Admission
from service.api.auth import ApiKeys
from service.api.middleware import BodyLimit, RequestLog
from service.api.routes import contours, health, inference, models, monai_label, v2, viewer
from service.api.sessions import Sessions
from service.config import Settings
from service.errors import ServiceError
from service.metrics import Metrics
from service.queue import JobQueue
from service.registry import ModelRegistry
from service.segmentation import SEED_MAX, Segmenter

log = logging.getLogger(__name__)

QueueFactory = Callable[[Settings, ModelRegistry, Metrics], JobQueue]


def _error(request: Request, exc: ServiceError) -> JSONResponse:
    request.app.state.metrics.errors.labels(exc.reason).inc()
    request.state.job = {**getattr(request.state, "job", {}), "error": exc.reason}
    return JSONResponse({"error": exc.reason, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


def _allowed(request: Request, fallback: str) -> str:
    """The methods the OpenAPI document lists on the request's path (Starlette names only the first
    matching route's, wrong where GET and DELETE are separate routes); ``fallback`` off the document."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\{[^}/]+\}", "[^/]+", template), request.url.path):
            methods |= {method.upper() for method in operations}
    return ", ".join(sorted(methods)) or fallback


def _state_bounds(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The OpenAPI document with the bounds this deployment enforces, so that a schema-driven
    client knows them: k and seed (query and JSON body) and the size of a base64 image."""
    bounds = {
        "k": {"minimum": 1, "maximum": settings.max_k},
        "seed": {"minimum": 0, "maximum": SEED_MAX},
        "image": {"minLength": 4, "maxLength": settings.max_upload_bytes * 4 // 3 + 4},
    }

    def bound(field: dict[str, Any], name: str) -> None:
        for option in field.get("anyOf", [field]):
            if name in bounds and option.get("type") in ("integer", "string"):
                option.update(bounds[name])

    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] != "image":  # a query's image is an id (MONAI Label's), not base64 bytes
                    bound(parameter["schema"], parameter["name"])
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            for name, field in body.get("properties", {}).items():
                bound(field, name)
    return schema


PUBLIC = ("/auth/", "/auth/token")  # MONAI Label's login: asked before the viewer holds a key


def _state_auth(schema: dict[str, Any], keyed_metrics: bool) -> None:
    """Declare the bearer key on the operations that ask for it (all but health, docs, the login
    and, unless configured, metrics), so that a schema-driven client sends it."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http", "scheme": "bearer", "description": "a key from CARSEG_API_KEYS",
    }
    for route, path in schema.get("paths", {}).items():
        if route.startswith("/health") or route in PUBLIC or (route == "/metrics" and not keyed_metrics):
            continue
        for operation in path.values():
            operation["security"] = [{"apiKey": []}]


def create_app(settings: Settings, open_queue: QueueFactory) -> FastAPI:
    metrics = Metrics()
    api_keys = ApiKeys.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ModelRegistry(settings.model_dir)
        queue = open_queue(settings, registry, metrics)
        await queue.start()
        app.state.registry, app.state.queue = registry, queue
        app.state.segmenter = Segmenter(settings, registry, queue)
        for name in registry.names():  # the drift band of each model's latest version
            reference = registry.get(name).manifest.get("uncertainty_reference")
            if reference:
                metrics.set_uncertainty_reference(name, reference)
        log.info("serving %s from %s with the %s queue", registry.names(), settings.model_dir, settings.queue)
        try:
            yield
        finally:
            await queue.stop()

    app = FastAPI(
        title="carseg", version="0.1.0", lifespan=lifespan,
        description="Calibrated stochastic segmentation: k plausible masks and uncertainty maps per image.",
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.api_keys, app.state.admission = api_keys, Admission(settings)
    app.state.sessions = Sessions(settings.max_sessions, settings.max_session_bytes, settings.session_expiry_s)
    app.include_router(inference.router)
    app.include_router(contours.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(v2.router)
    app.include_router(monai_label.router)
    app.include_router(monai_label.login)
    app.include_router(viewer.router)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        request.app.state.metrics.errors.labels("invalid_parameter").inc()
        return JSONResponse({"error": "invalid_parameter", "detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # the headers matter: a 405 names the methods allowed (Allow), of every route on the path
        # (Starlette names only the first route's, wrong where GET and DELETE are separate routes)
        if exc.status_code == 405:
            headers = {**(exc.headers or {}), "Allow": _allowed(request, (exc.headers or {}).get("Allow", ""))}
        else:
            headers = exc.headers
        return JSONResponse({"error": reason, "detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        request.app.state.metrics.errors.labels("internal").inc()
        return JSONResponse({"error": "internal", "detail": "internal error; it has been logged"}, status_code=500)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = _state_bounds(get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes), settings)
            if api_keys.required:
                _state_auth(schema, keyed_metrics=settings.metrics_require_key)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # base64 makes JSON bodies 4/3 of the file; the slack covers multipart headers
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes * 4 // 3 + 65536)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"], expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestLog, metrics=metrics)
    return app
