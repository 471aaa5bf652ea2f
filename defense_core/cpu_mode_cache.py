"""Remembered CPU mode choices: the modes round differently, so a timed choice that
flipped between runs would make results differ for the same inputs and seed. The
choice is made once per workload (model architecture, input shape, threads, CPU,
torch; :func:`defense_core.cpu_mode.workload_key`) and remembered: in the process,
and across processes in a JSON file (:class:`CpuModeCache`) guarded by a lock file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from torch import nn

from defense_core import cpu_mode
from defense_core.cpu_mode import CPU_MODES, workload_key

log = logging.getLogger(__name__)


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
                lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
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
        """Remember ``mode`` for ``key`` unless a choice is already stored; return the
        stored one."""
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
    """:func:`~defense_core.cpu_mode.choose_cpu_mode`, made once per workload: a remembered
    choice is returned
    without timing (times ``{}``); a new one is timed and stored."""
    cache = cache if cache is not None else mode_cache()
    key = workload_key(model, input_shape, bf16=bf16, channels_last=channels_last)
    stored = cache.get(key)
    if stored is not None:
        return stored, {}
    mode, times = cpu_mode.choose_cpu_mode(model, input_shape, bf16=bf16,
                                           channels_last=channels_last)
    return cache.put(key, mode), times
