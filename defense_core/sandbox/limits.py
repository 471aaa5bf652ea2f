"""What bounds a contained run, how its failures are typed, and what its environment holds."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from defense_core.errors import DefenseCoreError, InputError

GIB = 1 << 30
# Variables a child may inherit: hardware and numeric-library knobs, never secrets.
PASSED_ENV = (
    "LANG",
    "LC_ALL",
    "TZ",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
)


class ChildInputError(InputError):
    """The child refused its input (the engine's own :class:`InputError`, relayed)."""

    def __init__(self, message: str, *, code: str, operator: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.operator = operator


class ResourceLimitError(InputError):
    """The model needed more memory or time than its bound: deterministic, the input's doing.

    ``bound`` says which: ``"memory"``, ``"time"`` (wall clock), ``"cpu"`` or ``"file"``.
    """

    code = "resource-limit"

    def __init__(self, message: str, *, bound: str) -> None:
        super().__init__(message)
        self.bound = bound


class ChildFailed(DefenseCoreError):
    """The child crashed, broke the protocol or failed internally (a fault, not the input's)."""


@dataclass(frozen=True)
class Limits:
    """Bounds of one contained run."""

    wall_seconds: float
    memory_bytes: int = 8 * GIB
    file_bytes: int = 8 * GIB
    threads: int = 1
    cpu_seconds: int | None = None  # default: the wall bound on every thread, plus a minute
    grace_seconds: float = 1.0
    open_files: int = 256

    def __post_init__(self) -> None:
        if not (
            self.wall_seconds > 0
            and self.memory_bytes > 0
            and self.file_bytes > 0
            and self.threads >= 1
        ):
            raise ValueError(f"invalid containment limits: {self}")

    def bounds(self) -> dict[str, int]:
        cpu = self.cpu_seconds or math.ceil(self.wall_seconds * self.threads) + 60
        return {
            "memory_bytes": int(self.memory_bytes),
            "cpu_seconds": cpu,
            "file_bytes": int(self.file_bytes),
            "open_files": int(self.open_files),
        }


@dataclass(frozen=True)
class ContainedResult:
    result: dict[str, Any]
    confinement: dict[str, Any]
    peak_rss_bytes: int
    seconds: float


def child_env(threads: int) -> dict[str, str]:
    """The child's whole environment: nothing secret can be in it."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("LANG", "C.UTF-8")
    env.update(
        {
            "PATH": "/usr/bin:/bin",
            "HOME": "/nonexistent",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
        }
    )
    return env
