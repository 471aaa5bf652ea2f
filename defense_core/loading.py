"""Safe model loading: safetensors, ``weights_only`` state dicts, exported programs, TorchScript.

Model files come from strangers. Nothing here ever runs a general unpickler:

* **safetensors**: the JSON header is size-checked before it is read, then the
  library maps the tensors.
* **state dict** (``torch.save`` zip, or the legacy non-zip format): read only
  with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
  containers and refuses every other class. A dict that keeps the weights
  under ``"state_dict"`` or ``"model"`` is unwrapped, and a DataParallel
  ``module.`` prefix stripped.
* **torch.export** (``.pt2`` from ``torch.export.save``), for custom
  architectures, only when the spec says ``arch == "torch_export"``. Not
  through ``torch.export.load``, which in torch 2.14 unpickles payloads marked
  ``use_pickle`` (``weights_only=False``), custom and opaque objects, and the
  sample inputs (``weights_only=True`` with a fallback to ``False`` when that
  fails); hands every symbolic shape string to ``sympy.sympify`` (``eval``);
  imports the modules a pytree spec names; and ``ep.module()`` compiles the
  archive's ``guards_code`` strings into Python that runs on every call.
  Here the archive's members are checked against the layout torch writes,
  the weights and constants are rebuilt from their raw bytes (a payload that
  would need pickle is refused), the program JSON is checked by
  :func:`~defense_core.opcheck.scan_serialized_program` and stripped of guard
  code and node metadata that names Python objects, and only then handed to
  torch's deserializer, without sample inputs. The loaded program is checked
  again (:func:`~defense_core.opcheck.check_exported_program`) and turned into
  a trainable module (:func:`module_from_exported_program`).
* **TorchScript** (deprecated): only when ``arch == "torchscript"``; the
  archive's code is scanned before it is loaded
  (:func:`~defense_core.opcheck.scan_torchscript_archive`; ``torch.jit.load``
  runs ``__setstate__``) and every compiled function is checked after
  (:func:`~defense_core.opcheck.check_scripted_module`).

The format is sniffed from the bytes, never from the file name. Anything
else (a plain pickle, a whole pickled ``nn.Module``) raises
:class:`UnsafeModelError` telling the user how to save a loadable file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from defense_core import opcheck
from defense_core.errors import InputError, ModelLoadError, TooLargeError, UnsafeModelError
from defense_core.registry import create_model
from defense_core.spec import TORCH_EXPORT_ARCH, TORCHSCRIPT_ARCH, ModelSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own cap
MAX_TENSORS = 100_000
MAX_ZIP_MEMBERS = 200_000
MAX_REPORTED_NAMES = 5

MAX_PROGRAM_JSON_BYTES = 256 * 1024**2
INSPECT_SEED = 0
INSPECT_BATCH = 2  # the random probe: more than one image, so a fixed batch size is caught

SAFETENSORS = "safetensors"
STATE_DICT = "state_dict"
TORCHSCRIPT = TORCHSCRIPT_ARCH
TORCH_EXPORT = TORCH_EXPORT_ARCH
_CODE_FORMATS = (TORCHSCRIPT, TORCH_EXPORT)

_ZIP_MAGIC = b"PK\x03\x04"
# Legacy (pre-1.6, non-zip) torch.save files open with this pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_UNSAFE_HINT = (
    "would need arbitrary unpickling; save a state_dict with "
    "torch.save(model.state_dict()) or use safetensors"
)
_WRAPPER_KEYS = ("state_dict", "model")
_INT_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


@dataclass(frozen=True)
class ModelFileInfo:
    """What validating a model file found (returned to the uploader)."""

    format: str
    arch: str
    num_tensors: int
    num_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- sniffing


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
        raise UnsafeModelError(f"the model file is a raw Python pickle, which {_UNSAFE_HINT}")
    raise UnsafeModelError(
        "not a recognized model format (expected safetensors, a torch.save state dict, a "
        f"torch.export archive or a TorchScript archive); anything else {_UNSAFE_HINT}"
    )


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"the model file looks like a zip archive but cannot be read: {exc}") from exc
    if len(names) > MAX_ZIP_MEMBERS:
        raise ModelLoadError(f"the model archive has {len(names)} members (limit {MAX_ZIP_MEMBERS})")
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
        f"models in other formats {_UNSAFE_HINT}"
    )


# --------------------------------------------------------------------------- reading


def read_state_dict(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> dict[str, torch.Tensor]:
    """Read a state dict (safetensors or ``torch.save``) without unpickling objects.

    Values are CPU tensors (floating or integer). Archives that carry code
    (torch.export, TorchScript) are refused here: they are loaded whole by
    :func:`load_model`.
    """
    path = Path(path)
    _check_size(path, max_bytes)
    fmt = sniff_model_format(path)
    if fmt in _CODE_FORMATS:
        raise _declare_arch_error(fmt)
    if fmt == SAFETENSORS:
        state = _read_safetensors(path)
    else:
        state = _read_torch_save(path, max_bytes=max_bytes)
    return _validate_tensors(state)


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise TooLargeError(f"the model file is {size} bytes; the limit is {max_bytes}")
    if size == 0:
        raise ModelLoadError("the model file is empty")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise ModelLoadError(f"safetensors header of {header_len} bytes does not fit the file")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ModelLoadError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError("safetensors header must be a JSON object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > MAX_TENSORS:
        raise ModelLoadError(f"the file holds {len(entries)} tensors (limit {MAX_TENSORS})")
    data_len = size - 8 - header_len
    for name, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ModelLoadError(f"safetensors entry {name!r} has invalid data offsets")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # the library reports malformed files with its own error types
        raise ModelLoadError(f"cannot read the safetensors file: {exc}") from exc


def _read_torch_save(path: Path, *, max_bytes: int) -> dict[str, torch.Tensor]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            declared = sum(info.file_size for info in zf.infolist())
        if declared > max_bytes:
            raise TooLargeError(f"the model archive expands to {declared} bytes; the limit is {max_bytes}")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        log.info("refused a model file that needs full unpickling: %s", str(exc).splitlines()[0])
        raise UnsafeModelError(f"the model file {_UNSAFE_HINT}") from exc
    except Exception as exc:  # corrupt archives surface as RuntimeError, EOFError, ...
        raise ModelLoadError(f"cannot read the model file: {type(exc).__name__}: {exc}") from exc
    return _unwrap(obj)


def _unwrap(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"the file holds a {type(obj).__name__}, not a state dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    state = dict(obj)
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _validate_tensors(state: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    if not state:
        raise ModelLoadError("the file holds no tensors")
    if len(state) > MAX_TENSORS:
        raise ModelLoadError(f"the file holds {len(state)} tensors (limit {MAX_TENSORS})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ModelLoadError(f"state dict keys must be strings, found {key!r}")
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{key!r} holds a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            raise ModelLoadError(f"{key!r} is not a dense CPU tensor")
        if not (value.is_floating_point() or value.dtype in _INT_DTYPES):
            raise ModelLoadError(f"{key!r} has dtype {value.dtype}; expected floating point or integer")
        out[key] = value
    return out


# --------------------------------------------------------------------------- models


def load_model(
    path: str | os.PathLike[str],
    spec: ModelSpec,
    *,
    map_location: str | torch.device = "cpu",
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> nn.Module:
    """Build ``spec.arch`` and load the file's weights into it (eval mode).

    ``spec.arch == "torch_export"`` loads a ``torch.export`` archive and
    ``"torchscript"`` a TorchScript archive as the model, both behind the
    operator checks of :mod:`defense_core.opcheck`. Key or shape mismatches
    raise :class:`ModelLoadError` naming the tensors.
    """
    path = Path(path)
    _check_size(path, max_bytes)
    fmt = sniff_model_format(path)
    if spec.arch in _CODE_FORMATS:
        if fmt != spec.arch:
            raise ModelLoadError(
                f"spec.arch is \"{spec.arch}\" but the file is a {fmt} file; "
                + ("give the registry architecture name instead" if fmt not in _CODE_FORMATS
                   else f"declare spec.arch \"{fmt}\" for it")
            )
        if fmt == TORCH_EXPORT:
            return _load_exported(path, map_location, max_bytes=max_bytes)
        return _load_torchscript(path, map_location)
    if fmt in _CODE_FORMATS:
        raise _declare_arch_error(fmt)
    state = read_state_dict(path, max_bytes=max_bytes)
    model = create_model(spec)
    _check_matches(model, state, spec.arch)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _declare_arch_error(fmt: str) -> ModelLoadError:
    kind = "a torch.export" if fmt == TORCH_EXPORT else "a TorchScript"
    return ModelLoadError(f"the file is {kind} archive; declare spec.arch \"{fmt}\" to use it")


def _load_torchscript(path: Path, map_location: str | torch.device) -> nn.Module:
    # Static scan first: loading runs the archive's __setstate__ methods.
    opcheck.scan_torchscript_archive(path)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream; torch.export archives are the format to prefer.
            warnings.simplefilter("ignore", FutureWarning)
            # What torch.jit.load does, keeping the compilation unit so that every
            # function in it (class methods included) can be checked.
            unit = torch._C.CompilationUnit()
            cpp_module = torch._C.import_ir_module(unit, str(path), torch.device(map_location), {}, False)
            module = torch.jit._recursive.wrap_cpp_module(cpp_module)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the TorchScript archive: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError("the TorchScript archive does not hold a module")
    opcheck.check_scripted_module(module, compilation_unit=unit)
    return module.eval()


# --------------------------------------------------------------------------- torch.export

_PT2_MODEL = "model"  # the one program torch.export.save writes
_PT2_META = {"archive_format": "pt2", "archive_version": "0", "byteorder": "little"}
_PT2_WEIGHTS_CONFIG = f"data/weights/{_PT2_MODEL}_weights_config.json"
_PT2_CONSTANTS_CONFIG = f"data/constants/{_PT2_MODEL}_constants_config.json"
_PT2_PROGRAM = f"models/{_PT2_MODEL}.json"
_PT2_PAYLOAD = {"data/weights/": re.compile(r"weight_\d+\Z"), "data/constants/": re.compile(r"tensor_\d+\Z")}
_PT2_STRIDED = 7  # torch._export.serde.schema.Layout.Strided
_PT2_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool,
                         *_INT_DTYPES})
_NODE_METADATA_KEPT = ("stack_trace", "nn_module_stack")


def _load_exported(path: Path, map_location: str | torch.device, *, max_bytes: int) -> nn.Module:
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
            f"cannot load the exported program: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
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
            members = dict((inner, info) for info, inner in opcheck.archive_members(zf))
            declared = sum(info.file_size for info in members.values())
            if declared > max_bytes:
                raise TooLargeError(f"the model archive expands to {declared} bytes; the limit is {max_bytes}")
            for inner in members:
                _check_export_member(inner)
            for inner, expected in _PT2_META.items():
                if inner in members and _read(zf, members[inner], 64).decode("utf-8", "replace").strip() != expected:
                    raise UnsafeModelError(f"the archive's {inner} is not {expected!r}")
            for required in ("archive_format", _PT2_PROGRAM, _PT2_WEIGHTS_CONFIG, _PT2_CONSTANTS_CONFIG):
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
        if inner.startswith(folder) and pattern.match(inner[len(folder):]):
            return
    if inner.startswith("data/aotinductor/"):
        raise UnsafeModelError("the archive carries AOTInductor code (compiled native libraries)")
    raise UnsafeModelError(
        f"the torch.export archive holds an unexpected member {inner!r} (pickled objects, other "
        "programs and compiled code are not accepted); save it with torch.export.save"
    )


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise TooLargeError(f"{info.filename} is {info.file_size} bytes (limit {limit})")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(f"{info.filename} expands beyond {limit} bytes")
    return data


def _read_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> Any:
    try:
        return json.loads(_read(zf, info, limit))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{info.filename} is not valid JSON: {exc}") from exc


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

    flat: dict[str, torch.Tensor] = {}   # one storage per payload file, so aliases stay aliases
    out: dict[str, torch.Tensor] = {}
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(fqn, str):
            raise ModelLoadError(f"{config_name} is malformed")
        if entry.get("use_pickle"):
            raise UnsafeModelError(f"{fqn!r} is stored as a pickle, which {_UNSAFE_HINT}")
        name, meta = entry.get("path_name"), entry.get("tensor_meta")
        if not isinstance(name, str) or not _PT2_PAYLOAD[folder].match(name) or f"{folder}{name}" not in members:
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
            flat[name] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        storage = flat[name]
        if storage.dtype != dtype or len(sizes) != len(strides) or offset < 0 or min(strides, default=0) < 0:
            raise ModelLoadError(f"{fqn!r} does not fit its payload")
        if all(sizes) and offset + sum((n - 1) * st for n, st in zip(sizes, strides)) >= storage.numel():
            raise ModelLoadError(f"{fqn!r} does not fit its payload")
        tensor = torch.as_strided(storage, sizes, strides, offset)
        if entry.get("is_param"):
            tensor = nn.Parameter(tensor, requires_grad=bool(meta.get("requires_grad")))
        out[fqn] = tensor
    return out


def _ints(values: Any, fqn: str) -> list[int]:
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and set(v) == {"as_int"} and type(v["as_int"]) is int and v["as_int"] >= 0
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
                value["metadata"] = {k: v for k, v in value["metadata"].items() if k in _NODE_METADATA_KEPT}
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


# ------------------------------------------------------------------ an exported program as a module

_aten = torch.ops.aten
_CONV2D_OPS = (_aten.conv2d.default, _aten.conv2d.padding)
_DROPOUT_OPS = tuple(
    getattr(_aten, name).default
    for base in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
    for name in (base, f"{base}_")  # nn.Dropout(inplace=True) records the in-place op
)
# Graphs after run_decompositions() freeze BatchNorm/dropout in one mode; not supported.
_FIXED_MODE_OPS = frozenset(
    getattr(getattr(_aten, name), overload)
    for name, overload in (
        ("_native_batch_norm_legit_no_training", "default"), ("_native_batch_norm_legit_functional", "default"),
        ("_native_batch_norm_legit", "default"), ("_native_batch_norm_legit", "no_stats"),
        ("native_batch_norm", "default"), ("_batch_norm_with_update", "default"),
        ("_batch_norm_with_update_functional", "default"), ("_batch_norm_no_update", "default"),
        ("native_dropout", "default"),
    )
    if hasattr(_aten, name) and hasattr(getattr(_aten, name), overload)
)
_BATCHNORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class ExportedDropout(nn.Module):
    """A dropout node of an exported graph that follows ``train()``/``eval()``."""

    def __init__(self, op: Any, p: float) -> None:
        super().__init__()
        self.op = op
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{self.op}, p={self.p}"


def module_from_exported_program(ep: torch.export.ExportedProgram) -> nn.Module:
    """A trainable module from a (checked) exported program.

    ``ep.module()`` gives a ``GraphModule`` whose ``train()``/``eval()`` raise
    and whose layers are frozen in the mode the model was exported in (export
    records ``aten.batch_norm(..., training=<bool>, ...)``, ``aten.dropout(...,
    train=<bool>)``). Here those methods are restored, and each
    ``aten.conv2d``, ``aten.batch_norm`` with running statistics and dropout
    node is turned back into an ``nn.Conv2d``, ``nn.BatchNorm{1,2,3}d`` or
    :class:`ExportedDropout` that holds the same parameters and buffers (so
    the state-dict keys stay those of the original model): the mode then
    follows ``train()``/``eval()``, BatchNorm updates its statistics when
    training, and the defense finds the convolutions and BatchNorm layers.

    Refused (:class:`ModelLoadError`): BatchNorm or dropout in a form whose mode
    cannot be switched (graphs after ``run_decompositions()``, or a BatchNorm
    whose tensors are not one layer's). Not switched: other mode-dependent
    operators (``rrelu``, ``instance_norm`` with running statistics) keep the
    mode they were exported in. A BatchNorm with ``momentum=None`` exported in
    eval mode is recorded with momentum 0 and keeps its statistics.
    """
    try:
        gm = ep.module(check_guards=False)  # no guard code: it would be compiled from the archive
    except Exception as exc:
        raise ModelLoadError(f"cannot build a module from the exported program: {exc}") from exc
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)  # ep.module() replaces both with methods that raise
    graph = gm.graph
    dropouts = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CONV2D_OPS:
            _conv_to_module_(gm, node)
        elif node.target is _aten.batch_norm.default:
            _batchnorm_to_module_(gm, node)
        elif node.target in _DROPOUT_OPS:
            args = _normalized(gm, node)
            if args is not None and isinstance(args.get("p"), (int, float)):
                while hasattr(gm, f"dropout_{dropouts}"):
                    dropouts += 1
                gm.add_submodule(f"dropout_{dropouts}", ExportedDropout(node.target, float(args["p"])))
                _call_module_instead(gm, node, f"dropout_{dropouts}", args["input"])
    frozen = sorted({
        str(n.target) for n in graph.nodes if n.op == "call_function" and (
            n.target in _FIXED_MODE_OPS or n.target in _DROPOUT_OPS
            or (n.target is _aten.batch_norm.default and _normalized_arg(gm, n, "running_mean") is not None)
        )
    })
    if frozen:
        raise ModelLoadError(
            f"the exported program has {', '.join(frozen)} in a form whose train/eval mode cannot be "
            "switched; export the model with torch.export.export and save it without run_decompositions()"
        )
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _normalized(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, Any] | None:
    pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    return dict(pair.kwargs) if pair is not None else None


def _normalized_arg(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str) -> Any:
    args = _normalized(gm, node)
    return None if args is None else args.get(name)


def _attr_of(value: Any, leaf: str) -> str | None:
    """The layer path of a ``get_attr`` of ``<layer>.<leaf>``, else None."""
    if not isinstance(value, torch.fx.Node) or value.op != "get_attr" or not isinstance(value.target, str):
        return None
    prefix, _, last = value.target.rpartition(".")
    return prefix if prefix and last == leaf else None


def _plain_container(gm: torch.fx.GraphModule, prefix: str, names: set[str]) -> bool:
    """``prefix`` is a bare module from ``ep.module()`` holding exactly ``names``."""
    try:
        module = gm.get_submodule(prefix)
    except AttributeError:
        return False
    held = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    return type(module) is nn.Module and not list(module.children()) and held == names


def _replace_layer(gm: torch.fx.GraphModule, prefix: str, layer: nn.Module) -> None:
    parent, _, leaf = prefix.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, layer)


def _call_module_instead(gm: torch.fx.GraphModule, node: torch.fx.Node, target: str, input_node: Any) -> None:
    with gm.graph.inserting_before(node):
        replacement = gm.graph.call_module(target, (input_node,))
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _conv_to_module_(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    args = _normalized(gm, node)
    if args is None:
        return
    prefix, bias = _attr_of(args.get("weight"), "weight"), args.get("bias")
    if prefix is None or (bias is not None and _attr_of(bias, "bias") != prefix):
        return
    config = {"stride": tuple(args["stride"]), "padding": args["padding"] if isinstance(args["padding"], str)
              else tuple(args["padding"]), "dilation": tuple(args["dilation"]), "groups": int(args["groups"])}
    existing = gm.get_submodule(prefix)
    if isinstance(existing, nn.Conv2d):  # the same layer called again
        if any(getattr(existing, k) != v for k, v in config.items()):
            return
    elif _plain_container(gm, prefix, {"weight"} | ({"bias"} if bias is not None else set())):
        weight = gm.get_parameter(f"{prefix}.weight") if "weight" in dict(existing.named_parameters()) else None
        if weight is None or weight.ndim != 4:
            return
        layer = nn.Conv2d(weight.shape[1] * config["groups"], weight.shape[0], tuple(weight.shape[2:]),
                          bias=bias is not None, device="meta", **config)
        layer.weight = weight
        if bias is not None:
            layer.bias = gm.get_parameter(f"{prefix}.bias")
        _replace_layer(gm, prefix, layer)
    else:
        return
    _call_module_instead(gm, node, prefix, args["input"])


def _batchnorm_to_module_(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    args = _normalized(gm, node)
    if args is None:
        return
    prefix = _attr_of(args.get("running_mean"), "running_mean")
    weight, bias = args.get("weight"), args.get("bias")
    affine = weight is not None
    if (prefix is None or _attr_of(args.get("running_var"), "running_var") != prefix
            or (affine != (bias is not None))
            or (affine and (_attr_of(weight, "weight") != prefix or _attr_of(bias, "bias") != prefix))
            or not isinstance(args.get("momentum"), float) or not isinstance(args.get("eps"), float)):
        return
    val = args["input"].meta.get("val") if isinstance(args["input"], torch.fx.Node) else None
    cls = _BATCHNORM_BY_RANK.get(val.dim()) if isinstance(val, torch.Tensor) else None
    if cls is None:
        return
    existing = gm.get_submodule(prefix)
    if isinstance(existing, nn.modules.batchnorm._BatchNorm):  # the same layer called again
        if (type(existing) is not cls or existing.eps != args["eps"] or existing.momentum != args["momentum"]
                or existing.affine != affine):
            return
    else:
        names = {"running_mean", "running_var"} | ({"weight", "bias"} if affine else set())
        counter = "num_batches_tracked" in dict(existing.named_buffers(recurse=False))
        if not _plain_container(gm, prefix, names | ({"num_batches_tracked"} if counter else set())):
            return
        running_mean = gm.get_buffer(f"{prefix}.running_mean")
        layer = cls(running_mean.shape[0], eps=args["eps"], momentum=args["momentum"], affine=affine,
                    track_running_stats=True, device="meta")
        if affine:
            layer.weight = gm.get_parameter(f"{prefix}.weight")
            layer.bias = gm.get_parameter(f"{prefix}.bias")
        layer.running_mean = running_mean
        layer.running_var = gm.get_buffer(f"{prefix}.running_var")
        layer.num_batches_tracked = gm.get_buffer(f"{prefix}.num_batches_tracked") if counter else None
        _replace_layer(gm, prefix, layer)
        # A model exported in train mode counts batches in the graph; the layer does that now.
        for counted in list(gm.graph.nodes):
            if counted.op == "get_attr" and counted.target == f"{prefix}.num_batches_tracked":
                for user in list(counted.users):
                    if user.target is _aten.add_.Tensor and not user.users and user.args[0] is counted:
                        gm.graph.erase_node(user)
    _call_module_instead(gm, node, prefix, args["input"])


def _check_matches(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    expected = model.state_dict()
    # BatchNorm fills in a missing step counter itself (checkpoints from old PyTorch lack it).
    missing = [
        k for k in expected if k not in state and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    wrong_kind = [
        k for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    non_finite = [
        k for k, v in state.items()
        if k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    problems = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", mismatched),
        ("integer where the model has floats", wrong_kind),
        ("NaN or infinite values", non_finite),
    ):
        if names:
            shown = ", ".join(names[:MAX_REPORTED_NAMES])
            more = f", ... ({len(names)} in all)" if len(names) > MAX_REPORTED_NAMES else ""
            problems.append(f"{label} ({len(names)}): {shown}{more}")
    if problems:
        raise ModelLoadError(
            f"the weights do not fit architecture {arch!r} "
            "(check spec.arch, num_classes and in_channels): " + "; ".join(problems)
        )


def inspect_model_file(
    path: str | os.PathLike[str], spec: ModelSpec, *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> ModelFileInfo:
    """Load the model and check what it maps inputs to: all zeros ``[1, C, H, W]``,
    then ``INSPECT_BATCH`` seeded random images (uniform in [0, 1], normalized
    with the spec's mean/std), each to ``[N, num_classes]``."""
    model = load_model(path, spec, max_bytes=max_bytes)
    for x in probe_inputs(spec):
        _check_output(model, x, spec)
    state = model.state_dict()
    return ModelFileInfo(
        format=sniff_model_format(path),
        arch=spec.arch,
        num_tensors=len(state),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )


def probe_inputs(spec: ModelSpec) -> list[torch.Tensor]:
    """The inputs :func:`inspect_model_file` runs: zeros, then normalized random images."""
    generator = torch.Generator().manual_seed(INSPECT_SEED)
    images = torch.rand(INSPECT_BATCH, spec.in_channels, *spec.input_size, generator=generator)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return [torch.zeros(1, spec.in_channels, *spec.input_size), (images - mean) / std]


def _check_output(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> None:
    expected = [x.shape[0], spec.num_classes]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        batch_fixed = spec.arch == TORCH_EXPORT and "shape[0]" in str(exc)
        hint = " (export the model with a dynamic batch dimension)" if batch_fixed else ""
        raise ModelLoadError(
            f"the model fails on a {list(x.shape)} input{hint}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or list(out.shape) != expected:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"the model maps a {list(x.shape)} input to {shape}; expected {expected}")


# --------------------------------------------------------------------------- saving


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``state_dict`` as safetensors (atomically); return the file's sha256 hex."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError("safetensors metadata must map strings to strings")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        t = value.detach().to("cpu")
        # safetensors wants one contiguous, unshared buffer per tensor.
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not t.is_contiguous() or not whole or t.untyped_storage().data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        digest = _sha256(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
