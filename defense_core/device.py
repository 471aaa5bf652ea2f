"""Where and how the engine computes: device, mixed precision, memory format, threads.

* CUDA when available, else CPU (``select_device``).
* On CUDA, fp16 autocast with a ``GradScaler`` (``amp``, on by default there).
* On CPU, bf16 autocast (``cpu_bf16``) and channels-last tensors (``channels_last``),
  each timed per model unless the caller decides (:mod:`defense_core.cpu_mode`) and
  remembered per workload (:mod:`defense_core.cpu_mode_cache`).

:func:`make_runtime` resolves :class:`DeviceOptions` into a :class:`DeviceRuntime`,
which the stages take instead of loose flags.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch
from torch import nn

from defense_core import cpu_mode
from defense_core.cpu_mode import CALIBRATION_BATCH, CPU_MODES
from defense_core.cpu_mode_cache import mode_cache, remembered_cpu_mode

log = logging.getLogger(__name__)


def select_device(name: str | None = None) -> torch.device:
    """``name`` if given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA when available,
    else CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {name!r}; use 'cpu' or 'cuda[:N]'")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int | None) -> None:
    """Use ``n`` intra-op threads (the cores this process owns); ``None`` keeps torch's choice."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)


@dataclass(frozen=True)
class DeviceOptions:
    """User-facing knobs; ``None`` means "pick the default for the hardware"."""

    device: str | None = None
    amp: bool | None = None            # CUDA fp16 autocast + GradScaler; default on with CUDA
    cpu_bf16: bool | None = None       # CPU bf16 autocast; default: timed per model
    channels_last: bool | None = None  # CPU: timed per model, like cpu_bf16; on with CUDA AMP
    threads: int | None = None
    mode_cache: str | None = None      # JSON file: timed CPU mode choices across processes


@dataclass(frozen=True)
class DeviceRuntime:
    """The resolved choices; stages take one of these instead of loose flags."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def uses_grad_scaler(self) -> bool:
        return self.device.type == "cuda" and self.autocast_dtype == torch.float16

    def autocast(self) -> AbstractContextManager[None]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cuda") if self.uses_grad_scaler else None

    def for_evaluation(self) -> DeviceRuntime:
        """The same device and memory format, without autocast: reported metrics
        are those of the full-precision model a user deploys (bf16 autocast moves
        them measurably: ``python -m bench.eval_precision``)."""
        return replace(self, autocast_dtype=None)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_runtime(options: DeviceOptions | None = None, *, model: nn.Module | None = None,
                 input_shape: tuple[int, int, int] | None = None) -> DeviceRuntime:
    """Resolve ``options`` for this machine. On CPU, with ``cpu_bf16`` or
    ``channels_last`` unset, ``model`` and ``input_shape`` (C, H, W) let
    :func:`~defense_core.cpu_mode.choose_cpu_mode` decide them; without a model: fp32,
    contiguous."""
    options = options or DeviceOptions()
    set_threads(options.threads)
    device = select_device(options.device)
    if device.type == "cuda":
        amp = True if options.amp is None else options.amp
        channels_last = amp if options.channels_last is None else options.channels_last
        return DeviceRuntime(device=device, autocast_dtype=torch.float16 if amp else None,
                             channels_last=channels_last)
    bf16 = options.cpu_bf16
    channels_last = options.channels_last
    if bf16 and not cpu_mode.cpu_supports_bf16():
        log.warning("bf16 autocast requested but this CPU has no native bf16; using fp32")
        bf16 = False
    if (bf16 is None or channels_last is None) and model is not None and input_shape is not None:
        try:
            mode, times = remembered_cpu_mode(model, input_shape, bf16=bf16,
                                              channels_last=channels_last,
                                              cache=mode_cache(options.mode_cache))
        except Exception:  # a model that cannot be copied or timed: the plain defaults
            log.warning("cpu mode: could not time the model; using the defaults", exc_info=True)
        else:
            bf16, channels_last = CPU_MODES[mode]
            if times:
                log.info("cpu mode: %s (training step of %d images: %s)", mode, CALIBRATION_BATCH,
                         ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
            else:
                log.info("cpu mode: %s (chosen earlier for this workload on this machine)", mode)
    bf16 = bool(bf16)
    channels_last = bool(channels_last)
    return DeviceRuntime(device=device, autocast_dtype=torch.bfloat16 if bf16 else None,
                         channels_last=channels_last)


CPU_FP32 = DeviceRuntime(device=torch.device("cpu"))
