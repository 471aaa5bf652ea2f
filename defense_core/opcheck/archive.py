"""Model archives (TorchScript, torch.export): their member listing and bounded member reads."""

from __future__ import annotations

import zipfile

from defense_core.errors import DefenseCoreError, UnsafeModelError

MAX_ARCHIVE_MEMBERS = 200_000
_LIBRARY_SUFFIXES = (".so", ".dylib", ".dll", ".pyd")


def archive_members(zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """``(info, name inside the top folder)`` for every member; one top folder, no tricks."""
    infos = zf.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise UnsafeModelError(
            f"the archive has {len(infos)} members (limit {MAX_ARCHIVE_MEMBERS})"
        )
    roots, seen, out = set(), set(), []
    for info in infos:
        name = info.filename
        if "\\" in name or "\x00" in name or name.startswith("/") or "/" not in name:
            raise UnsafeModelError(f"the archive has a member with an unexpected name: {name!r}")
        root, inner = name.split("/", 1)
        parts = inner.rstrip("/").split("/") if info.is_dir() else inner.split("/")
        if not root or any(p in (".", "..") for p in parts) or (inner and "" in parts):
            raise UnsafeModelError(f"the archive has a member with an unexpected name: {name!r}")
        if name in seen:
            raise UnsafeModelError(f"the archive holds {name!r} twice")
        seen.add(name)
        roots.add(root)
        if not info.is_dir():
            if inner.lower().endswith(_LIBRARY_SUFFIXES):
                raise UnsafeModelError(f"the archive carries a native library: {inner!r}")
            out.append((info, inner))
    if len(roots) != 1:
        raise UnsafeModelError("the archive's members must all be under one top folder")
    return out


def read_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    limit: int,
    *,
    error: type[DefenseCoreError] = UnsafeModelError,
) -> bytes:
    """The bytes of a member, refused with ``error`` when it declares or expands
    to more than ``limit``."""
    if info.file_size > limit:
        raise error(f"{info.filename} is {info.file_size} bytes (limit {limit})")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise error(f"{info.filename} expands beyond {limit} bytes")
    return data
