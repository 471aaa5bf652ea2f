"""Domain errors of the service layer.

Each error carries its HTTP status, a stable ``type`` slug and a short ``title``
as class attributes, so the API maps every :class:`DomainError` to an RFC 9457
problem+json response in ONE handler, and the worker can store the same shape
as a job's ``error`` document.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    """Base class of every error the service layer raises on purpose."""

    status: ClassVar[int] = 400
    type: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str | None = None, *, extra: dict[str, Any] | None = None) -> None:
        self.detail = detail if detail is not None else self.title
        self.extra: dict[str, Any] = dict(extra or {})
        super().__init__(self.detail)

    def to_problem(self) -> dict[str, Any]:
        """The problem document (without ``instance``), extension members included."""
        problem: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        for key, value in self.extra.items():
            problem.setdefault(key, value)
        return problem

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class NotFound(DomainError):
    status = 404
    type = "not-found"
    title = "Not found"


class Unauthorized(DomainError):
    status = 401
    type = "unauthorized"
    title = "Missing or invalid API key"


class Forbidden(DomainError):
    status = 403
    type = "forbidden"
    title = "Not allowed"


class Conflict(DomainError):
    status = 409
    type = "conflict"
    title = "Conflict"


class InvalidInput(DomainError):
    status = 422
    type = "invalid-input"
    title = "Invalid input"


class PayloadTooLarge(DomainError):
    status = 413
    type = "payload-too-large"
    title = "Payload too large"


class UnsupportedMediaType(DomainError):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"


class ServiceUnavailable(DomainError):
    status = 503
    type = "service-unavailable"
    title = "Service unavailable"


class OutOfResources(ServiceUnavailable):
    """The server ran short of memory or file handles while handling the request.

    Not the client's fault and not lasting: the same request can succeed later,
    so it is a retryable 503 (``retry_after_s`` in the problem), never a 4xx.
    """

    title = "Temporarily out of resources"
    retry_after_s: ClassVar[int] = 30

    def __init__(self, detail: str | None = None, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail, extra={"retry_after_s": self.retry_after_s, **(extra or {})})
