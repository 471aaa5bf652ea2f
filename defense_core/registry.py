"""Name registries (timm-style): architectures, trigger families, defenses, job kinds.

:class:`Registry` is the one helper behind every ``register_*`` decorator: entries
register themselves when their module is imported, a lookup of an unknown name
raises with the list of known ones, and a registry whose entries live in modules of
their own imports them (``load``) before the first lookup.

The architecture registry is defined here too: ``register_model``/``create_model``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from torch import nn

from defense_core.errors import InputError, UnknownArchitectureError
from defense_core.spec import ModelSpec

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by snake_case name.

    ``what`` names the kind in messages (``"unknown {what} 'x'; known: a, b"``);
    ``error`` is raised for an unknown name; ``load`` imports the modules that
    register the entries (called once, before the first lookup).
    """

    def __init__(self, what: str, *, error: type[Exception] = InputError,
                 load: Callable[[], None] | None = None) -> None:
        self.what = what
        self.error = error
        self._load = load
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def deco(entry: T) -> T:
            return self.add(name, entry)

        return deco

    def _loaded(self) -> dict[str, T]:
        if self._load is not None:
            load, self._load = self._load, None
            load()
        return self._entries

    def get(self, name: str) -> T:
        entries = self._loaded()
        try:
            return entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from JSON
            known = ", ".join(self.names())
            raise self.error(f"unknown {self.what} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._loaded()
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# --------------------------------------------------------------------------- architectures

ModelFactory = Callable[[ModelSpec], nn.Module]


def _load_models() -> None:
    # The architecture modules register themselves on import.
    import defense_core.models  # noqa: F401


MODELS: Registry[ModelFactory] = Registry("architecture", error=UnknownArchitectureError,
                                          load=_load_models)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``fn(spec) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def available_models() -> list[str]:
    return MODELS.names()


def create_model(spec: ModelSpec) -> nn.Module:
    """Build an untrained model for ``spec``; unknown names raise with the known list."""
    return MODELS.get(spec.arch)(spec)
