"""torch.export archives (``.pt2``), read without ``torch.export.load``.

The members are checked against the layout ``torch.export.save`` writes, the
weights and constants rebuilt from their raw bytes (a payload that would need
pickle is refused), the program JSON checked by
:func:`~defense_core.opcheck.scan_serialized_program` and stripped of guard
code and node metadata that names Python objects, and only then handed to
torch's deserializer, without sample inputs.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defense_core import opcheck
from defense_core.errors import ModelLoadError, TooLargeError, UnsafeModelError
from defense_core.loading.export_module import module_from_exported_program
from defense_core.loading.formats import (
    DEFAULT_MAX_MODEL_BYTES,
    INT_DTYPES,
    MAX_SAFETENSORS_HEADER_BYTES,
    MAX_TENSORS,
    UNSAFE_HINT,
    check_declared_size,
    parse_json,
)

MAX_PROGRAM_JSON_BYTES = 256 * 1024**2
_PT2_MODEL = "model"  # the one program torch.export.save writes
_PT2_META = {"archive_format": "pt2", "archive_version": "0", "byteorder": "little"}
_PT2_WEIGHTS_CONFIG = f"data/weights/{_PT2_MODEL}_weights_config.json"
_PT2_CONSTANTS_CONFIG = f"data/constants/{_PT2_MODEL}_constants_config.json"
_PT2_PROGRAM = f"models/{_PT2_MODEL}.json"
_PT2_PAYLOAD = {
    "data/weights/": re.compile(r"weight_\d+\Z"),
    "data/constants/": re.compile(r"tensor_\d+\Z"),
}
_PT2_STRIDED = 7  # torch._export.serde.schema.Layout.Strided
_PT2_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, *INT_DTYPES}
)
_NODE_METADATA_KEPT = ("stack_trace", "nn_module_stack")


def load_exported(path: Path, map_location: str | torch.device, *, max_bytes: int) -> nn.Module:
    document, state_dict, constants = _read_export_archive(path, max_bytes=max_bytes)
    opcheck.scan_serialized_program(document)
    _strip_program_(document)
    try:
        from torch._export.serde import schema as export_schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

        serialized = _dict_to_dataclass(export_schema.ExportedProgram, document)
        # Dicts (not bytes) for the state and constants, so nothing is unpickled;
        # no sample inputs.
        ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the exported program: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc
    opcheck.check_exported_program(ep)
    return module_from_exported_program(ep).to(map_location).eval()


def _read_export_archive(
    path: Path, *, max_bytes: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The program JSON, state dict and tensor constants of a ``.pt2``, read
    without unpickling anything; members outside torch.export's layout are refused."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {inner: info for info, inner in opcheck.archive_members(zf)}
            check_declared_size(members.values(), max_bytes)
            for inner in members:
                _check_export_member(inner)
            for inner, expected in _PT2_META.items():
                if inner not in members:
                    continue
                if _read(zf, members[inner], 64).decode("utf-8", "replace").strip() != expected:
                    raise UnsafeModelError(f"the archive's {inner} is not {expected!r}")
            for required in (
                "archive_format",
                _PT2_PROGRAM,
                _PT2_WEIGHTS_CONFIG,
                _PT2_CONSTANTS_CONFIG,
            ):
                if required not in members:
                    raise ModelLoadError(f"the torch.export archive has no {required}")
            document = _read_json(zf, members[_PT2_PROGRAM], MAX_PROGRAM_JSON_BYTES)
            state = _read_payloads(zf, members, _PT2_WEIGHTS_CONFIG, "data/weights/")
            constants = _read_payloads(zf, members, _PT2_CONSTANTS_CONFIG, "data/constants/")
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"the torch.export archive cannot be read: {exc}") from exc
    if not isinstance(document, dict):
        raise ModelLoadError("the exported program's JSON is not an object")
    return document, state, constants


def _check_export_member(inner: str) -> None:
    if inner in _PT2_META or inner in (".data/version", ".data/serialization_id"):
        return
    if inner in (_PT2_PROGRAM, _PT2_WEIGHTS_CONFIG, _PT2_CONSTANTS_CONFIG):
        return
    if inner == f"data/sample_inputs/{_PT2_MODEL}.pt" or inner.startswith("extra/"):
        return  # never read: the sample inputs are a pickle
    for folder, pattern in _PT2_PAYLOAD.items():
        if inner.startswith(folder) and pattern.match(inner[len(folder) :]):
            return
    if inner.startswith("data/aotinductor/"):
        raise UnsafeModelError("the archive carries AOTInductor code (compiled native libraries)")
    raise UnsafeModelError(
        f"the torch.export archive holds an unexpected member {inner!r} (pickled objects, other "
        "programs and compiled code are not accepted); save it with torch.export.save"
    )


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes; more than ``limit`` is too large (not unsafe, as in a TorchScript scan)."""
    return opcheck.read_member(zf, info, limit, error=TooLargeError)


