"""Archive safety: format sniffing, member names and metadata, bounded member reads.

Nothing is ever extracted to disk. Members with absolute paths, ``..``
components, links or device types are refused, and every member is read one
at a time, exactly as large as its (already bounded) declared size.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from defense_core.data.limits import ArchiveLimits, reraise_resource_error
from defense_core.errors import ArchiveError, DatasetError, TooLargeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Members smaller than this are never called bombs: their size is bounded anyway.
RATIO_CHECK_MIN_BYTES = 1 << 20
# What reading a zip member raises when the archive, not the reader, is at fault.
ZIP_READ_ERRORS = (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError)


def sniff_dataset_format(path: str | os.PathLike[str]) -> str:
    """``"npz"``, ``"zip"``, ``"tar.gz"`` or ``"tar"``, from the bytes."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        except zipfile.BadZipFile as exc:
            raise DatasetError(f"the zip archive cannot be read: {exc}") from exc
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"\x93NUMPY"):
        raise DatasetError("a single .npy array is not a dataset; save x and y with numpy.savez")
    raise DatasetError(
        "unrecognized dataset format: expected NPZ (x, y) or an ImageFolder archive (zip, tar.gz)"
    )


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_parts(name: str) -> tuple[str, ...]:
    """Split a member name into path parts, refusing anything that could escape."""
    if "\x00" in name:
        raise ArchiveError(f"archive member name contains a NUL byte: {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise ArchiveError(f"archive member has an absolute path: {name!r}")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive member path leaves the archive ('..'): {name!r}")
    return parts


