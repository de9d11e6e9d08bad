"""Pure ASGI middleware: a request-body size limit enforced while streaming, and per-request
bookkeeping: a request id (taken from a client's ``X-Request-ID`` when it is short and plain, else
made here; returned in the response header and on every log line of the request), latency metrics
per route template (not the raw path, so label cardinality stays bounded) and one access log line."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge
from service.logs import request_id
from service.metrics import Metrics

access_log = logging.getLogger("carseg.access")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


async def _send_json(send: Send, status: int, body: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, {"error": PayloadTooLarge.reason, "detail": f"request body of {int(declared)} bytes exceeds {self.max_bytes}"})
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class RequestLog:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, recording)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(template, scope["method"], str(status["code"])).observe(elapsed)
            state = scope.get("state", {})
            caller = state.get("caller")
            access_log.info(
                "%s %s %d", scope["method"], template, status["code"],
                extra={"route": template, "method": scope["method"], "status": status["code"], "seconds": round(elapsed, 4),
                       "caller": getattr(caller, "id", None), **state.get("job", {})},
            )
            request_id.reset(token)
