"""The served API against slow and malformed clients, over real sockets."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Service, create_api_key

pytestmark = pytest.mark.slow


def _response(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def _problem(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


@pytest.fixture
def served(make_service, tmp_path: Path) -> Service:
    service = make_service(http_header_timeout_s="1", http_body_timeout_s="1")
    service.start_api()
    service.key = create_api_key(f"sqlite:///{tmp_path / 'var' / 'cleanroom.db'}")
    return service


def test_partial_headers_get_a_408_problem_and_the_connection_closes(served: Service) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
        raw, waited = _response(sock, timeout=10)
    status, headers, problem = _problem(raw)
    assert status == 408 and headers["content-type"] == "application/problem+json"
    assert problem["type"] == "request-timeout" and waited < 5
    with socket.create_connection(("127.0.0.1", served.port)) as sock:  # silent after connecting
        raw, waited = _response(sock, timeout=10)
    assert _problem(raw)[0] == 408 and waited < 5


def test_malformed_requests_get_a_400_problem(served: Service) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        raw, _ = _response(sock, timeout=10)
    status, headers, problem = _problem(raw)
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert problem["type"] == "malformed-http"


def test_a_stalled_upload_body_is_dropped_and_leaves_nothing_behind(served: Service, tmp_path: Path) -> None:
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"role\"\r\n\r\nclean\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.npz\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    request = (f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {served.key}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {len(head) + 10_000}\r\n\r\n").encode() + head + b"PK\x03\x04" + b"\0" * 100
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(request)  # ... and then nothing more
        _, waited = _response(sock, timeout=15)
    assert waited < 8
    deadline = time.monotonic() + 5
    staging = tmp_path / "var" / "uploads"
    while time.monotonic() < deadline and staging.exists() and list(staging.glob("*.part")):
        time.sleep(0.1)
    assert not staging.exists() or not list(staging.glob("*.part"))
    assert httpx.get(f"{served.base_url}/healthz", timeout=5).status_code == 200
