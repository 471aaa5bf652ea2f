"""Where and how the engine computes: device, mixed precision, memory format, threads.

* CUDA when available, else CPU (``select_device``).
* On CUDA, fp16 autocast with a ``GradScaler`` (``amp``, on by default there).
* On CPU, bf16 autocast (``cpu_bf16``) and channels-last tensors
  (``channels_last``). bf16 autocast is only offered when oneDNN reports native
  bf16 support (AVX512-BF16 / AMX). Whether it pays differs between CPUs that
  report the same support: on one AVX512-BF16 Xeon a PreAct-ResNet18 training
  step ran 3x *slower* under bf16 autocast, on an AVX512-BF16 EPYC 2x faster
  (2.7x with channels-last, which was 4% slower on the Xeon; see
  ``bench/results/speed.md``). So unless the caller decides, the engine times one
  training step of the actual model in each mode and takes the fastest one that is
  clearly faster than fp32 (:func:`choose_cpu_mode`).
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
    cpu_bf16: bool | None = None       # CPU bf16 autocast; default: timed per model (choose_cpu_mode)
    channels_last: bool | None = None  # CPU: timed per model, like cpu_bf16; on with CUDA AMP
    threads: int | None = None


# On CPU, unless the caller decides, a mode is chosen per job by timing a training step
# of the model (choose_cpu_mode). A mode other than fp32 must be clearly faster: bf16
# changes the arithmetic, so it must gain at least BF16_MIN_SPEEDUP; channels-last alone
# only the layout, CHANNELS_LAST_MIN_SPEEDUP. Models whose fp32 step is shorter than
# CALIBRATION_MIN_STEP_S are not timed (fp32).
BF16_MIN_SPEEDUP = 1.5
CHANNELS_LAST_MIN_SPEEDUP = 1.1
CALIBRATION_MIN_STEP_S = 0.02
CALIBRATION_BATCH = 32
CPU_MODES: dict[str, tuple[bool, bool]] = {  # name -> (bf16 autocast, channels-last)
    "fp32": (False, False),
    "channels_last": (False, True),
    "bf16": (True, False),
    "channels_last+bf16": (True, True),
}


def choose_cpu_mode(model: nn.Module, input_shape: tuple[int, int, int], *,
                    bf16: bool | None = None, channels_last: bool | None = None,
                    batch: int = CALIBRATION_BATCH) -> tuple[str, dict[str, float]]:
    """Time a training step (forward and backward) of a copy of ``model`` on ``batch``
    random images of ``input_shape`` in each CPU mode allowed by the pinned choices
    (``bf16``/``channels_last`` not None), and return the chosen mode's name (a key of
    :data:`CPU_MODES`) with the times in seconds.

    The chosen mode is the fastest one that :func:`mode_pays` over fp32; fp32 when none
    does, when fp32 is pinned out, the first allowed mode. bf16 modes are timed only
    where oneDNN runs bf16 natively. The caller's model, its BatchNorm statistics and the
    global random streams are left untouched. Costs a few training steps of ``batch``.
    """
    allowed = [name for name, (b, c) in CPU_MODES.items()
               if (bf16 is None or b == bf16) and (channels_last is None or c == channels_last)
               and (not b or cpu_supports_bf16())]
    if len(allowed) <= 1:
        return (allowed[0] if allowed else "fp32"), {}
    probe = copy.deepcopy(model).cpu().train()
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))

    def step(name: str) -> float:
        use_bf16, use_cl = CPU_MODES[name]
        probe.to(memory_format=torch.channels_last if use_cl else torch.contiguous_format)
        inp = x.contiguous(memory_format=torch.channels_last) if use_cl else x
        started = time.perf_counter()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=use_bf16):
            out = probe(inp)
        out.float().logsumexp(dim=1).mean().backward()
        probe.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    times: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        for name in allowed:  # warm-up: kernel selection, allocations
            step(name)
        for name in allowed:
            times[name] = min(step(name), step(name))
    base = times.get("fp32")
    if base is None:  # fp32 pinned out (e.g. bf16=True): the fastest allowed mode
        return min(times, key=times.__getitem__), times
    if base < CALIBRATION_MIN_STEP_S:
        return "fp32", times
    paying = [name for name in times if name == "fp32" or mode_pays(name, base, times[name])]
    return min(paying, key=times.__getitem__), times


def mode_pays(name: str, fp32_s: float, mode_s: float) -> bool:
    """Whether ``name`` is enough faster than fp32 to be chosen (see :func:`choose_cpu_mode`)."""
    use_bf16, _ = CPU_MODES[name]
    need = BF16_MIN_SPEEDUP if use_bf16 else CHANNELS_LAST_MIN_SPEEDUP
    return fp32_s >= CALIBRATION_MIN_STEP_S and fp32_s >= need * mode_s


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
    """Resolve ``options`` for this machine. On CPU, with ``cpu_bf16`` or
    ``channels_last`` unset, ``model`` and ``input_shape`` (C, H, W) let
    :func:`choose_cpu_mode` decide them; without a model: fp32, contiguous."""
    options = options or DeviceOptions()
    set_threads(options.threads)
    device = select_device(options.device)
    if device.type == "cuda":
        amp = True if options.amp is None else options.amp
        channels_last = amp if options.channels_last is None else options.channels_last
        return Runtime(device=device, autocast_dtype=torch.float16 if amp else None, channels_last=channels_last)
    bf16 = options.cpu_bf16
    channels_last = options.channels_last
    if bf16 and not cpu_supports_bf16():
        log.warning("bf16 autocast requested but this CPU has no native bf16; using fp32")
        bf16 = False
    if (bf16 is None or channels_last is None) and model is not None and input_shape is not None:
        try:
            mode, times = choose_cpu_mode(model, input_shape, bf16=bf16, channels_last=channels_last)
        except Exception:  # a model that cannot be copied or timed: the plain defaults
            log.warning("cpu mode: could not time the model; using the defaults", exc_info=True)
        else:
            bf16, channels_last = CPU_MODES[mode]
            log.info("cpu mode: %s (training step of %d images: %s)", mode, CALIBRATION_BATCH,
                     ", ".join(f"{k} {v:.3f} s" for k, v in times.items()) or "not timed")
    bf16 = bool(bf16)
    channels_last = bool(channels_last)
    return Runtime(device=device, autocast_dtype=torch.bfloat16 if bf16 else None, channels_last=channels_last)


CPU_FP32 = Runtime(device=torch.device("cpu"))
