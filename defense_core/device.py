"""Where and how the engine computes: device, mixed precision, memory format, threads.

* CUDA when available, else CPU (``select_device``).
* On CUDA, fp16 autocast with a ``GradScaler`` (``amp``, on by default there).
* On CPU, bf16 autocast (``cpu_bf16``) and channels-last tensors
  (``channels_last``). bf16 autocast is only offered when oneDNN reports native
  bf16 support (AVX512-BF16 / AMX). Whether it pays differs between CPUs that
  report the same support: on one AVX512-BF16 Xeon a PreAct-ResNet18 training
  step ran 3x *slower* under bf16 autocast, on an AVX512-BF16 EPYC 2.2x faster
  (``bench/results/speed.md``). So unless the caller decides, the engine times
  one training step of the actual model both ways and takes bf16 only when it
  is clearly faster (:func:`choose_cpu_bf16`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from typing import ContextManager

import torch
from torch import nn

log = logging.getLogger(__name__)


def select_device(name: str | None = None) -> torch.device:
    """``name`` if given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA when available, else CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {name!r}; use 'cpu' or 'cuda[:N]'")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    """True when oneDNN can run bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:
        return False
    try:
        return bool(check())
    except RuntimeError:  # pragma: no cover - depends on the build
        return False


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
    cpu_bf16: bool | None = None       # CPU bf16 autocast; default: timed per model (choose_cpu_bf16)
    channels_last: bool | None = None  # default off on CPU (see the speed bench), on with CUDA AMP
    threads: int | None = None


# Channels-last on CPU: 4% slower on one machine, ~10% faster on another (bench/speed.py);
# not worth a per-run decision, so off unless asked for.
CPU_CHANNELS_LAST_DEFAULT = False
# bf16 autocast is chosen on CPU only when a timed training step is at least this much
# faster than in fp32, and only for models whose fp32 step takes long enough to time.
BF16_MIN_SPEEDUP = 1.5
CALIBRATION_MIN_STEP_S = 0.02
CALIBRATION_BATCH = 32


def choose_cpu_bf16(model: nn.Module, input_shape: tuple[int, int, int], *,
                    batch: int = CALIBRATION_BATCH) -> tuple[bool, float, float]:
    """Time a training step (forward and backward) of a copy of ``model`` on a batch of
    ``input_shape`` images in fp32 and under bf16 autocast; ``(use_bf16, fp32_s, bf16_s)``.

    bf16 is chosen when the step is at least :data:`BF16_MIN_SPEEDUP` times faster and
    the fp32 step takes at least :data:`CALIBRATION_MIN_STEP_S` (tiny models: fp32).
    The caller's model, its BatchNorm statistics and the global random streams are
    left untouched. Costs a few training steps of ``batch`` images.
    """
    probe = copy.deepcopy(model).cpu().train()
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            out = probe(x)
        out.float().logsumexp(dim=1).mean().backward()
        probe.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    with torch.random.fork_rng(devices=[]):
        step(False), step(True)  # warm-up: kernel selection, allocations
        fp32_s = min(step(False), step(False))
        if fp32_s < CALIBRATION_MIN_STEP_S:
            return False, fp32_s, float("nan")
        bf16_s = min(step(True), step(True))
    return bf16_pays(fp32_s, bf16_s), fp32_s, bf16_s


def bf16_pays(fp32_s: float, bf16_s: float) -> bool:
    """The rule of :func:`choose_cpu_bf16` on two measured step times."""
    return fp32_s >= CALIBRATION_MIN_STEP_S and fp32_s >= BF16_MIN_SPEEDUP * bf16_s


@dataclass(frozen=True)
class Runtime:
    """The resolved choices; stages take one of these instead of loose flags."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def uses_grad_scaler(self) -> bool:
        return self.device.type == "cuda" and self.autocast_dtype == torch.float16

    def autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cuda") if self.uses_grad_scaler else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_runtime(options: DeviceOptions | None = None, *, model: nn.Module | None = None,
                 input_shape: tuple[int, int, int] | None = None) -> Runtime:
    """Resolve ``options`` for this machine. On a CPU with native bf16 and ``cpu_bf16``
    unset, ``model`` and ``input_shape`` (C, H, W) let :func:`choose_cpu_bf16` decide;
    without them it stays fp32."""
    options = options or DeviceOptions()
    set_threads(options.threads)
    device = select_device(options.device)
    if device.type == "cuda":
        amp = True if options.amp is None else options.amp
        channels_last = amp if options.channels_last is None else options.channels_last
        return Runtime(device=device, autocast_dtype=torch.float16 if amp else None, channels_last=channels_last)
    if options.cpu_bf16 is None:
        bf16 = False
        if model is not None and input_shape is not None and cpu_supports_bf16():
            try:
                bf16, fp32_s, bf16_s = choose_cpu_bf16(model, input_shape)
            except Exception:  # a model that cannot be copied or timed: stay with fp32
                log.warning("cpu precision: could not time the model; using fp32", exc_info=True)
                bf16, fp32_s, bf16_s = False, float("nan"), float("nan")
            log.info("cpu precision: %s (training step of %d images: fp32 %.3f s, bf16 %.3f s)",
                     "bf16 autocast" if bf16 else "fp32", CALIBRATION_BATCH, fp32_s, bf16_s)
    else:
        bf16 = options.cpu_bf16
    if bf16 and not cpu_supports_bf16():
        log.warning("bf16 autocast requested but this CPU has no native bf16; using fp32")
        bf16 = False
    channels_last = CPU_CHANNELS_LAST_DEFAULT if options.channels_last is None else options.channels_last
    return Runtime(device=device, autocast_dtype=torch.bfloat16 if bf16 else None, channels_last=channels_last)


CPU_FP32 = Runtime(device=torch.device("cpu"))