def check_zip_members(
    zf: zipfile.ZipFile,
    *,
    archive_size: int,
    max_members: int,
    max_member_bytes: int,
    max_total_bytes: int,
    max_ratio: float,
) -> list[zipfile.ZipInfo]:
    """Check every member's metadata; return the regular files (directories dropped)."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise ArchiveError(f"the archive has {len(infos)} members; the limit is {max_members}")
    files: list[zipfile.ZipInfo] = []
    total = 0
    for info in infos:
        safe_parts(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise ArchiveError(f"archive member is a symbolic link: {info.filename!r}")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"archive member is not a regular file: {info.filename!r}")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member is encrypted: {info.filename!r}")
        if info.is_dir():
            continue
        if info.file_size > max_member_bytes:
            raise TooLargeError(
                f"archive member {info.filename!r} expands to {info.file_size} bytes; "
                f"the limit is {max_member_bytes}"
            )
        compressed = max(info.compress_size, 1)
        if info.file_size > RATIO_CHECK_MIN_BYTES and info.file_size > max_ratio * compressed:
            raise ArchiveError(
                f"archive member {info.filename!r} expands {info.file_size / compressed:.0f}x "
                f"(limit {max_ratio:g}x): refused as a possible decompression bomb"
            )
        total += info.file_size
        files.append(info)
    if total > max_total_bytes:
        raise TooLargeError(f"the archive expands to {total} bytes; the limit is {max_total_bytes}")
    if total > RATIO_CHECK_MIN_BYTES and total > max_ratio * max(archive_size, 1):
        raise ArchiveError(
            f"the archive expands {total / max(archive_size, 1):.0f}x (limit {max_ratio:g}x): "
            "refused as a possible decompression bomb"
        )
    return files


def _read_member(fh: IO[bytes], name: str, expected: int) -> bytes:
    """Exactly the ``expected`` (declared, already bounded) bytes of a member.

    Never ``read(limit)`` with a large limit: a buffered reader allocates the
    whole limit up front and shrinks the result, and glibc keeps every such
    block as a mapping of its own, so holding many of them exhausts
    ``vm.max_map_count``.
    """
    data = fh.read(expected)
    if len(data) != expected:
        raise ArchiveError(
            f"archive member {name!r} holds {len(data)} bytes, not the declared {expected}"
        )
    if fh.read(1):
        raise ArchiveError(f"archive member {name!r} holds more than the declared {expected} bytes")
    return data


Entry = tuple[tuple[str, ...], "bytes | None", int]


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"the zip archive cannot be read: {exc}") from exc


def _iter_zip(path: Path, limits: ArchiveLimits) -> Iterator[Entry]:
    """Yield ``(parts, data, index)`` per member; ``data`` is None for directories.

    ``index`` is the member's place in :meth:`zipfile.ZipFile.infolist`.
    """
    with open_zip(path) as zf:
        # Refuses links, devices, bombs: every member but the directories is a regular file.
        check_zip_members(
            zf,
            archive_size=path.stat().st_size,
            max_members=limits.max_members,
            max_member_bytes=limits.max_member_bytes,
            max_total_bytes=limits.max_total_bytes,
            max_ratio=limits.max_compression_ratio,
        )
        for index, info in enumerate(zf.infolist()):
            if info.is_dir():
                yield safe_parts(info.filename), None, index
            else:
                parts = safe_parts(info.filename)
                if is_skipped(parts) or not is_image_name(info.filename):
                    yield parts, b"", index  # named, not read: sorted out by the caller
                else:
                    yield parts, read_zip_member(zf, info), index


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with zf.open(info) as fh:
            return _read_member(fh, info.filename, info.file_size)
    except ZIP_READ_ERRORS as exc:
        reraise_resource_error(exc)
        raise ArchiveError(f"cannot read archive member {info.filename!r}: {exc}") from exc


class _BoundedReader(io.RawIOBase):
    """A read-only stream that fails once more than ``limit`` bytes came through."""

    def __init__(self, inner: IO[bytes], limit: int, what: str) -> None:
        self._inner, self._limit, self._what, self._seen = inner, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        self._seen += len(data)
        if self._seen > self._limit:
            raise ArchiveError(self._what)
        buffer[: len(data)] = data
        return len(data)


def _iter_tar(path: Path, limits: ArchiveLimits, *, gz: bool) -> Iterator[Entry]:
    """Yield ``(parts, data, offset)`` per member (``offset``: of its data in the tar stream)."""
    compressed_size = path.stat().st_size
    # Headers and padding cost up to ~1 KiB per member on top of the data.
    cap = limits.max_total_bytes + 1024 * (limits.max_members + 16)
    what = f"the archive expands beyond {cap} bytes"
    if gz:
        ratio_cap = int(limits.max_compression_ratio * compressed_size) + RATIO_CHECK_MIN_BYTES
        if ratio_cap < cap:
            cap = ratio_cap
            what = (
                f"the archive expands more than {limits.max_compression_ratio:g}x its compressed "
                "size: refused as a possible decompression bomb"
            )
    with path.open("rb") as raw:
        inner: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
        stream = io.BufferedReader(_BoundedReader(inner, cap, what), buffer_size=1 << 16)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                total = 0
                count = 0
                while (member := tf.next()) is not None:
                    # A stream-mode TarFile keeps every header it read; nothing here needs them.
                    tf.members.clear()
                    count += 1
                    if count > limits.max_members:
                        raise ArchiveError(
                            f"the archive has more than {limits.max_members} members"
                        )
                    parts = safe_parts(member.name)
                    if member.issym() or member.islnk():
                        raise ArchiveError(f"archive member is a link: {member.name!r}")
                    if member.isdir():
                        yield parts, None, member.offset_data
                        continue
                    if not member.isreg() or member.issparse():
                        raise ArchiveError(f"archive member is not a regular file: {member.name!r}")
                    if member.size > limits.max_member_bytes:
                        raise TooLargeError(
                            f"archive member {member.name!r} is {member.size} bytes; "
                            f"the limit is {limits.max_member_bytes}"
                        )
                    total += member.size
                    if total > limits.max_total_bytes:
                        raise TooLargeError(
                            f"the archive expands beyond {limits.max_total_bytes} bytes"
                        )
                    if is_skipped(parts) or not is_image_name(member.name):
                        yield parts, b"", member.offset_data
                        continue
                    fh = tf.extractfile(member)
                    assert fh is not None  # a regular file
                    yield parts, _read_member(fh, member.name, member.size), member.offset_data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            reraise_resource_error(exc)
            raise ArchiveError(f"the tar archive cannot be read: {exc}") from exc


def is_skipped(parts: tuple[str, ...]) -> bool:
    """Hidden files and macOS resource forks (``.DS_Store``, ``__MACOSX/``) are ignored."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@contextlib.contextmanager
def archive_entries(path: Path, fmt: str, limits: ArchiveLimits) -> Iterator[Iterator[Entry]]:
    """Directories as ``(parts, None, where)``, images as ``(parts, bytes, where)``, one at a time.

    Hidden files are skipped and any other file is refused. The archive is
    closed when the block ends, also when the caller stops early.
    """
    if fmt == "zip":
        members = _iter_zip(path, limits)
    else:
        members = _iter_tar(path, limits, gz=fmt == "tar.gz")

    def entries() -> Iterator[Entry]:
        for parts, data, where in members:
            if not parts or is_skipped(parts):
                continue
            if data is not None and not is_image_name(parts[-1]):
                raise ArchiveError(f"{'/'.join(parts)}: only PNG and JPEG images are accepted")
            yield parts, data, where

    with contextlib.closing(members):
        yield entries()