def _read_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> Any:
    return parse_json(_read(zf, info, limit), info.filename)


def _read_payloads(
    zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], config_name: str, folder: str
) -> dict[str, torch.Tensor]:
    config = _read_json(zf, members[config_name], MAX_SAFETENSORS_HEADER_BYTES)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ModelLoadError(f"{config_name} is malformed")
    if len(entries) > MAX_TENSORS:
        raise ModelLoadError(f"the archive holds {len(entries)} tensors (limit {MAX_TENSORS})")
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    flat: dict[str, torch.Tensor] = {}  # one storage per payload file, so aliases stay aliases
    out: dict[str, torch.Tensor] = {}
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(fqn, str):
            raise ModelLoadError(f"{config_name} is malformed")
        if entry.get("use_pickle"):
            raise UnsafeModelError(f"{fqn!r} is stored as a pickle, which {UNSAFE_HINT}")
        name, meta = entry.get("path_name"), entry.get("tensor_meta")
        if (
            not isinstance(name, str)
            or not _PT2_PAYLOAD[folder].match(name)
            or f"{folder}{name}" not in members
        ):
            raise UnsafeModelError(f"{fqn!r} is not a tensor payload of the archive ({name!r})")
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{fqn!r} has no tensor metadata")
        dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype"))
        if dtype not in _PT2_DTYPES or meta.get("layout") != _PT2_STRIDED:
            raise ModelLoadError(f"{fqn!r} is not a dense tensor of a supported dtype")
        sizes, strides = _ints(meta.get("sizes"), fqn), _ints(meta.get("strides"), fqn)
        offset = _ints([meta.get("storage_offset")], fqn)[0]
        if name not in flat:
            raw = _read(zf, members[f"{folder}{name}"], DEFAULT_MAX_MODEL_BYTES)
            item = torch.empty((), dtype=dtype).element_size()
            if len(raw) % item:
                raise ModelLoadError(f"{folder}{name} is not a whole number of {dtype} values")
            flat[name] = (
                torch.frombuffer(bytearray(raw), dtype=dtype)
                if raw
                else torch.empty(0, dtype=dtype)
            )
        storage = flat[name]
        if (
            storage.dtype != dtype
            or len(sizes) != len(strides)
            or offset < 0
            or min(strides, default=0) < 0
        ):
            raise ModelLoadError(f"{fqn!r} does not fit its payload")
        if (
            all(sizes)
            and offset + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True)) >= storage.numel()
        ):
            raise ModelLoadError(f"{fqn!r} does not fit its payload")
        tensor = torch.as_strided(storage, sizes, strides, offset)
        if entry.get("is_param"):
            tensor = nn.Parameter(tensor, requires_grad=bool(meta.get("requires_grad")))
        out[fqn] = tensor
    return out


def _ints(values: Any, fqn: str) -> list[int]:
    if not isinstance(values, list) or not all(
        isinstance(v, dict)
        and set(v) == {"as_int"}
        and type(v["as_int"]) is int
        and v["as_int"] >= 0
        for v in values
    ):
        raise ModelLoadError(f"{fqn!r} has symbolic or malformed sizes")
    return [v["as_int"] for v in values]


def _strip_program_(document: dict[str, Any]) -> None:
    """Drop what the deserializer would turn into code or object lookups and
    the module does not need: guard code, and node metadata other than traces."""
    document["guards_code"] = []
    stack: list[Any] = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "target" in value and "inputs" in value and isinstance(value.get("metadata"), dict):
                value["metadata"] = {
                    k: v for k, v in value["metadata"].items() if k in _NODE_METADATA_KEPT
                }
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
