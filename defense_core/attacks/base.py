"""Trigger specs and the trigger registry.

A trigger family is a pure function over uint8 NCHW batches plus a frozen,
validated parameter dataclass. Families register themselves with
:func:`register_trigger`; :class:`TriggerSpec` is the validated JSON form
``{"type": ..., "target": ..., **params}`` that clients send.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from defense_core.errors import InputError
from defense_core.registry import Registry

MAX_TARGET = 100_000


class TriggerFn(Protocol):
    def __call__(self, x: torch.Tensor, params: Any, *, generator: torch.Generator | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class TriggerFamily:
    """One registered family: its parameter class, its function, how it poisons."""

    name: str
    params_cls: type
    apply: TriggerFn
    clean_label: bool = False  # poison only target-class training images, keep labels


def _load_families() -> None:
    # The family modules register themselves on import.
    import defense_core.attacks.families  # noqa: F401


TRIGGERS: Registry[TriggerFamily] = Registry("trigger type", load=_load_families)


def register_trigger(
    name: str, *, params: type, clean_label: bool = False
) -> Callable[[TriggerFn], TriggerFn]:
    """Register ``fn(x_uint8, params, *, generator) -> uint8`` as the family ``name``."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"trigger parameters of {name!r} must be a dataclass")

    def deco(fn: TriggerFn) -> TriggerFn:
        TRIGGERS.add(name, TriggerFamily(name=name, params_cls=params, apply=fn, clean_label=clean_label))
        return fn

    return deco


def available_triggers() -> list[str]:
    return TRIGGERS.names()


def get_trigger_family(name: str) -> TriggerFamily:
    return TRIGGERS.get(name)


@dataclass(frozen=True)
class TriggerSpec:
    """A validated trigger: family name, all-to-one target label, family parameters."""

    type: str
    target: int
    params: Any

    def __post_init__(self) -> None:
        family = get_trigger_family(self.type)
        if isinstance(self.target, bool) or not isinstance(self.target, int) or not 0 <= self.target < MAX_TARGET:
            raise InputError(f"trigger.target must be an integer label >= 0, got {self.target!r}")
        if not isinstance(self.params, family.params_cls):
            raise InputError(f"trigger params of {self.type!r} must be {family.params_cls.__name__}")

    @property
    def family(self) -> TriggerFamily:
        return get_trigger_family(self.type)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TriggerSpec:
        if not isinstance(data, Mapping):
            raise InputError("the trigger spec must be a JSON object")
        if "type" not in data or "target" not in data:
            raise InputError("the trigger spec needs 'type' and 'target'")
        kind = data["type"]
        if not isinstance(kind, str):
            raise InputError(f"trigger.type must be a string, got {kind!r}")
        family = get_trigger_family(kind)
        raw = {k: v for k, v in data.items() if k not in ("type", "target")}
        fields = {f.name: f for f in dataclasses.fields(family.params_cls)}
        unknown = set(raw) - set(fields)
        if unknown:
            raise InputError(
                f"unknown parameters for trigger {kind!r}: {sorted(unknown)}; known: {sorted(fields)}"
            )
        arrays = getattr(family.params_cls, "array_fields", frozenset())
        for key, value in raw.items():
            if key not in arrays:  # array parameters are checked by their dataclass
                _check_json_scalar(kind, key, value)
        try:
            params = family.params_cls(**raw)
        except InputError:
            raise
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid parameters for trigger {kind!r}: {exc}") from exc
        return cls(type=kind, target=data["target"], params=params)

    def to_dict(self) -> dict[str, Any]:
        arrays = getattr(self.family.params_cls, "array_fields", frozenset())
        params = {k: v for k, v in dataclasses.asdict(self.params).items() if not (k in arrays and v is None)}
        return {"type": self.type, "target": self.target, **params}


def _check_json_scalar(kind: str, key: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InputError(f"trigger {kind!r}: parameter {key!r} must be a number, got {value!r}")


def check_number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> None:
    """Raise :class:`InputError` unless ``lo <= value <= hi`` (and integral if asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {value!r}")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:  # also rejects NaN
        raise InputError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def check_batch(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise InputError(f"triggers apply to uint8 [N, C, H, W] batches, got {x.dtype} {tuple(x.shape)}")


def apply_trigger(
    x: torch.Tensor, trigger: TriggerSpec, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return a triggered copy of the uint8 batch ``x`` (the input is left untouched)."""
    check_batch(x)
    out = trigger.family.apply(x, trigger.params, generator=generator)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    return out
