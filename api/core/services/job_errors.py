"""What can go wrong with a job: the domain errors a client gets (problem+json through the
one exception handler) and the problem-style ``error`` document a failed job carries."""

from __future__ import annotations

from api.core.errors import Conflict, InvalidInput

MAX_DETAIL_CHARS = 2000
WORKER_LOST_DETAIL = "the worker running this job stopped responding (no heartbeat)"


# -- domain errors -----------------------------------------------------------------------


class IdempotencyKeyReused(InvalidInput):
    type = "idempotency-key-reused"
    title = "Idempotency key reused with a different request"


class JobNotSucceeded(Conflict):
    type = "job-not-succeeded"
    title = "Job has not succeeded"


class JobAlreadyFinished(Conflict):
    type = "job-already-finished"
    title = "Job already finished"


class InvalidCursor(InvalidInput):
    type = "invalid-cursor"
    title = "Invalid cursor"


# -- a failed job's error document ---------------------------------------------------------


def error_document(*, type: str, title: str, detail: str, code: str) -> dict[str, str]:
    """The job's ``error`` JSON: ``{type, title, detail, code}`` (RFC 9457 members)."""
    return {"type": type, "title": title, "detail": detail[:MAX_DETAIL_CHARS], "code": code}


def input_error(exc: BaseException) -> dict[str, str]:
    """The caller's input was bad (an engine ``InputError``): say what, clearly."""
    return error_document(
        type="invalid-input",
        title="Invalid input",
        detail=str(exc) or type(exc).__name__,
        code=str(getattr(exc, "code", "invalid-input")),
    )


def internal_error(exc: BaseException) -> dict[str, str]:
    """A fault of the service: the exception class only, never a stack trace."""
    return error_document(
        type="internal-error",
        title="Internal error",
        detail=f"the job failed because of an internal error ({type(exc).__name__}); "
        "the operators have the details in the worker log",
        code="internal",
    )


def worker_lost_error(*, attempts: int) -> dict[str, str]:
    return error_document(
        type="worker-lost",
        title="Worker lost",
        detail=f"{WORKER_LOST_DETAIL}; gave up after {attempts} attempt(s)",
        code="worker-lost",
    )


def time_limit_error(*, limit_s: float) -> dict[str, str]:
    return error_document(
        type="time-limit",
        title="Time limit exceeded",
        detail=f"the job ran longer than the allowed {limit_s:.0f} s",
        code="time-limit",
    )
