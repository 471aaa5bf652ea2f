"""Containment: engine work on untrusted models runs in a confined, killable child.

``run_contained(task, args, scratch=..., limits=Limits(...))`` runs one task
of :mod:`defense_core.sandbox.tasks` in a fresh interpreter that holds no
credentials, sees only its scratch directory (Landlock), runs under memory,
CPU and file-size bounds (rlimits, and a resident-memory watchdog), cannot
open sockets or start programs (seccomp), and is killed on cancel, timeout
or when its parent dies. See :mod:`defense_core.sandbox.confine` for what is
enforced on which kernels.
"""

from defense_core.sandbox.limits import (
    ChildFailed,
    ChildInputError,
    ContainedResult,
    Limits,
    ResourceLimitError,
    child_env,
)
from defense_core.sandbox.pool import ChildPool, shared_pool
from defense_core.sandbox.supervisor import run_contained

__all__ = [
    "ChildFailed",
    "ChildInputError",
    "ChildPool",
    "ContainedResult",
    "Limits",
    "ResourceLimitError",
    "child_env",
    "run_contained",
    "shared_pool",
]
