"""The contained child's main: import the engine, take one request, confine, run, exit.

Started by :mod:`defense_core.sandbox.supervisor` as a fresh interpreter
(``python -I``) with a scrubbed environment. It imports torch first (so a
spare can wait, warm, for its request), then reads exactly one JSON request
line from stdin, confines itself to that request's scratch directory
(:mod:`defense_core.sandbox.confine`), runs the named task and writes its
events, one JSON object per line, to the event file descriptor. It never
outlives one request.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_REQUEST_BYTES = 1 << 20


class _Events:
    """Writes the child's events to the supervisor; nothing else goes there."""

    def __init__(self, fd: int) -> None:
        self._fh = os.fdopen(fd, "w", buffering=1, encoding="utf-8", closefd=True)

    def send(self, event: str, **fields: Any) -> None:
        self._fh.write(json.dumps({"event": event, **fields}, allow_nan=False, default=str) + "\n")
        self._fh.flush()

    # defense_core.progress.Reporter
    def update(self, *, stage: str, step: int, total: int | None,
               metrics: Mapping[str, float] | None = None) -> None:
        clean = {k: float(v) for k, v in (metrics or {}).items() if v == v and abs(float(v)) != float("inf")}
        self.send("progress", stage=stage, step=int(step), total=None if total is None else int(total),
                  metrics=clean)


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
_MODEL_CODE_FAILED = "The following operation failed in the TorchScript interpreter"
_OUT_OF_MEMORY = ("can't allocate memory", "DefaultCPUAllocator", "out of memory")


def tidy_message(text: str) -> str:
    """One line for a person: a TorchScript traceback becomes its first and last lines,
    memory addresses are dropped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    message = lines[0]
    if len(lines) > 1 and lines[-1] != lines[0]:
        message = f"{lines[0]} ... {lines[-1]}"
    return _ADDRESS.sub("<address>", message)[:2000]


def _out_of_memory(exc: BaseException) -> bool:
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, MemoryError) or any(m in str(current) for m in _OUT_OF_MEMORY):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _error_fields(exc: BaseException) -> dict[str, Any]:
    from defense_core.errors import InputError

    if _out_of_memory(exc):
        return {"kind": "resource", "code": "memory-limit",
                "message": "the model needed more memory than its bound"}
    if isinstance(exc, RuntimeError) and str(exc).startswith(_MODEL_CODE_FAILED):
        # raised by the model's own code (TorchScript): the input's doing, not the engine's
        return {
            "kind": "input",
            "code": "model-failed",
            "message": "the model's code failed: " + tidy_message(str(exc)),
        }
    if isinstance(exc, InputError):
        fields: dict[str, Any] = {"kind": "input", "code": exc.code, "message": tidy_message(str(exc))}
        operator = getattr(exc, "operator", None)
        if isinstance(operator, str):
            fields["operator"] = operator
        return fields
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames)
    return {
        "kind": "internal",
        "code": "internal",
        "class": type(exc).__name__,
        "message": tidy_message(str(exc))[:500],
        "where": where,
    }


def main() -> None:
    event_fd = int(sys.argv[1])
    parent_pid = int(sys.argv[2])

    from defense_core.sandbox import confine

    confine.die_with_parent(parent_pid)
    events = _Events(event_fd)
    # Everything a task may import, imported before the request arrives (a warm spare).
    import torch  # noqa: F401

    from defense_core.sandbox import tasks

    tasks.warm_up()
    confine.preload_seccomp()
    events.send("ready")
    line = sys.stdin.buffer.readline(MAX_REQUEST_BYTES + 1)
    if not line:
        return  # the supervisor shut the spare down
    request = json.loads(line)
    scratch = Path(request["scratch"])
    report = confine.Confinement()
    try:
        bounds = confine.Bounds(**request["bounds"])
        confine.set_rlimits(bounds, report)
        devices = [Path(p) for p in request.get("devices", [])]
        confine.apply_landlock(
            read_only=confine.library_paths(), read_write=[scratch, Path("/dev/null")], devices=devices, report=report
        )
        confine.apply_seccomp(report)
    except Exception as exc:
        events.send(
            "error",
            kind="internal",
            code="containment",
            message=f"the sandbox could not be set up: {type(exc).__name__}: {exc}",
        )
        return
    os.chdir(scratch)
    os.environ["TMPDIR"] = str(scratch / "tmp")
    events.send("confined", confinement=report.to_dict())
    try:
        result = tasks.run(
            request["task"],
            request.get("args", {}),
            scratch=scratch,
            reporter=events,
            threads=int(request.get("threads", 1)),
        )
    except BaseException as exc:  # everything goes back as an event; the exit code is 0
        events.send("error", **_error_fields(exc))
        return
    events.send("done", result=result)


if __name__ == "__main__":
    main()
