"""A lean ASGI path for the hottest request: ``GET /v1/jobs/{id}`` by a recently seen key.

Status polling is most of an API process's traffic, and through the full stack much of
a poll's CPU time goes to Starlette's routing, FastAPI's dependency resolution and
request objects rather than to the read (measured in ``bench/results/api.md``). This
middleware answers the common case directly:

- method ``GET``, path exactly ``/v1/jobs/<uuid>`` (no root path);
- ``Authorization: Bearer <key>`` for a key in the :class:`api.deps.KeyCache` (seen and
  checked in the last seconds) that carries the ``read`` scope;
- the job exists in the key's organization.

It then runs the same status read as the route and sends the same body and headers.
Everything else (no or unknown key, missing scope, unknown job, any error while
reading) is handed to the full application untouched, so errors, authentication and
their problem+json documents have exactly one implementation. The request is labelled
with the route's template for the request metrics, as the router would.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pydantic_core import to_json
from starlette.types import ASGIApp, Receive, Scope, Send

from api.core.errors import NotFound
from api.core.services.job_status import StatusReader
from api.deps import KeyCache

log = logging.getLogger(__name__)

PREFIX = "/v1/jobs/"
_UUID_TEXT_LEN = 36


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class StatusFastPath:
    """Answer cached-key status polls without the routing and dependency layers."""

    def __init__(self, app: ASGIApp, *, key_cache: KeyCache, reader: StatusReader, route: Any) -> None:
        self.app = app
        self.key_cache = key_cache
        self.reader = reader
        self.route = route  # the router's APIRoute, so metrics see the same template

    def _job_id(self, scope: Scope) -> uuid.UUID | None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        if len(path) != len(PREFIX) + _UUID_TEXT_LEN or not path.startswith(PREFIX):
            return None
        text = path[len(PREFIX):]
        try:
            job_id = uuid.UUID(text)
        except ValueError:
            return None
        # only the canonical 8-4-4-4-12 form: uuid.UUID also takes hyphens anywhere
        return job_id if str(job_id) == text.lower() else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job_id = self._job_id(scope)
        token = _bearer_token(scope) if job_id is not None else None
        key = self.key_cache.get(token) if token else None
        if job_id is None or key is None or "read" not in (key.scopes or ()):
            await self.app(scope, receive, send)
            return
        try:
            view = await self.reader.view(org_id=key.org_id, job_id=job_id)
        except NotFound:
            await self.app(scope, receive, send)  # the router writes the 404 problem
            return
        except Exception:
            log.debug("status fast path failed; handing the request to the app", exc_info=True)
            await self.app(scope, receive, send)
            return
        body = to_json(view)
        scope["route"] = self.route
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
        })
        await send({"type": "http.response.body", "body": body})
