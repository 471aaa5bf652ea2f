"""Run engine work in a contained child process, and kill it when it must stop.

:func:`run_contained` hands one task (see :mod:`defense_core.sandbox.tasks`)
to a fresh interpreter started with ``subprocess`` (fork + exec: nothing of
this process's memory, connections or open files carries over; ``close_fds``)
whose environment holds no credentials: only ``PATH``, the locale, the thread
counts and a few hardware variables (:data:`PASSED_ENV`). The child confines
itself before it reads its inputs (:mod:`defense_core.sandbox.confine`), talks
back through a dedicated pipe (progress, the result, a typed error) and is
**killed** — SIGTERM, then SIGKILL after ``grace_seconds`` — when

* the caller's ``should_stop()`` answers True (a cancel, a lost lease),
* its wall-clock bound passes, or its resident memory passes its bound,
* the caller is interrupted (a Celery soft time limit, Ctrl-C): ``finally``,
* the caller's process dies (``PR_SET_PDEATHSIG``).

Everything the child says is treated as untrusted input: bounded in size,
type-checked, and a child that breaks the protocol is killed.

A :class:`ChildPool` keeps one warm spare (torch already imported) so a
validation costs a fraction of a second instead of an interpreter start;
each child still serves exactly one request.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from defense_core.errors import Cancelled, DefenseCoreError, InputError
from defense_core.progress import Reporter

log = logging.getLogger(__name__)

GIB = 1 << 30
MAX_EVENT_BYTES = 8 << 20
MAX_OUTPUT_LINES = 40
MAX_OUTPUT_LINE_CHARS = 500
POLL_S = 0.1
# Variables a child may inherit: hardware and numeric-library knobs, never secrets.
PASSED_ENV = ("LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES",
              "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
_BOOT = ("import sys; sys.path.insert(0, {root!r}); "
         "from defense_core.sandbox.child import main; main()")


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- limits


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
        if not (self.wall_seconds > 0 and self.memory_bytes > 0 and self.file_bytes > 0 and self.threads >= 1):
            raise ValueError(f"invalid containment limits: {self}")

    def bounds(self) -> dict[str, int]:
        cpu = self.cpu_seconds or int(math.ceil(self.wall_seconds * self.threads)) + 60
        return {"memory_bytes": int(self.memory_bytes), "cpu_seconds": cpu,
                "file_bytes": int(self.file_bytes), "open_files": int(self.open_files)}


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
    env.update({
        "PATH": "/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
    })
    return env


# --------------------------------------------------------------------------- one child


class _Child:
    """A started child: its process, its event pipe, and the tail of what it printed."""

    def __init__(self, threads: int) -> None:
        import defense_core

        root = str(Path(defense_core.__file__).resolve().parent.parent)
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOT.format(root=root), str(write_fd), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), env=child_env(threads), cwd="/", start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.threads = threads
        self.started = time.monotonic()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=256)
        self.output: deque[str] = deque(maxlen=MAX_OUTPUT_LINES)
        self._events_file = os.fdopen(read_fd, "rb")
        threading.Thread(target=self._read_events, name=f"sandbox-events-{self.proc.pid}", daemon=True).start()
        threading.Thread(target=self._read_output, name=f"sandbox-output-{self.proc.pid}", daemon=True).start()

    def _read_events(self) -> None:
        reader = self._events_file
        try:
            while True:
                line = reader.readline(MAX_EVENT_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_EVENT_BYTES or not line.endswith(b"\n"):
                    self.events.put({"event": "protocol", "message": "an event line is too long"})
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    self.events.put({"event": "protocol", "message": "an event is not JSON"})
                    break
                if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                    self.events.put({"event": "protocol", "message": "an event is not an object"})
                    break
                self.events.put(event)
        except (OSError, ValueError):
            pass
        finally:
            self.events.put(None)  # end of stream
            reader.close()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                self.output.append(raw[:MAX_OUTPUT_LINE_CHARS].decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_request(self, request: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            raise ChildFailed(f"the contained child ended before it took its request ({self.describe_exit()})") from None

    def rss_bytes(self) -> tuple[int, int]:
        """Current and peak resident memory (0 when it cannot be read)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0, 0
        values = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values.get("VmRSS", 0), values.get("VmHWM", 0)

    def kill(self, grace_seconds: float) -> None:
        """SIGTERM, then SIGKILL after the grace period; reaps the process."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"


# --------------------------------------------------------------------------- the pool


class ChildPool:
    """Starts children from one long-lived thread, keeping ``spares`` warm ones.

    Children are started by a dedicated thread because ``PR_SET_PDEATHSIG``
    fires when the *thread* that started a child ends: a child started by a
    short-lived request thread could be killed in the middle of its work.
    """

    def __init__(self, *, spares: int = 1, threads: int = 1) -> None:
        self.spares = max(0, spares)
        self.threads = threads
        self._requests: queue.Queue[Future[_Child] | None] = queue.Queue()
        self._ready: deque[_Child] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._spawn_loop, name="sandbox-spawner", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        self._top_up()

    def _spawn_loop(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            if not request.set_running_or_notify_cancel():
                continue
            try:
                request.set_result(_Child(self.threads))
            except BaseException as exc:
                request.set_exception(exc)

    def _spawn(self) -> Future[_Child]:
        future: Future[_Child] = Future()
        self._requests.put(future)
        return future

    def _top_up(self) -> None:
        if self._closed or self.spares == 0:
            return

        def keep(future: Future[_Child]) -> None:
            if future.exception() is None:
                with self._lock:
                    if self._closed:
                        future.result().kill(0)
                    else:
                        self._ready.append(future.result())

        with self._lock:
            missing = self.spares - len(self._ready)
        for _ in range(missing):
            self._spawn().add_done_callback(keep)

    def acquire(self, threads: int) -> _Child:
        """A started child that has not served a request yet (a warm spare when one is)."""
        child = None
        with self._lock:
            while self._ready:
                candidate = self._ready.popleft()
                if candidate.alive() and candidate.threads == threads:
                    child = candidate
                    break
                candidate.kill(0)
        if child is None:
            future = self._spawn() if threads == self.threads else None
            child = future.result() if future is not None else self._spawn_with(threads)
        self._top_up()
        return child

    def _spawn_with(self, threads: int) -> _Child:
        saved, self.threads = self.threads, threads
        try:
            return self._spawn().result()
        finally:
            self.threads = saved

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = list(self._ready), deque()
        for child in ready:
            child.kill(0)
        self._requests.put(None)


_POOLS: dict[tuple[int, int, int], ChildPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(*, spares: int = 1, threads: int = 1) -> ChildPool:
    """This process's pool for the given spare count and thread count (made on first use)."""
    key = (os.getpid(), spares, threads)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ChildPool(spares=spares, threads=threads)
            _POOLS[key] = pool
        return pool


