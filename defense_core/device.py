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
* The modes round differently, so a timed choice that flipped between runs would make
  results differ for the same inputs and seed. The choice is therefore made once per
  workload (model architecture, input shape, threads, CPU, torch) and remembered: in
  the process, and across processes in a JSON file when ``DeviceOptions.mode_cache``
  names one (:class:`CpuModeCache`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ContextManager, Iterator

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

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
    mode_cache: str | None = None      # JSON file remembering timed CPU mode choices across processes


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
    tensors = [(n, list(t.shape), str(t.dtype)) for n, t in (*model.named_parameters(), *model.named_buffers())]
    doc = {"model": type(model).__name__, "tensors": tensors, "input": list(input_shape), "bf16": bf16,
           "channels_last": channels_last, "threads": torch.get_num_threads(), "cpu": cpu_name(),
           "torch": torch.__version__, "batch": CALIBRATION_BATCH}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class CpuModeCache:
    """Timed CPU mode choices by :func:`workload_key`: in memory, and in ``path`` (a small
    JSON object) when given, so that every process on a machine makes the same choice.
    An unreadable or malformed file counts as empty; writes are atomic (temp file, rename)."""

    MAX_ENTRIES = 1024

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self._memory: dict[str, str] = {}
        self._lock = threading.Lock()

    def _read_file(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            if self.path.stat().st_size > 1 << 20:
                return {}
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and v in CPU_MODES}

    def get(self, key: str) -> str | None:
        with self._lock:
            if key not in self._memory:
                found = self._read_file().get(key)
                if found is None:
                    return None
                self._remember(key, found)
            return self._memory[key]

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Exclusive across processes (``flock`` on ``<path>.lock``) while a choice is
        read and written, so two processes that timed the same workload at the same
        time both keep the first stored choice; without ``fcntl`` or where the lock
        file cannot be made (a read-only directory), no lock."""
        lock = None
        if self.path is not None and fcntl is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                lock = open(self.path.with_name(self.path.name + ".lock"), "a")
            except OSError:
                log.warning("cpu mode: could not lock %s", self.path, exc_info=True)
        if lock is None:
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, key: str, mode: str) -> str:
        """Remember ``mode`` for ``key`` unless a choice is already stored; return the stored one."""
        with self._lock, self._file_lock():
            on_disk = self._read_file()
            stored = self._memory.get(key) or on_disk.get(key)
            if stored is not None:
                self._remember(key, stored)
                return stored
            self._remember(key, mode)
            if self.path is not None:
                try:
                    self._write_file({**on_disk, key: mode})
                except OSError:
                    log.warning("cpu mode: could not write %s", self.path, exc_info=True)
            return mode

    def _trim(self, choices: dict[str, str]) -> None:
        while len(choices) > self.MAX_ENTRIES:  # oldest first (insertion order)
            choices.pop(next(iter(choices)))

    def _remember(self, key: str, mode: str) -> None:
        self._memory[key] = mode
        self._trim(self._memory)

    def _write_file(self, data: dict[str, str]) -> None:
        assert self.path is not None
        self._trim(data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cpu-modes-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


_PROCESS_CACHES: dict[str | None, CpuModeCache] = {}
_PROCESS_CACHES_LOCK = threading.Lock()


def mode_cache(path: str | None = None) -> CpuModeCache:
    """The process-wide cache for ``path`` (``None``: memory only)."""
    with _PROCESS_CACHES_LOCK:
        if path not in _PROCESS_CACHES:
            _PROCESS_CACHES[path] = CpuModeCache(path)
        return _PROCESS_CACHES[path]


def remembered_cpu_mode(model: nn.Module, input_shape: tuple[int, int, int], *,
                        bf16: bool | None = None, channels_last: bool | None = None,
                        cache: CpuModeCache | None = None) -> tuple[str, dict[str, float]]:
    """:func:`choose_cpu_mode`, made once per workload: a remembered choice is returned
    without timing (times ``{}``); a new one is timed and stored."""
    cache = cache if cache is not None else mode_cache()
    key = workload_key(model, input_shape, bf16=bf16, channels_last=channels_last)
    stored = cache.get(key)
    if stored is not None:
        return stored, {}
    mode, times = choose_cpu_mode(model, input_shape, bf16=bf16, channels_last=channels_last)
    return cache.put(key, mode), times


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

    def for_evaluation(self) -> Runtime:
        """The same device and memory format, without autocast: reported metrics
        are those of the full-precision model a user deploys. (Under bf16 autocast
        the WaNet model of the quality benchmark scores 2 points more ASR.)"""
        return replace(self, autocast_dtype=None)

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
            mode, times = remembered_cpu_mode(model, input_shape, bf16=bf16, channels_last=channels_last,
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
    return Runtime(device=device, autocast_dtype=torch.bfloat16 if bf16 else None, channels_last=channels_last)


CPU_FP32 = Runtime(device=torch.device("cpu"))
