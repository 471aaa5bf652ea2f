"""Where a worker process computes: one GPU per process when there are GPUs,
otherwise the CPU cores this process owns (its affinity mask split between
the pool's processes)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerDevice:
    """The device and thread count one worker pool process computes with (what the
    engine's contained child is told; the engine resolves the precision itself)."""

    device: str  # "cpu" or "cuda:<i>" (index among CUDA_VISIBLE_DEVICES)
    threads: int
    amp: bool  # mixed precision (only on CUDA)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device != "cpu" and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda:<i>', got {self.device!r}")

    def to_dict(self) -> dict[str, object]:
        return {"device": self.device, "threads": self.threads, "amp": self.amp}


def owned_cores() -> int:
    """CPU cores this process may run on (affinity mask, cgroup-friendly)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_runtime(
    *, process_index: int, concurrency: int, cuda_devices: int | None = None, cores: int | None = None
) -> WorkerDevice:
    """The device and thread count of pool process ``process_index`` of ``concurrency``.

    With GPUs, process ``i`` gets GPU ``i mod n`` (``CUDA_VISIBLE_DEVICES`` is
    honoured by CUDA itself: indices count the visible devices only) and AMP.
    Without, the owned cores are split evenly between the pool's processes.
    """
    if concurrency < 1 or process_index < 0:
        raise ValueError("concurrency must be >= 1 and process_index >= 0")
    n_gpus = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    n_cores = owned_cores() if cores is None else cores
    threads = max(1, n_cores // concurrency)
    if n_gpus > 0:
        return WorkerDevice(device=f"cuda:{process_index % n_gpus}", threads=threads, amp=True)
    return WorkerDevice(device="cpu", threads=threads, amp=False)


def apply_runtime(runtime: WorkerDevice) -> None:
    """Pin this process to its runtime (thread pools, current CUDA device)."""
    torch.set_num_threads(runtime.threads)
    if runtime.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(runtime.device))
        torch.backends.cudnn.benchmark = True
    log.info("worker runtime: %s", runtime.to_dict())


def current_process_index() -> int:
    """Index of this pool process (billiard numbers them 0..concurrency-1)."""
    try:
        from billiard.process import current_process
    except ImportError:  # pragma: no cover - billiard ships with celery
        return 0
    return int(getattr(current_process(), "index", 0) or 0)
