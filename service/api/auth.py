"""API keys: ``Authorization: Bearer <key>``. Keys are configured as plain keys or ``sha256:<hex>``
(``CARSEG_API_KEYS``, comma separated, or ``CARSEG_API_KEYS_FILE``, one per line), and only their
digests are kept: a presented key is hashed and compared with every digest in constant time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.errors import Unauthorized

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the first 12 hex digits of its key's digest (safe to log), or anonymous."""

    id: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(entries: list[str]) -> list[bytes]:
    """Each entry a key or ``sha256:<64 hex>`` -> the keys' SHA-256 digests. Raises ValueError."""
    digests = []
    for entry in (e.strip() for e in entries):
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("sha256:"):
            hexdigest = entry.removeprefix("sha256:").lower()
            if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
                raise ValueError("an API key entry 'sha256:...' must hold 64 hex digits")
            digests.append(bytes.fromhex(hexdigest))
        else:
            digests.append(_digest(entry))
    return digests


class ApiKeys:
    def __init__(self, digests: list[bytes]) -> None:
        self.digests = digests

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        entries = settings.api_keys.get_secret_value().split(",") if settings.api_keys else []
        if settings.api_keys_file is not None:
            entries += settings.api_keys_file.read_text().splitlines()
        return cls(parse_keys(entries))

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def caller(self, authorization: str | None) -> Caller:
        """The caller a header value names; Unauthorized when keys are required and it holds none of them."""
        if not self.required:
            return Caller(ANONYMOUS)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        digest = _digest(key.strip())
        match = False
        for known in self.digests:  # every digest compared: the time does not say which one matched
            match |= hmac.compare_digest(digest, known)
        if not match:
            raise Unauthorized("the API key is not valid")
        return Caller(digest.hex()[:12])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(settings: Settings, keys: ApiKeys) -> None:
    """Refuse to serve beyond this machine with nobody's key required."""
    if not keys.required and not is_loopback(settings.host):
        raise SystemExit(
            f"refusing to listen on {settings.host}: without API keys the service binds only a loopback address. "
            "Set CARSEG_API_KEYS (comma-separated keys or sha256:<hex>) or CARSEG_API_KEYS_FILE, or use --host 127.0.0.1."
        )


def authenticated(request: Request) -> Caller:
    caller = request.app.state.api_keys.caller(request.headers.get("authorization"))
    request.state.caller = caller
    return caller


CallerDep = Annotated[Caller, Depends(authenticated)]


def metrics_caller(request: Request) -> Caller | None:
    """``/metrics`` asks for a key only when configured to (Prometheus scrapes it)."""
    return authenticated(request) if request.app.state.settings.metrics_require_key else None
