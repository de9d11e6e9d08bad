"""Run the real app on a real port inside this process (a uvicorn server in a thread), for tests
and benchmarks that must go through HTTP. Start-up is polled (liveness: the lifespan has run and
models are loaded), never slept for; readiness is the caller's to wait for where it depends on workers."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import httpx
import uvicorn

from service.config import Settings
from service.server import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    def __init__(self, settings: Settings, ready_timeout_s: float = 60.0) -> None:
        self.settings = settings.model_copy(update={"port": settings.port if settings.port != 8000 else free_port()})
        self.app = build_app(self.settings)
        self.url = f"http://{self.settings.host}:{self.settings.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=self.settings.host, port=self.settings.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.ready_timeout_s = ready_timeout_s

    def __enter__(self) -> EmbeddedServer:
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the server exited during start-up")
            try:
                if httpx.get(f"{self.url}/health/live", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling interval, not a wait for readiness
        self.__exit__(None, None, None)
        raise TimeoutError(f"server at {self.url} not ready within {self.ready_timeout_s} s")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


def wait_ready(url: str, timeout: float = 30.0, expect: int = 200) -> None:
    """Poll ``/health/ready`` until it answers ``expect``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == expect:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # polling interval
    raise TimeoutError(f"/health/ready never answered {expect}")
