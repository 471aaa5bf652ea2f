"""RFC 9457 problem+json for every error the API returns.

One handler maps :class:`~api.core.errors.DomainError` (the service layer's
errors carry their status, slug and title); the others cover what FastAPI and
Starlette raise themselves (request validation, unknown route, wrong method,
...), and a catch-all turns anything unexpected into a generic 500 problem
with no internals in the body (the traceback goes to the server log).

``type`` is always ``PROBLEM_BASE + slug``, a stable URI clients can switch on.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.core.errors import DomainError

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://cleanroom.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

# Slugs of the problems raised by the framework itself (not by DomainError).
_HTTP_SLUGS: dict[int, str] = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "invalid-input",
    429: "too-many-requests",
    500: "internal-error",
    503: "service-unavailable",
}


def problem_type(slug: str) -> str:
    """The full ``type`` URI of a slug (a full URI is returned unchanged)."""
    return slug if "://" in slug else PROBLEM_BASE + slug


def problem_response(
    *,
    status: int,
    slug: str,
    title: str,
    detail: str,
    instance: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A ``application/problem+json`` response."""
    body: dict[str, Any] = {
        "type": problem_type(slug),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    for key, value in (extra or {}).items():
        body.setdefault(key, value)
    return JSONResponse(
        jsonable_encoder(body),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _instance(request: Request) -> str:
    return request.url.path


def _auth_headers(status: int) -> dict[str, str] | None:
    return {"WWW-Authenticate": "Bearer"} if status == 401 else None


def _domain_headers(status: int, problem: dict[str, object]) -> dict[str, str] | None:
    """``WWW-Authenticate`` on a 401; ``Retry-After`` when the problem says when to retry."""
    headers = dict(_auth_headers(status) or {})
    retry = problem.get("retry_after_s")
    if isinstance(retry, int) and not isinstance(retry, bool) and retry > 0:
        headers["Retry-After"] = str(retry)
    return headers or None


async def domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    problem = exc.to_problem()
    headers = _domain_headers(exc.status, problem)
    return problem_response(
        status=exc.status,
        slug=str(problem.pop("type")),
        title=str(problem.pop("title")),
        detail=str(problem.pop("detail")),
        instance=_instance(request),
        extra={k: v for k, v in problem.items() if k != "status"},
        headers=headers,
    )


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    first = errors[0] if errors else None
    detail = (
        f"{'.'.join(first['loc'])}: {first['msg']}" if first else "the request is not valid"
    )
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem_response(
        status=422,
        slug="validation-error",
        title="Request validation failed",
        detail=detail,
        instance=_instance(request),
        extra={"errors": errors},
    )


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else title
    if status == 404 and detail == "Not Found":
        detail = f"no resource at {request.url.path}"
    if status == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    headers = dict(exc.headers or {})
    headers.update(_auth_headers(status) or {})
    return problem_response(
        status=status,
        slug=_HTTP_SLUGS.get(status, f"http-{status}"),
        title=title,
        detail=detail,
        instance=_instance(request),
        headers=headers or None,
    )


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "unhandled error on %s %s", request.method, request.url.path, exc_info=exc
    )
    return problem_response(
        status=500,
        slug="internal-error",
        title="Internal server error",
        detail="the server failed to handle the request; it has been logged",
        instance=_instance(request),
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Register every handler on ``app`` (called once by ``create_app``)."""
    app.add_exception_handler(DomainError, domain_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
