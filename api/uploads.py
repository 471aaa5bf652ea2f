"""Streaming ``multipart/form-data`` uploads with constant memory.

Why not ``UploadFile`` / ``request.form()``: Starlette spools a file part to a
``SpooledTemporaryFile`` (constant memory too), but it reads the WHOLE body
before the endpoint runs, so a too-large upload is only noticed after it was
written to disk, and the sha256 needs a second pass. Instead the raw body
(``request.stream()``) is fed to python-multipart's streaming
``MultipartParser``:

- the file part goes to a temporary file on local disk in ~1 MiB blocks (hashing
  and writing happen in a worker thread so the event loop stays free), with its
  size checked on every block, so the upload is refused (413) as soon as it
  passes the limit, and ``Content-Length`` is checked before reading anything;
- small text fields (``spec``, ``role``) are kept in memory, bounded;
- memory use is one block plus the parser's state, whatever the file size.

The file is staged on local disk (not streamed straight into the store)
because the engine's validators need a seekable local file (safetensors header,
zip central directory at the end of the file): a rejected file therefore never
reaches the store at all.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.core.errors import DomainError, PayloadTooLarge, UnsupportedMediaType
from api.core.services.artifacts import StagedFile

FILE_FIELD = "file"
BLOCK_BYTES = 1 << 20
MAX_TEXT_FIELD_BYTES = 64 << 10
MAX_PARTS = 16
# multipart framing (boundaries, part headers) and the text fields
BODY_OVERHEAD_BYTES = MAX_PARTS * 1024 + 4 * MAX_TEXT_FIELD_BYTES


class MalformedMultipart(DomainError):
    status = 400
    type = "malformed-multipart"
    title = "Malformed multipart body"


@dataclass(frozen=True)
class ReceivedUpload:
    file: StagedFile
    fields: dict[str, str]


class _PartState:
    def __init__(self) -> None:
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[str, bytes] = {}
        self.name: str | None = None
        self.filename: str | None = None
        self.text = bytearray()


class _StagingWriter:
    """Receives the parser's callbacks; buffers file bytes for the writer thread."""

    def __init__(self, *, fh: os.PathLike[str] | object, max_file_bytes: int,
                 text_fields: frozenset[str]) -> None:
        self.fh = fh
        self.max_file_bytes = max_file_bytes
        self.text_fields = text_fields
        self.hasher = hashlib.sha256()
        self.file_bytes = 0
        self.file_seen = False
        self.filename: str | None = None
        self.pending = bytearray()
        self.fields: dict[str, str] = {}
        self.parts = 0
        self.part: _PartState | None = None
        self.finished = False

    # -- parser callbacks (synchronous, called from parser.write) --------------------------
    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise MalformedMultipart(f"more than {MAX_PARTS} parts in the form")
        self.part = _PartState()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        assert self.part is not None
        self.part.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        assert self.part is not None
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        assert self.part is not None
        name = bytes(self.part.header_field).decode("latin-1").strip().lower()
        self.part.headers[name] = bytes(self.part.header_value)
        self.part.header_field.clear()
        self.part.header_value.clear()

    def on_headers_finished(self) -> None:
        assert self.part is not None
        _, options = parse_options_header(self.part.headers.get("content-disposition", b""))
        raw_name = options.get(b"name")
        self.part.name = raw_name.decode("utf-8", "replace") if raw_name is not None else None
        raw_filename = options.get(b"filename")
        if raw_filename is not None:
            self.part.filename = raw_filename.decode("utf-8", "replace")
        if self.part.name == FILE_FIELD:
            if self.file_seen:
                raise MalformedMultipart(f"more than one '{FILE_FIELD}' part")
            self.file_seen = True
            self.filename = self.part.filename

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        assert part is not None
        if part.name == FILE_FIELD:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"the file exceeds the limit of {self.max_file_bytes} bytes"
                )
            self.pending += data[start:end]
        else:
            part.text += data[start:end]
            if len(part.text) > MAX_TEXT_FIELD_BYTES:
                raise PayloadTooLarge(
                    f"form field {part.name!r} exceeds {MAX_TEXT_FIELD_BYTES} bytes"
                )

    def on_part_end(self) -> None:
        part = self.part
        assert part is not None
        if part.name in self.text_fields:
            if part.name in self.fields:
                raise MalformedMultipart(f"form field {part.name!r} given twice")
            try:
                self.fields[part.name] = part.text.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedMultipart(f"form field {part.name!r} is not UTF-8") from None
        self.part = None

    def on_end(self) -> None:
        self.finished = True

    # -- writer thread ------------------------------------------------------------------
    def flush_block(self) -> None:
        block = bytes(self.pending)
        self.pending.clear()
        self.hasher.update(block)
        self.fh.write(block)  # type: ignore[attr-defined]


