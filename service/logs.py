"""Logging for every carseg process: one JSON object per line (``CARSEG_LOG_FORMAT=text`` for
people), with the request id of the request being served, if any. What is logged is chosen where
it is logged, and never includes pixels, file names or patient fields: the access log (``service.
api.middleware``) writes the route template, never the raw path or query, the model, k, status and
timings; errors write their reason."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# attributes every LogRecord has; anything else was passed with extra= and is logged as a field
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route the root logger, uvicorn's and everything else's to stderr in ``fmt``. Uvicorn's
    access log is off: it prints the raw path and query; ours prints the route template."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def configure_early() -> None:
    """Before any command has read its settings (the command line is parsed first, and the CPU
    threads are logged before torch loads): the format ``CARSEG_LOG_FORMAT`` names, JSON unless it
    says text, so that a process's log has one format from its first line. ``carseg serve`` and
    ``carseg worker`` configure again from their settings, which read the same variable."""
    configure("text" if os.environ.get("CARSEG_LOG_FORMAT", "").strip().lower() == "text" else "json")
