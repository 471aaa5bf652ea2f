"""Job kinds: what a job asks the engine to do, one registry entry per kind.

A kind pairs a request type (the validated description of a job that every entry
point builds: the API at job creation, the worker, the contained child and
``cleanroom purify``) with the function that runs a loaded request: ``purify``
(:mod:`.purify`: screen, purify, evaluate), ``screen`` (:mod:`.screen`: the verdict
only) and ``intake`` (:mod:`.intake`: screen, then purify only a flagged model). A new
kind is a new module that calls :func:`register_job_kind`, not a branch anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from defense_core.registry import Registry


@dataclass(frozen=True)
class JobKind:
    """``request``: the request type (``from_dict``, ``validate``, ``load``); ``run``:
    ``run(loaded, *, out, metadata, reporter, cancel) -> document`` on what ``load``
    returned, writing the kind's outputs."""

    name: str
    request: type
    run: Callable[..., dict[str, Any]]


def _load_kinds() -> None:
    # The job kind modules register themselves on import.
    from defense_core.jobs import intake, purify, screen  # noqa: F401


JOB_KINDS: Registry[JobKind] = Registry("job kind", load=_load_kinds)


RunFn = Callable[..., dict[str, Any]]


def register_job_kind(name: str, *, request: type) -> Callable[[RunFn], RunFn]:
    """Decorator for the run function of the kind ``name`` whose requests are ``request``."""

    def deco(run: RunFn) -> RunFn:
        JOB_KINDS.add(name, JobKind(name=name, request=request, run=run))
        return run

    return deco


def get_job_kind(name: str) -> JobKind:
    return JOB_KINDS.get(name)


def available_job_kinds() -> list[str]:
    return JOB_KINDS.names()
