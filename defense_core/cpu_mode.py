"""Choosing the CPU compute mode of a model by timing it (fp32, channels-last, bf16).

bf16 autocast is only offered where oneDNN runs bf16 natively (AVX512-BF16 / AMX).
Whether it pays differs between CPUs that report the same support, in both
directions and by a wide margin (``bench/results/speed.md``), and so does
channels-last; so unless the caller decides, the engine times one training step of
the actual model in each mode and takes the fastest one that is clearly faster than
fp32 (:func:`choose_cpu_mode`). :mod:`defense_core.cpu_mode_cache` remembers the
choice per workload.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn


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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def workload_key(model: nn.Module, input_shape: tuple[int, int, int], *,
                 bf16: bool | None, channels_last: bool | None) -> str:
    """What a timed mode choice depends on: the model's parameter and buffer names,
    shapes and dtypes (not their values), the input shape, the pinned choices, the
    thread count, the CPU and the torch version."""
    named = (*model.named_parameters(), *model.named_buffers())
    tensors = [(n, list(t.shape), str(t.dtype)) for n, t in named]
    doc = {"model": type(model).__name__, "tensors": tensors, "input": list(input_shape),
           "bf16": bf16,
           "channels_last": channels_last, "threads": torch.get_num_threads(), "cpu": cpu_name(),
           "torch": torch.__version__, "batch": CALIBRATION_BATCH}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
