"""Domain errors. Domain code raises these; one handler in ``service.api.app`` maps each to its
HTTP status and a JSON body ``{"error": reason, "detail": message}``."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    reason = "internal"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidImage(ServiceError):
    status, reason = 400, "invalid_image"


class InvalidRequest(ServiceError):
    status, reason = 400, "invalid_request"


class PayloadTooLarge(ServiceError):
    status, reason = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, reason = 415, "unsupported_media_type"


class NotAcceptable(ServiceError):
    status, reason = 406, "not_acceptable"


class Unauthorized(ServiceError):
    status, reason = 401, "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {"WWW-Authenticate": 'Bearer realm="carseg"'}


class Retryable(ServiceError):
    """Refused for now: the answer says when to try again (``Retry-After``)."""

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after_s)}


class RateLimited(Retryable):
    """This caller sent more than its rate, or has too many requests in flight; it may retry."""

    status, reason = 429, "rate_limited"


class InvalidParameter(ServiceError):
    status, reason = 422, "invalid_parameter"


class ModelNotFound(ServiceError):
    status, reason = 404, "model_not_found"


class Unavailable(Retryable):
    """The service cannot take the job now (queue full, no worker); the client may retry."""

    status, reason = 503, "unavailable"


class QueueFull(Unavailable):
    reason = "queue_full"


class DeadlineExceeded(ServiceError):
    status, reason = 504, "deadline_exceeded"


class InferenceFailed(ServiceError):
    """The worker could not compute a result for this job (it is logged with the job id)."""

    status, reason = 500, "inference_failed"
