"""The work a contained child can be asked to do, by name.

Each task takes plain JSON arguments whose file names are relative to the
scratch directory (the only place the child can read or write), and returns a
JSON-able dict. ``inspect_model`` validates an upload; each job kind
(:mod:`defense_core.jobs`) is a task of its name: ``purify`` loads a job's inputs,
runs the defense and writes the purified model; ``screen`` returns a ScreeningReport;
``intake`` screens and purifies only a flagged model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from defense_core.progress import Reporter
from defense_core.registry import Registry

TaskFn = Callable[[Mapping[str, Any], Path, Reporter], dict[str, Any]]


def _register_job_kinds() -> None:
    # Every job kind is also a contained task of the same name (see run_job).
    from defense_core.jobs import available_job_kinds

    for kind in available_job_kinds():
        TASKS.add(kind, functools.partial(run_job, kind))


TASKS: Registry[TaskFn] = Registry("contained task", error=ValueError, load=_register_job_kinds)


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    return TASKS.register(name)


def available_tasks() -> list[str]:
    return TASKS.names()


def warm_up() -> None:
    """Import what the tasks use, so a spare child is ready when its request comes."""
    from PIL import JpegImagePlugin, PngImagePlugin  # noqa: F401

    import defense_core.attacks
    import defense_core.data
    import defense_core.jobs
    import defense_core.loading
    import defense_core.screening

    defense_core.jobs.available_job_kinds()  # imports every kind


def run(name: str, args: Mapping[str, Any], *, scratch: Path, reporter: Reporter, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, threads))
    return TASKS.get(name)(args, scratch, reporter)


def run_job(kind_name: str, args: Mapping[str, Any], scratch: Path,
            reporter: Reporter) -> dict[str, Any]:
    """Run a job of the kind ``kind_name``: ``args`` is its request's JSON form plus
    ``device`` (the caller's DeviceOptions fields), ``out`` (where a kind that writes a
    model writes it; a ``screen`` writes nothing) and ``metadata``; file names are inside
    the scratch directory."""
    from defense_core.device import DeviceOptions
    from defense_core.jobs import get_job_kind

    kind = get_job_kind(kind_name)
    request = kind.request.from_dict(args)
    device = dict(args.get("device") or {})
    if device.get("mode_cache") is not None:
        device["mode_cache"] = str(_inside(scratch, device["mode_cache"]))
    loaded = request.load(resolve=lambda name: _inside(scratch, name), device=DeviceOptions(**device))
    return kind.run(loaded, out=_inside(scratch, args.get("out")), metadata=args.get("metadata"),
                    reporter=reporter)


def _inside(scratch: Path, name: str | None) -> Path | None:
    """A path argument, which must name something inside the scratch directory."""
    if name is None:
        return None
    path = (scratch / name).resolve()
    if scratch.resolve() not in path.parents:
        raise ValueError(f"path argument {name!r} leaves the scratch directory")
    return path


@register_task("inspect_model")
def _inspect_model(args: Mapping[str, Any], scratch: Path, reporter: Reporter) -> dict[str, Any]:
    from defense_core.loading import inspect_model_file
    from defense_core.spec import ModelSpec

    spec = ModelSpec.from_dict(args["spec"])
    path = _inside(scratch, args["model"])
    assert path is not None
    if args.get("operator_check", True) is False:
        return _run_unchecked_torchscript(path, spec)
    return inspect_model_file(path, spec, max_bytes=int(args["max_bytes"])).to_dict()


def _run_unchecked_torchscript(path: Path, spec: Any) -> dict[str, Any]:
    """Load a TorchScript archive WITHOUT the operator checks and run it once.

    Only for the containment tests, which must show what the sandbox alone stops
    when a hostile archive gets past the checks; nothing in the service sends
    ``operator_check: false``.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path))
        out = module(torch.rand(1, spec.in_channels, *spec.input_size))
    state = {k: v.tolist() for k, v in module.state_dict().items() if v.dtype == torch.uint8}
    return {"shape": list(out.shape), "uint8_buffers": state}


@register_task("probe")
def _probe(args: Mapping[str, Any], scratch: Path, reporter: Reporter) -> dict[str, Any]:
    """Try what untrusted code might try, and say what the sandbox let through.

    ``read`` / ``write``: paths; ``connect``: ``[host, port]`` pairs; ``exec``:
    an argv; ``env``: report the environment's names; ``allocate_bytes``: one
    allocation; ``hang`` (with ``ignore_sigterm``): never return. Used by
    ``cleanroom admin sandbox-check`` and the containment tests.
    """
    import signal
    import socket
    import subprocess
    import time

    def attempt(fn: Callable[[], object]) -> str:
        try:
            fn()
        except OSError as exc:
            return f"denied ({errno_name(exc.errno)})"
        except MemoryError:
            return "denied (MemoryError)"
        return "ok"

    def read(path: str) -> None:
        with open(path, "rb") as fh:
            fh.read(16)

    def write(path: str) -> None:
        with open(path, "ab") as fh:
            fh.write(b"probe\n")

    def connect(host: str, port: int) -> None:
        with socket.create_connection((host, port), timeout=2):
            pass

    out: dict[str, Any] = {
        "read": {p: attempt(lambda p=p: read(p)) for p in args.get("read", [])},
        "write": {p: attempt(lambda p=p: write(p)) for p in args.get("write", [])},
        "connect": {f"{h}:{port}": attempt(lambda h=h, port=port: connect(h, int(port)))
                    for h, port in args.get("connect", [])},
    }
    if args.get("exec"):
        out["exec"] = attempt(lambda: subprocess.run(list(args["exec"]), check=False, timeout=5))
    if args.get("env"):
        import os

        out["env"] = sorted(os.environ)
    if args.get("allocate_bytes"):
        out["allocate"] = attempt(lambda: bytearray(int(args["allocate_bytes"])))
    if args.get("hang"):
        if args.get("ignore_sigterm"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reporter.update(stage="hanging", step=0, total=None)
        while True:
            time.sleep(0.05)
    return out


def errno_name(number: int | None) -> str:
    import errno

    return errno.errorcode.get(number or 0, str(number))
