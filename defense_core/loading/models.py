"""Models: a file's weights in a registry architecture, or a code-carrying archive as the model,
and the check of what a loaded model maps inputs to."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defense_core import opcheck
from defense_core.errors import ModelLoadError
from defense_core.loading.export_archive import load_exported
from defense_core.loading.formats import (
    CODE_FORMATS,
    DEFAULT_MAX_MODEL_BYTES,
    TORCH_EXPORT,
    check_size,
    declare_arch_error,
    sniff_model_format,
)
from defense_core.loading.state_dict import read_state_dict
from defense_core.registry import create_model
from defense_core.spec import ModelSpec

MAX_REPORTED_NAMES = 5
INSPECT_SEED = 0
INSPECT_BATCH = 2  # the random probe: more than one image, so a fixed batch size is caught


@dataclass(frozen=True)
class ModelFileInfo:
    """What validating a model file found (returned to the uploader)."""

    format: str
    arch: str
    num_tensors: int
    num_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    check_size(path, max_bytes)
    fmt = sniff_model_format(path)
    if spec.arch in CODE_FORMATS:
        if fmt != spec.arch:
            raise ModelLoadError(
                f"spec.arch is \"{spec.arch}\" but the file is a {fmt} file; "
                + ("give the registry architecture name instead" if fmt not in CODE_FORMATS
                   else f"declare spec.arch \"{fmt}\" for it")
            )
        if fmt == TORCH_EXPORT:
            return load_exported(path, map_location, max_bytes=max_bytes)
        return _load_torchscript(path, map_location)
    if fmt in CODE_FORMATS:
        raise declare_arch_error(fmt)
    state = read_state_dict(path, max_bytes=max_bytes)
    model = create_model(spec)
    _check_matches(model, state, spec.arch)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


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
            device = torch.device(map_location)
            cpp_module = torch._C.import_ir_module(unit, str(path), device, {}, False)
            module = torch.jit._recursive.wrap_cpp_module(cpp_module)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the TorchScript archive: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError("the TorchScript archive does not hold a module")
    opcheck.check_scripted_module(module, compilation_unit=unit)
    return module.eval()


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
        raise ModelLoadError(
            f"the model maps a {list(x.shape)} input to {shape}; expected {expected}"
        )
