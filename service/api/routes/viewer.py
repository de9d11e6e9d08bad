"""``GET /``: a browser viewer for the inference routes, three static files with no build step.
It is open (no key): the page asks for the key and sends it with its API calls. Its Content
Security Policy keeps it to this origin, so the page cannot be made to fetch or send elsewhere."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
# the files served, by name: nothing else under the folder is reachable
FILES = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated, so that a redeployed viewer matches its API
}

router = APIRouter(tags=["viewer"], include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in FILES:
        # answered like any unknown path (the app's handler: {"error": "not_found", ...})
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=f"{FILES[name]}; charset=utf-8", headers=HEADERS)
