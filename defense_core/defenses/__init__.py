"""The defense registry: ``tsbd`` (:mod:`.tsbd`) and the ``ft`` baseline (:mod:`.ft`).

A defense is ``fn(run: DefenseRun) -> PurificationResult`` registered under its name
with :func:`register_defense` in its own module; :func:`defense_core.pipeline.purify`
looks it up by ``PurifyConfig.defense``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from defense_core.registry import Registry

if TYPE_CHECKING:
    from defense_core.defenses.run import DefenseRun
    from defense_core.result import PurificationResult

DefenseFn = Callable[["DefenseRun"], "PurificationResult"]


def _load_defenses() -> None:
    # The defense modules register themselves on import.
    from defense_core.defenses import ft, tsbd  # noqa: F401


DEFENSES: Registry[DefenseFn] = Registry("defense", load=_load_defenses)


def register_defense(name: str) -> Callable[[DefenseFn], DefenseFn]:
    return DEFENSES.register(name)


def available_defenses() -> list[str]:
    return DEFENSES.names()


def get_defense(name: str) -> DefenseFn:
    return DEFENSES.get(name)
