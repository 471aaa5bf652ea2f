"""Run engine work in a contained child process, and kill it when it must stop.

:func:`run_contained` hands one task (see :mod:`defense_core.sandbox.tasks`)
to a fresh interpreter started with ``subprocess`` (fork + exec: nothing of
this process's memory, connections or open files carries over; ``close_fds``)
whose environment holds no credentials: only ``PATH``, the locale, the thread
counts and a few hardware variables
(:data:`~defense_core.sandbox.limits.PASSED_ENV`). The child confines
itself before it reads its inputs (:mod:`defense_core.sandbox.confine`), talks
back through a dedicated pipe (progress, the result, a typed error) and is
**killed** — SIGTERM, then SIGKILL after ``grace_seconds`` — when

* the caller's ``should_stop()`` answers True (a cancel, a lost lease),
* its wall-clock bound passes, or its resident memory passes its bound,
* the caller is interrupted (a Celery soft time limit, Ctrl-C): ``finally``,
* the caller's process dies (``PR_SET_PDEATHSIG``).

Everything the child says is treated as untrusted input: bounded in size,
type-checked, and a child that breaks the protocol is killed.

The child process and the pool of warm spares are in
:mod:`defense_core.sandbox.pool`; the bounds and error types in
:mod:`defense_core.sandbox.limits`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from defense_core.errors import Cancelled
from defense_core.progress import Reporter
from defense_core.sandbox.limits import (
    GIB,
    ChildFailed,
    ChildInputError,
    ContainedResult,
    Limits,
    ResourceLimitError,
)
from defense_core.sandbox.pool import ChildPool, ChildProcess

log = logging.getLogger(__name__)
POLL_S = 0.1


def _progress_fields(event: Mapping[str, Any]) -> dict[str, Any] | None:
    stage, step, total = event.get("stage"), event.get("step"), event.get("total")
    metrics = event.get("metrics") or {}
    if not (
        isinstance(stage, str)
        and len(stage) <= 32
        and isinstance(step, int)
        and (total is None or isinstance(total, int))
        and isinstance(metrics, dict)
        and len(metrics) <= 32
    ):
        return None
    clean = {
        str(k)[:64]: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    return {"stage": stage, "step": step, "total": total, "metrics": clean}


def _raise_error(event: Mapping[str, Any], child: ChildProcess) -> None:
    kind = event.get("kind")
    message = str(event.get("message") or "")[:4000]
    code = str(event.get("code") or "invalid-input")[:64]
    if kind == "input":
        operator = event.get("operator")
        raise ChildInputError(
            message, code=code, operator=operator if isinstance(operator, str) else None
        )
    if kind == "resource":
        raise ResourceLimitError(f"{message} (memory bound {child_limits(child)})", bound="memory")
    detail = (
        f"{event.get('class', 'error')}: {message}" if message else str(event.get("class", "error"))
    )
    where = event.get("where")
    raise ChildFailed(f"the contained run failed: {detail}" + (f" at {where}" if where else ""))


def _raise_if_out_of_bounds(child: ChildProcess) -> None:
    """A child the kernel stopped for passing its CPU or file-size bound."""
    if child.proc.returncode == -signal.SIGXCPU:
        raise ResourceLimitError(
            "the model's work used up its CPU-time bound and was stopped", bound="cpu"
        )
    if child.proc.returncode == -signal.SIGXFSZ:
        raise ResourceLimitError(
            "the model's work wrote a file larger than its bound and was stopped", bound="file"
        )


def child_limits(child: ChildProcess) -> str:
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
    child = pool.acquire(limits.threads) if pool is not None else ChildProcess(limits.threads)
    child.limit_text = f"{limits.memory_bytes / GIB:.1f} GiB"  # type: ignore[attr-defined]
    deadline = started + limits.wall_seconds
    confinement: dict[str, Any] = {}
    peak = 0
    try:
        child.send_request(
            {
                "task": task,
                "args": dict(args),
                "scratch": str(scratch),
                "bounds": limits.bounds(),
                "threads": limits.threads,
                "devices": list(devices),
            }
        )
        while True:
            try:
                event = child.events.get(timeout=POLL_S)
            except queue.Empty:
                event = {"event": "tick"}
            if event is None:
                with contextlib.suppress(subprocess.TimeoutExpired):  # killed below
                    child.proc.wait(timeout=5)
                _raise_if_out_of_bounds(child)
                raise ChildFailed(
                    f"the contained child ended without an answer ({child.describe_exit()}); "
                    f"its last output: {' | '.join(list(child.output)[-5:]) or 'nothing'}"
                )
            kind = event["event"]
            if kind == "progress" and reporter is not None:
                fields = _progress_fields(event)
                if fields is not None:
                    reporter.update(**fields)
            elif kind == "confined":
                info = event.get("confinement")
                confinement = info if isinstance(info, dict) else {}
                if confinement.get("missing"):
                    log.warning(
                        "sandbox: not enforced on this host: %s",
                        "; ".join(map(str, confinement["missing"])),
                    )
            elif kind == "done":
                result = event.get("result")
                if not isinstance(result, dict):
                    raise ChildFailed(
                        "the contained child answered with something that is not an object"
                    )
                return ContainedResult(
                    result=result,
                    confinement=confinement,
                    peak_rss_bytes=peak,
                    seconds=time.monotonic() - started,
                )
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
                    f"the model used more than {limits.memory_bytes / GIB:.1f} GiB of memory "
                    "and was stopped",
                    bound="memory",
                )
            if time.monotonic() > deadline:
                raise ResourceLimitError(
                    f"the model's work did not finish within {limits.wall_seconds:g} s "
                    "and was stopped",
                    bound="time",
                )
            if child.proc.poll() is not None and child.proc.returncode < 0 and child.events.empty():
                _raise_if_out_of_bounds(child)
                raise ChildFailed(f"the contained child was {child.describe_exit()}")
    finally:
        child.kill(limits.grace_seconds)
