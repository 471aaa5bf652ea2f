"""The parameters of a purification: names, types, defaults, bounds, which defenses
take them (:data:`PARAMS`), and the validated config built from them
(:class:`PurifyConfig`).

This table is the one place these facts live: :meth:`PurifyConfig.from_params` parses
with it, ``cleanroom purify`` takes one flag per entry, and the README's parameter
table is generated from it (``scripts/params_table.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from defense_core.defenses import DEFENSES
from defense_core.device import DeviceOptions
from defense_core.errors import InputError
from defense_core.screening.config import ScreeningConfig
from defense_core.transforms import AugmentConfig
from defense_core.tsbd.config import AFTConfig, ReinitConfig, UnlearnConfig

# The n values of neuron_ratio="sweep": the quality benchmark's grid (the paper's
# reference code sweeps 11 values from 0.01 to 0.9; pass a list for another grid).
SWEEP_RATIOS = (0.01, 0.05, 0.1, 0.2, 0.3)
MAX_SWEEP = 16
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**63 - 1

# ft_noise_blend of a TSBD job when not given. Not part of the paper's AFT (whose own
# config, AFTConfig, keeps 0): it removes blended triggers that TSBD as published leaves
# in place, for a little clean accuracy (bench/results/quality.md has the figures). The
# "ft" baseline stays vanilla fine-tuning (0).
DEFAULT_NOISE_BLEND = 0.5

TSBD_ONLY = frozenset({"tsbd"})


@dataclass(frozen=True)
class Param:
    """One user parameter. ``kind``: ``number`` / ``integer`` (in ``[lo, hi]``, ``(lo, hi]``
    with ``lo_open``), ``choice`` (one of ``choices``), or a kind parsed by
    :class:`PurifyConfig` itself (``neuron_ratio``, ``stop_acc``, ``augment``)."""

    name: str
    kind: str
    default: Any
    meaning: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] = ()
    defenses: frozenset[str] | None = None   # None: every defense takes it
    defense_defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def default_for(self, defense: str) -> Any:
        return self.defense_defaults.get(defense, self.default)

    def applies_to(self, defense: str) -> bool:
        return self.defenses is None or defense in self.defenses


AUGMENT_FIELDS = (
    Param("crop_padding", "integer", AugmentConfig.crop_padding,
          "random-crop padding in pixels (0: off)", lo=0, hi=64),
    Param("hflip", "bool", AugmentConfig.hflip, "random horizontal flips"),
)

PARAMS: tuple[Param, ...] = (
    Param("seed", "integer", 0, "seeds shuffling, augmentation and dropout", lo=0, hi=MAX_SEED),
    Param("batch_size", "integer", 256, "training batch size (both stages)", lo=1,
          hi=MAX_BATCH_SIZE),
    Param("unlearn_lr", "number", UnlearnConfig.lr,
          "clean-unlearning SGD learning rate (momentum 0.9)", lo=0.0, hi=1.0, lo_open=True,
          defenses=TSBD_ONLY),
    Param("unlearn_max_epochs", "integer", UnlearnConfig.max_epochs, "unlearning epoch cap",
          lo=1, hi=100_000, defenses=TSBD_ONLY),
    Param("unlearn_max_steps", "integer", UnlearnConfig.max_steps, "unlearning step cap",
          lo=1, hi=1_000_000, defenses=TSBD_ONLY),
    Param("stop_acc", "stop_acc", None,
          "tau: unlearning stops when accuracy on D <= tau; null: 1 / K", lo=0.0, hi=0.999,
          defenses=TSBD_ONLY),
    Param("neuron_ratio", "neuron_ratio", ReinitConfig.neuron_ratio,
          "n: share of conv neurons reinitialized, by NWC; \"auto\": chosen from the clean "
          "data; \"sweep\" or a list of 2-16 values: each n run through both stages, the best "
          "DER on the test and poisoned data kept", lo=0.0, hi=1.0, lo_open=True,
          defenses=TSBD_ONLY),
    Param("weight_ratio", "number", ReinitConfig.weight_ratio,
          "m: share of those neurons' weights zeroed", lo=0.0, hi=1.0, lo_open=True,
          defenses=TSBD_ONLY),
    Param("alpha", "number", AFTConfig.alpha, "AFT mix (1 - alpha) g1 + alpha g2 (ft: 0)",
          lo=0.0, hi=1.0, defenses=TSBD_ONLY),
    Param("rho", "number", AFTConfig.rho, "AFT perturbation radius r", lo=0.0, hi=10.0,
          lo_open=True, aliases=("r",)),
    Param("perturb_norm", "choice", AFTConfig.perturb_norm,
          "normalize the AFT perturbation per tensor or globally", choices=("tensor", "global")),
    Param("ft_epochs", "integer", AFTConfig.epochs, "fine-tuning epochs over D ...", lo=1,
          hi=10_000),
    Param("ft_min_steps", "integer", AFTConfig.min_steps,
          "... but at least this many optimizer steps", lo=0, hi=1_000_000),
    Param("ft_lr", "number", AFTConfig.lr, "fine-tuning SGD learning rate (momentum 0.9)",
          lo=0.0, hi=10.0, lo_open=True),
    Param("ft_noise_blend", "number", DEFAULT_NOISE_BLEND,
          "share of fine-tuning images blended with fresh uniform noise (weight 0.1-0.3), "
          "labels kept; BN statistics then re-estimated on D; 0: the paper's stage 2",
          lo=0.0, hi=1.0, defense_defaults={"ft": AFTConfig.noise_blend}),
    Param("augment", "augment", {f.name: f.default for f in AUGMENT_FIELDS},
          "train-time augmentation (both stages): {crop_padding, hflip}"),
)
PARAMS_BY_NAME = {p.name: p for p in PARAMS}
ALIASES = {alias: p.name for p in PARAMS for alias in p.aliases}
PARAM_NAMES = frozenset(PARAMS_BY_NAME) | frozenset(ALIASES)
TSBD_ONLY_PARAMS = frozenset(p.name for p in PARAMS if p.defenses == TSBD_ONLY)


def _number(params: Mapping[str, Any], name: str, spec: Param, default: Any) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"parameter {name!r} must be a number, got {value!r}")
    assert spec.lo is not None and spec.hi is not None
    if value < spec.lo or value > spec.hi or (spec.lo_open and value == spec.lo):
        bracket = "(" if spec.lo_open else "["
        raise InputError(f"parameter {name!r} must be in {bracket}{spec.lo}, {spec.hi}], "
                         f"got {value!r}")
    return float(value)


def _integer(params: Mapping[str, Any], name: str, spec: Param, default: Any) -> int:
    value = params.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"parameter {name!r} must be an integer, got {value!r}")
    if not spec.lo <= value <= spec.hi:  # type: ignore[operator]
        raise InputError(f"parameter {name!r} must be in [{spec.lo}, {spec.hi}], got {value!r}")
    return value


def _value(params: Mapping[str, Any], name: str, defense: str) -> Any:
    """The parsed value of a ``number``/``integer``/``choice`` parameter (its default if absent)."""
    spec = PARAMS_BY_NAME[name]
    default = spec.default_for(defense)
    if spec.kind == "number":
        return _number(params, name, spec, default)
    if spec.kind == "integer":
        return _integer(params, name, spec, default)
    value = params.get(name, default)
    if value not in spec.choices:
        shown = " or ".join(f'"{c}"' for c in spec.choices)
        raise InputError(f"parameter {name!r} must be {shown}, got {value!r}")
    return value


def _sweep_ratios(value: Any) -> tuple[float, ...]:
    """The n values of a sweep, ascending: ``"sweep"`` or a list of distinct values in (0, 1]."""
    if value == "sweep":
        return SWEEP_RATIOS
    if not 2 <= len(value) <= MAX_SWEEP:
        raise InputError(f"parameter 'neuron_ratio': a sweep takes 2 to {MAX_SWEEP} values, "
                         f"got {len(value)}")
    spec = PARAMS_BY_NAME["neuron_ratio"]
    ratios = tuple(_number({"neuron_ratio": v}, "neuron_ratio", spec, 0.0) for v in value)
    if len(set(ratios)) != len(ratios):
        raise InputError(f"parameter 'neuron_ratio': the sweep values repeat: {list(value)}")
    return tuple(sorted(ratios))  # smallest first, so a tie in DER keeps the smaller n


def _augment(value: Any) -> AugmentConfig:
    if value is None:
        return AugmentConfig()
    names = [f.name for f in AUGMENT_FIELDS]
    if not isinstance(value, Mapping):
        raise InputError(f"parameter 'augment' must be an object {{{', '.join(names)}}}")
    unknown = set(value) - set(names)
    if unknown:
        raise InputError(f"unknown augment fields: {sorted(unknown)}; known: {names}")
    crop_spec, _ = AUGMENT_FIELDS
    crop = _integer(value, "crop_padding", crop_spec, crop_spec.default)
    hflip = value.get("hflip", AugmentConfig.hflip)
    if not isinstance(hflip, bool):
        raise InputError(f"augment.hflip must be true or false, got {hflip!r}")
    return AugmentConfig(crop_padding=crop, hflip=hflip)


@dataclass(frozen=True)
class PurifyConfig:
    """Everything a run needs besides its inputs. Build it from user
    parameters with :meth:`from_params`; ``device`` is set by the caller
    (CLI flags, worker settings), never by user parameters."""

    defense: str = "tsbd"
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    reinit: ReinitConfig = field(default_factory=ReinitConfig)
    aft: AFTConfig = field(default_factory=AFTConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 256
    eval_batch_size: int = 512
    seed: int = 0
    device: DeviceOptions = field(default_factory=DeviceOptions)
    # n values to sweep (both stages per n, best DER kept); None: reinit.neuron_ratio alone
    sweep: tuple[float, ...] | None = None
    # the screening a purification runs (a TSBD one on its own stage-1 predictions);
    # None: no screening. Not a user parameter: jobs screen with the calibrated defaults.
    screening: ScreeningConfig | None = field(default_factory=ScreeningConfig)

    def __post_init__(self) -> None:
        if self.sweep is not None and (self.defense != "tsbd" or len(self.sweep) < 2):
            raise InputError("a neuron_ratio sweep needs the tsbd defense and at least two values")
        DEFENSES.get(self.defense)
        if self.defense == "ft" and self.aft.alpha != 0:
            raise InputError("the 'ft' defense is fine-tuning with alpha = 0; do not set alpha")
        sizes = (self.batch_size, self.eval_batch_size)
        if not all(1 <= size <= MAX_BATCH_SIZE for size in sizes):
            raise InputError(f"batch sizes must be in [1, {MAX_BATCH_SIZE}]")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, *,
                    defense: str = "tsbd") -> PurifyConfig:
        """Validate user parameters (:data:`PARAMS`); InputError on unknown names, wrong
        types or out-of-range values."""
        if params is not None and not isinstance(params, Mapping):
            raise InputError("params must be a JSON object")
        params = dict(params or {})
        unknown = set(params) - PARAM_NAMES
        if unknown:
            raise InputError(f"unknown parameters: {sorted(unknown)}; "
                             f"known: {sorted(PARAMS_BY_NAME)}")
        for alias, name in ALIASES.items():
            if alias in params and name in params:
                raise InputError(f"give {name!r} or its alias {alias!r}, not both")
            if alias in params:
                params[name] = params.pop(alias)
        DEFENSES.get(defense)
        ignored = sorted(p.name for p in PARAMS if p.name in params and not p.applies_to(defense))
        if ignored:
            raise InputError(f"parameters {ignored} do not apply to the {defense!r} defense")

        neuron_ratio: Any = params.get("neuron_ratio", ReinitConfig.neuron_ratio)
        sweep = None
        if neuron_ratio == "sweep" or isinstance(neuron_ratio, (list, tuple)):
            sweep, neuron_ratio = _sweep_ratios(neuron_ratio), ReinitConfig.neuron_ratio
        elif neuron_ratio != "auto":
            neuron_ratio = _number(params, "neuron_ratio", PARAMS_BY_NAME["neuron_ratio"],
                                   ReinitConfig.neuron_ratio)
        perturb_norm = _value(params, "perturb_norm", defense)
        stop_acc = params.get("stop_acc")
        if stop_acc is not None:
            stop_acc = _number(params, "stop_acc", PARAMS_BY_NAME["stop_acc"], 0.0)

        def value(name: str) -> Any:
            return _value(params, name, defense)

        try:
            return cls(
                defense=defense,
                unlearn=UnlearnConfig(lr=value("unlearn_lr"), stop_acc=stop_acc,
                                      max_epochs=value("unlearn_max_epochs"),
                                      max_steps=value("unlearn_max_steps")),
                reinit=ReinitConfig(neuron_ratio=neuron_ratio, weight_ratio=value("weight_ratio")),
                aft=AFTConfig(
                    alpha=value("alpha") if PARAMS_BY_NAME["alpha"].applies_to(defense) else 0.0,
                    rho=value("rho"), perturb_norm=perturb_norm, lr=value("ft_lr"),
                    epochs=value("ft_epochs"), min_steps=value("ft_min_steps"),
                    noise_blend=value("ft_noise_blend"),
                ),
                augment=_augment(params.get("augment")),
                batch_size=value("batch_size"),
                seed=value("seed"),
                sweep=sweep,
            )
        except ValueError as exc:  # a config's own validation
            if isinstance(exc, InputError):
                raise
            raise InputError(str(exc)) from exc

    def to_params(self) -> dict[str, Any]:
        """The flat parameters of this config (the inverse of :meth:`from_params`)."""
        params: dict[str, Any] = {
            "alpha": self.aft.alpha, "rho": self.aft.rho, "perturb_norm": self.aft.perturb_norm,
            "ft_epochs": self.aft.epochs, "ft_min_steps": self.aft.min_steps, "ft_lr": self.aft.lr,
            "ft_noise_blend": self.aft.noise_blend,
            "batch_size": self.batch_size, "seed": self.seed,
            "augment": {"crop_padding": self.augment.crop_padding, "hflip": self.augment.hflip},
        }
        if self.defense == "tsbd":
            params.update({
                "neuron_ratio": list(self.sweep) if self.sweep else self.reinit.neuron_ratio,
                "weight_ratio": self.reinit.weight_ratio,
                "unlearn_lr": self.unlearn.lr, "unlearn_max_epochs": self.unlearn.max_epochs,
                "unlearn_max_steps": self.unlearn.max_steps, "stop_acc": self.unlearn.stop_acc,
            })
        return dict(sorted(params.items()))
