"""Model file formats: what a file is, from its bytes, and the size bounds every reader applies."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from defense_core.errors import ModelLoadError, TooLargeError, UnsafeModelError
from defense_core.spec import TORCH_EXPORT_ARCH, TORCHSCRIPT_ARCH

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own cap
MAX_TENSORS = 100_000
MAX_ZIP_MEMBERS = 200_000

SAFETENSORS = "safetensors"
STATE_DICT = "state_dict"
TORCHSCRIPT = TORCHSCRIPT_ARCH
TORCH_EXPORT = TORCH_EXPORT_ARCH
CODE_FORMATS = (TORCHSCRIPT, TORCH_EXPORT)

_ZIP_MAGIC = b"PK\x03\x04"
# Legacy (pre-1.6, non-zip) torch.save files open with this pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
UNSAFE_HINT = (
    "would need arbitrary unpickling; save a state_dict with "
    "torch.save(model.state_dict()) or use safetensors"
)
INT_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def sniff_model_format(path: str | os.PathLike[str]) -> str:
    """Return ``"safetensors"``, ``"state_dict"``, ``"torch_export"`` or
    ``"torchscript"`` from the bytes.

    Raises :class:`UnsafeModelError` for pickles and unknown formats.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(16)
    if head.startswith(_ZIP_MAGIC):
        return _sniff_zip(path)
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return STATE_DICT
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= min(MAX_SAFETENSORS_HEADER_BYTES, size - 8) and head[8:9] == b"{":
            return SAFETENSORS
    if head[:1] == b"\x80" or head[:1] in (b"(", b"]", b"}"):
        raise UnsafeModelError(f"the model file is a raw Python pickle, which {UNSAFE_HINT}")
    raise UnsafeModelError(
        "not a recognized model format (expected safetensors, a torch.save state dict, a "
        f"torch.export archive or a TorchScript archive); anything else {UNSAFE_HINT}"
    )


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"the model file looks like a zip archive but cannot be read: {exc}"
        ) from exc
    if len(names) > MAX_ZIP_MEMBERS:
        raise ModelLoadError(
            f"the model archive has {len(names)} members (limit {MAX_ZIP_MEMBERS})"
        )
    # All three put everything under one top folder: "<name>/data.pkl", ...
    inner = {n.split("/", 1)[1] for n in names if "/" in n}
    if "archive_format" in inner and any(n.startswith("models/") for n in inner):
        return TORCH_EXPORT
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return TORCHSCRIPT
    if "data.pkl" in inner:
        return STATE_DICT
    raise UnsafeModelError(
        "the zip archive is neither a torch.save file nor a torch.export or TorchScript archive; "
        f"models in other formats {UNSAFE_HINT}"
    )


def check_declared_size(infos: Iterable[zipfile.ZipInfo], max_bytes: int) -> None:
    """An archive whose members declare more than ``max_bytes`` in all is too large."""
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise TooLargeError(
            f"the model archive expands to {declared} bytes; the limit is {max_bytes}"
        )


def parse_json(raw: bytes, what: str) -> Any:
    """A JSON document of the file (a header, a config); nesting too deep is invalid too."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{what} is not valid JSON: {exc}") from exc


def check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise TooLargeError(f"the model file is {size} bytes; the limit is {max_bytes}")
    if size == 0:
        raise ModelLoadError("the model file is empty")


def declare_arch_error(fmt: str) -> ModelLoadError:
    kind = "a torch.export" if fmt == TORCH_EXPORT else "a TorchScript"
    return ModelLoadError(f"the file is {kind} archive; declare spec.arch \"{fmt}\" to use it")
