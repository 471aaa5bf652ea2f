"""uvicorn's h11 protocol with read timeouts and problem+json framing errors.

Served with ``uvicorn api.main:app --http api.http_protocol:ProblemH11Protocol``
(``cleanroom serve``, the Dockerfile and docker-compose do). Over plain uvicorn:

* **header timeout**: a connection must deliver a request's complete headers
  within ``HTTP_HEADER_TIMEOUT_S`` of connecting or of its first byte after a
  response (slow or partial headers, a connection opened and left silent);
  otherwise it gets ``408`` problem+json and is closed;
* **body idle timeout**: while a body is being received, at most
  ``HTTP_BODY_TIMEOUT_S`` may pass without a byte (reading paused by the app's
  own back-pressure does not count); otherwise the connection is closed and the
  handler sees a client disconnect (a staged upload is deleted);
* a request h11 cannot parse gets ``400`` ``application/problem+json`` (type
  ``malformed-http``) instead of uvicorn's ``text/plain``.

Behind a reverse proxy the proxy's own timeouts apply first; these still bound
what reaches the process directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.core.settings import get_settings

log = logging.getLogger(__name__)


def problem_bytes(status: int, reason: str, slug: str, title: str, detail: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with a problem document."""
    body = json.dumps({"type": slug, "title": title, "status": status, "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("ascii")
    return head + body


class ProblemH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout_s = settings.http_header_timeout_s
        self.body_timeout_s = settings.http_body_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- timers ---------------------------------------------------------------------------
    def _cancel(self, timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is not h11.IDLE:
            return  # a response is still going out; the keep-alive timer takes over after it
        log.info("closing a connection that sent no complete request headers within %.0f s", self.header_timeout_s)
        self.transport.write(problem_bytes(
            408, "Request Timeout", "request-timeout", "Request timeout",
            f"the request headers did not arrive within {self.header_timeout_s:g} s"))
        self.transport.close()

    def _arm_body_timer(self) -> None:
        self._cancel(self._body_timer)
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._on_body_timeout)

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # the app is not reading: not the client's delay
            self._arm_body_timer()
            return
        log.info("closing a connection whose request body stalled for %.0f s", self.body_timeout_s)
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _track(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm_header_timer()
        else:
            self._cancel(self._header_timer)
            self._header_timer = None
        if state is h11.SEND_BODY:
            self._arm_body_timer()
        else:
            self._cancel(self._body_timer)
            self._body_timer = None

    # -- uvicorn hooks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.transport.is_closing():
            self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._header_timer = self._body_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(problem_bytes(400, "Bad Request", "malformed-http", "Malformed HTTP request", msg))
        self.transport.close()