# --------------------------------------------------------------------------- running a task


def _progress_fields(event: Mapping[str, Any]) -> dict[str, Any] | None:
    stage, step, total = event.get("stage"), event.get("step"), event.get("total")
    metrics = event.get("metrics") or {}
    if not (isinstance(stage, str) and len(stage) <= 32 and isinstance(step, int)
            and (total is None or isinstance(total, int)) and isinstance(metrics, dict) and len(metrics) <= 32):
        return None
    clean = {str(k)[:64]: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return {"stage": stage, "step": step, "total": total, "metrics": clean}


def _raise_error(event: Mapping[str, Any], child: _Child) -> None:
    kind = event.get("kind")
    message = str(event.get("message") or "")[:4000]
    code = str(event.get("code") or "invalid-input")[:64]
    if kind == "input":
        operator = event.get("operator")
        raise ChildInputError(message, code=code, operator=operator if isinstance(operator, str) else None)
    if kind == "resource":
        raise ResourceLimitError(f"{message} (memory bound {child_limits(child)})", bound="memory")
    detail = f"{event.get('class', 'error')}: {message}" if message else str(event.get("class", "error"))
    where = event.get("where")
    raise ChildFailed(f"the contained run failed: {detail}" + (f" at {where}" if where else ""))


def _raise_if_out_of_bounds(child: _Child) -> None:
    """A child the kernel stopped for passing its CPU or file-size bound."""
    if child.proc.returncode == -signal.SIGXCPU:
        raise ResourceLimitError("the model's work used up its CPU-time bound and was stopped", bound="cpu")
    if child.proc.returncode == -signal.SIGXFSZ:
        raise ResourceLimitError("the model's work wrote a file larger than its bound and was stopped", bound="file")


def child_limits(child: _Child) -> str:
    return getattr(child, "limit_text", "unknown")


def run_contained(
    task: str,
    args: Mapping[str, Any],
    *,
    scratch: Path,
    limits: Limits,
    reporter: Reporter | None = None,
    should_stop: Callable[[], bool] | None = None,
    devices: Sequence[str] = (),
    pool: ChildPool | None = None,
) -> ContainedResult:
    """Run ``task`` with ``args`` in a contained child confined to ``scratch``.

    Raises :class:`ChildInputError` / :class:`ResourceLimitError` (both
    :class:`InputError`) for the input's faults, :class:`Cancelled` when
    ``should_stop()`` answered True, :class:`ChildFailed` for everything else.
    The child is dead when this returns or raises.
    """
    scratch = Path(scratch).resolve()
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    child = pool.acquire(limits.threads) if pool is not None else _Child(limits.threads)
    child.limit_text = f"{limits.memory_bytes / GIB:.1f} GiB"  # type: ignore[attr-defined]
    deadline = started + limits.wall_seconds
    confinement: dict[str, Any] = {}
    peak = 0
    try:
        child.send_request({"task": task, "args": dict(args), "scratch": str(scratch),
                            "bounds": limits.bounds(), "threads": limits.threads, "devices": list(devices)})
        while True:
            try:
                event = child.events.get(timeout=POLL_S)
            except queue.Empty:
                event = {"event": "tick"}
            if event is None:
                try:
                    child.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass  # killed below
                _raise_if_out_of_bounds(child)
                raise ChildFailed(f"the contained child ended without an answer ({child.describe_exit()}); "
                                  f"its last output: {' | '.join(list(child.output)[-5:]) or 'nothing'}")
            kind = event["event"]
            if kind == "progress" and reporter is not None:
                fields = _progress_fields(event)
                if fields is not None:
                    reporter.update(**fields)
            elif kind == "confined":
                info = event.get("confinement")
                confinement = info if isinstance(info, dict) else {}
                if confinement.get("missing"):
                    log.warning("sandbox: not enforced on this host: %s", "; ".join(map(str, confinement["missing"])))
            elif kind == "done":
                result = event.get("result")
                if not isinstance(result, dict):
                    raise ChildFailed("the contained child answered with something that is not an object")
                return ContainedResult(result=result, confinement=confinement, peak_rss_bytes=peak,
                                       seconds=time.monotonic() - started)
            elif kind == "error":
                _raise_error(event, child)
            elif kind == "protocol":
                raise ChildFailed(f"the contained child broke the protocol: {event.get('message')}")
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled: the contained run was killed")
            rss, hwm = child.rss_bytes()
            peak = max(peak, rss, hwm)
            if rss > limits.memory_bytes:
                raise ResourceLimitError(
                    f"the model used more than {limits.memory_bytes / GIB:.1f} GiB of memory and was stopped",
                    bound="memory")
            if time.monotonic() > deadline:
                raise ResourceLimitError(
                    f"the model's work did not finish within {limits.wall_seconds:g} s and was stopped",
                    bound="time")
            if child.proc.poll() is not None and child.proc.returncode < 0 and child.events.empty():
                _raise_if_out_of_bounds(child)
                raise ChildFailed(f"the contained child was {child.describe_exit()}")
    finally:
        child.kill(limits.grace_seconds)