def _missing(field: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("body", field), "msg": "Field required", "type": "missing"}]
    )


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"expected multipart/form-data, got {content_type.decode('latin-1') or 'nothing'}"
        )
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise MalformedMultipart("multipart/form-data without a valid boundary")
    return boundary


def _check_content_length(request: Request, max_file_bytes: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise MalformedMultipart("Content-Length is not an integer") from None
    if length > max_file_bytes + BODY_OVERHEAD_BYTES:
        raise PayloadTooLarge(
            f"the request body ({length} bytes) exceeds the limit of {max_file_bytes} bytes"
        )


@asynccontextmanager
async def receive_upload(
    request: Request,
    *,
    max_file_bytes: int,
    staging_dir: Path,
    text_fields: frozenset[str],
    required_fields: tuple[str, ...] = (),
    on_bytes: Callable[[int], None] | None = None,
) -> AsyncIterator[ReceivedUpload]:
    """Stream the request's multipart body; yields the staged file and the text fields.

    The temporary file is deleted when the block exits (the store has its own copy).
    """
    _check_content_length(request, max_file_bytes)
    boundary = _boundary(request)
    staging_dir.mkdir(parents=True, exist_ok=True)
    fd, raw_path = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=staging_dir)
    path = Path(raw_path)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = _StagingWriter(fh=fh, max_file_bytes=max_file_bytes,
                                    text_fields=text_fields)
            parser = MultipartParser(boundary, callbacks={  # type: ignore[arg-type]
                "on_part_begin": writer.on_part_begin,
                "on_part_data": writer.on_part_data,
                "on_part_end": writer.on_part_end,
                "on_header_field": writer.on_header_field,
                "on_header_value": writer.on_header_value,
                "on_header_end": writer.on_header_end,
                "on_headers_finished": writer.on_headers_finished,
                "on_end": writer.on_end,
            })
            async for chunk in request.stream():
                if not chunk:
                    continue
                if on_bytes is not None:
                    on_bytes(len(chunk))
                try:
                    parser.write(chunk)
                except MultipartParseError as exc:
                    raise MalformedMultipart(f"malformed multipart body: {exc}") from None
                if len(writer.pending) >= BLOCK_BYTES:
                    await to_thread.run_sync(writer.flush_block)
            try:
                parser.finalize()
            except MultipartParseError as exc:
                raise MalformedMultipart(f"malformed multipart body: {exc}") from None
            if writer.pending:
                await to_thread.run_sync(writer.flush_block)
        if not writer.finished:
            raise MalformedMultipart("the multipart body ended before its closing boundary")
        if not writer.file_seen:
            raise _missing(FILE_FIELD)
        for name in required_fields:
            if name not in writer.fields:
                raise _missing(name)
        staged = StagedFile(
            path=path,
            size=writer.file_bytes,
            sha256=writer.hasher.hexdigest(),
            filename=writer.filename or "",
        )
        yield ReceivedUpload(file=staged, fields=dict(writer.fields))
    finally:
        path.unlink(missing_ok=True)
