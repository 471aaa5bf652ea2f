"""The purification pipeline: evaluate, stage 1, evaluate, stage 2, evaluate.

``purify`` is the one entry point the CLI and the worker call. Defenses are
looked up by name in a small registry (``tsbd``, and the ``ft`` baseline).

User parameters (``PurifyConfig.from_params``; all optional, flat):

==================== ======================= ==========================================
name                 default                 meaning
==================== ======================= ==========================================
neuron_ratio         0.05                    n: share of conv neurons reinitialized, by NWC;
                                             ``"auto"``: chosen from clean data (tsbd.choose_n);
                                             ``"sweep"`` or a list of n: the paper's sweep, each
                                             n run through both stages and the one with the
                                             best DER on the test and poisoned data kept
                                             (needs both; ``"sweep"`` = SWEEP_RATIOS)
weight_ratio         0.7                     m: share of those neurons' weights zeroed
alpha                0.7 (ft: 0)             AFT mix ``(1 - alpha) g1 + alpha g2``
rho (alias r)        0.05                    AFT perturbation radius
perturb_norm         "tensor"                normalize g1 per tensor or "global"
ft_epochs            20                      fine-tuning epochs over D ...
ft_min_steps         200                     ... but at least this many optimizer steps
ft_lr                0.01                    fine-tuning SGD learning rate (momentum 0.9)
ft_noise_blend       0.5 (ft: 0)             share of fine-tuning images blended with fresh
                                             uniform noise (weight 0.1-0.3), labels kept;
                                             BN statistics then re-estimated on D; 0 gives
                                             the paper's stage 2 exactly (DEFAULT_NOISE_BLEND)
unlearn_lr           1e-4                    clean-unlearning SGD learning rate (momentum 0.9)
unlearn_max_epochs   1000                    unlearning epoch cap
unlearn_max_steps    10000                   unlearning step cap
stop_acc             null (= 1 / K)          tau: unlearning stops when accuracy on D <= tau
batch_size           256                     training batch size (both stages)
seed                 0                       seeds shuffling, augmentation and dropout
augment              {"crop_padding": 4,     train-time augmentation (both stages)
                      "hflip": false}
==================== ======================= ==========================================
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from defense_core.device import DeviceOptions, DeviceRuntime, make_runtime
from defense_core.errors import DatasetError, InputError
from defense_core.imageset import ImageSet
from defense_core.metrics import StageMetrics, der, evaluate, fidelity
from defense_core.progress import CancelHook, NullReporter, Reporter, check_cancel
from defense_core.spec import ModelSpec
from defense_core.transforms import AugmentConfig
from defense_core.tsbd.aft import FinetuneResult, finetune_
from defense_core.tsbd.choose_n import choose_neuron_ratio
from defense_core.tsbd.config import AFTConfig, ReinitConfig, UnlearnConfig
from defense_core.tsbd.nwc import NeuronRanking, NeuronScore, rank_neurons
from defense_core.tsbd.reinit import ReinitResult, zero_reinit_
from defense_core.tsbd.unlearning import UnlearnResult, unlearn_

log = logging.getLogger(__name__)

TOP_NEURONS = 50
# The n values of neuron_ratio="sweep": the quality benchmark's grid (the paper's
# reference code sweeps 11 values from 0.01 to 0.9; pass a list for another grid).
SWEEP_RATIOS = (0.01, 0.05, 0.1, 0.2, 0.3)
MAX_SWEEP = 16
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------- config


def _number(params: Mapping[str, Any], name: str, default: float, lo: float, hi: float,
            *, lo_open: bool = False) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"parameter {name!r} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise InputError(f"parameter {name!r} must be in {bracket}{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(params: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = params.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"parameter {name!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"parameter {name!r} must be in [{lo}, {hi}], got {value!r}")
    return value


def _sweep_ratios(value: Any) -> tuple[float, ...]:
    """The n values of a sweep, ascending: ``"sweep"`` or a list of distinct values in (0, 1]."""
    if value == "sweep":
        return SWEEP_RATIOS
    if not 2 <= len(value) <= MAX_SWEEP:
        raise InputError(f"parameter 'neuron_ratio': a sweep takes 2 to {MAX_SWEEP} values, got {len(value)}")
    ratios = tuple(_number({"neuron_ratio": v}, "neuron_ratio", 0.0, 0.0, 1.0, lo_open=True) for v in value)
    if len(set(ratios)) != len(ratios):
        raise InputError(f"parameter 'neuron_ratio': the sweep values repeat: {list(value)}")
    return tuple(sorted(ratios))  # smallest first, so a tie in DER keeps the smaller n


def _augment(value: Any) -> AugmentConfig:
    if value is None:
        return AugmentConfig()
    if not isinstance(value, Mapping):
        raise InputError("parameter 'augment' must be an object {crop_padding, hflip}")
    unknown = set(value) - {"crop_padding", "hflip"}
    if unknown:
        raise InputError(f"unknown augment fields: {sorted(unknown)}; known: ['crop_padding', 'hflip']")
    crop = _integer(value, "crop_padding", AugmentConfig.crop_padding, 0, 64)
    hflip = value.get("hflip", AugmentConfig.hflip)
    if not isinstance(hflip, bool):
        raise InputError(f"augment.hflip must be true or false, got {hflip!r}")
    return AugmentConfig(crop_padding=crop, hflip=hflip)


# ft_noise_blend of a TSBD job when not given. Not part of the paper's AFT (whose
# own config, AFTConfig, keeps 0): on the MNIST benchmark (bench/results/quality.md)
# it takes PreAct-ResNet18's Blended ASR after TSBD from 95.1% to 0.4% and the mean
# over BadNets/Blended/WaNet/SIG to 1.3%, for 1.0 point of CA on the clean control.
# The "ft" baseline stays vanilla fine-tuning (0).
DEFAULT_NOISE_BLEND = 0.5

PARAM_NAMES = frozenset({
    "neuron_ratio", "weight_ratio", "alpha", "rho", "r", "perturb_norm", "ft_epochs", "ft_min_steps",
    "ft_lr", "ft_noise_blend", "unlearn_lr", "unlearn_max_epochs", "unlearn_max_steps", "stop_acc",
    "batch_size", "seed", "augment",
})
# Parameters of stage 1 and of the AFT penalty: an error with the "ft" defense.
TSBD_ONLY_PARAMS = frozenset({
    "neuron_ratio", "weight_ratio", "unlearn_lr", "unlearn_max_epochs", "unlearn_max_steps", "stop_acc", "alpha",
})


@dataclass(frozen=True)
class PurifyConfig:
    """Everything a run needs besides its inputs. Build it from user
    parameters with :meth:`from_params`; ``device`` is set by the caller
    (CLI flags, worker settings), never by user parameters."""

    defense: str = "tsbd"
    unlearn: UnlearnConfig = UnlearnConfig()
    reinit: ReinitConfig = ReinitConfig()
    aft: AFTConfig = AFTConfig()
    augment: AugmentConfig = AugmentConfig()
    batch_size: int = 256
    eval_batch_size: int = 512
    seed: int = 0
    device: DeviceOptions = DeviceOptions()
    # n values to sweep (both stages per n, best DER kept); None: reinit.neuron_ratio alone
    sweep: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.sweep is not None and (self.defense != "tsbd" or len(self.sweep) < 2):
            raise InputError("a neuron_ratio sweep needs the tsbd defense and at least two values")
        if self.defense not in _DEFENSES:
            raise InputError(f"unknown defense {self.defense!r}; known: {', '.join(available_defenses())}")
        if self.defense == "ft" and self.aft.alpha != 0:
            raise InputError("the 'ft' defense is fine-tuning with alpha = 0; do not set alpha")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE or not 1 <= self.eval_batch_size <= MAX_BATCH_SIZE:
            raise InputError(f"batch sizes must be in [1, {MAX_BATCH_SIZE}]")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, *, defense: str = "tsbd") -> "PurifyConfig":
        """Validate user parameters (table in the module docstring); InputError on
        unknown names, wrong types or out-of-range values."""
        if params is not None and not isinstance(params, Mapping):
            raise InputError("params must be a JSON object")
        params = dict(params or {})
        unknown = set(params) - PARAM_NAMES
        if unknown:
            raise InputError(f"unknown parameters: {sorted(unknown)}; known: {sorted(PARAM_NAMES - {'r'})}")
        if "rho" in params and "r" in params:
            raise InputError("give 'rho' or its alias 'r', not both")
        if "r" in params:
            params["rho"] = params.pop("r")
        if defense not in _DEFENSES:
            raise InputError(f"unknown defense {defense!r}; known: {', '.join(available_defenses())}")
        if defense == "ft":
            ignored = sorted(TSBD_ONLY_PARAMS & set(params))
            if ignored:
                raise InputError(f"parameters {ignored} do not apply to the 'ft' defense")

        neuron_ratio: Any = params.get("neuron_ratio", ReinitConfig.neuron_ratio)
        sweep = None
        if neuron_ratio == "sweep" or isinstance(neuron_ratio, (list, tuple)):
            sweep, neuron_ratio = _sweep_ratios(neuron_ratio), ReinitConfig.neuron_ratio
        elif neuron_ratio != "auto":
            neuron_ratio = _number(params, "neuron_ratio", ReinitConfig.neuron_ratio, 0.0, 1.0, lo_open=True)
        perturb_norm = params.get("perturb_norm", AFTConfig.perturb_norm)
        if perturb_norm not in ("tensor", "global"):
            raise InputError(f"parameter 'perturb_norm' must be \"tensor\" or \"global\", got {perturb_norm!r}")
        stop_acc = params.get("stop_acc")
        if stop_acc is not None:
            stop_acc = _number(params, "stop_acc", 0.0, 0.0, 0.999)
        try:
            return cls(
                defense=defense,
                unlearn=UnlearnConfig(
                    lr=_number(params, "unlearn_lr", UnlearnConfig.lr, 0.0, 1.0, lo_open=True),
                    stop_acc=stop_acc,
                    max_epochs=_integer(params, "unlearn_max_epochs", UnlearnConfig.max_epochs, 1, 100_000),
                    max_steps=_integer(params, "unlearn_max_steps", UnlearnConfig.max_steps, 1, 1_000_000),
                ),
                reinit=ReinitConfig(
                    neuron_ratio=neuron_ratio,
                    weight_ratio=_number(params, "weight_ratio", ReinitConfig.weight_ratio, 0.0, 1.0, lo_open=True),
                ),
                aft=AFTConfig(
                    alpha=0.0 if defense == "ft" else _number(params, "alpha", AFTConfig.alpha, 0.0, 1.0),
                    rho=_number(params, "rho", AFTConfig.rho, 0.0, 10.0, lo_open=True),
                    perturb_norm=perturb_norm,
                    lr=_number(params, "ft_lr", AFTConfig.lr, 0.0, 10.0, lo_open=True),
                    epochs=_integer(params, "ft_epochs", AFTConfig.epochs, 1, 10_000),
                    min_steps=_integer(params, "ft_min_steps", AFTConfig.min_steps, 0, 1_000_000),
                    noise_blend=_number(params, "ft_noise_blend", AFTConfig.noise_blend if defense == "ft"
                                        else DEFAULT_NOISE_BLEND, 0.0, 1.0),
                ),
                augment=_augment(params.get("augment")),
                batch_size=_integer(params, "batch_size", 256, 1, MAX_BATCH_SIZE),
                seed=_integer(params, "seed", 0, 0, MAX_SEED),
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


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class PurificationResult:
    defense: str
    before: StageMetrics
    after_stage1: StageMetrics
    after: StageMetrics
    timings_s: dict[str, float]
    unlearning: UnlearnResult | None
    reinit: ReinitResult | None
    top_neurons: tuple[NeuronScore, ...]
    finetune: FinetuneResult
    params: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    sweep: tuple["SweepPoint", ...] = ()  # one per n when neuron_ratio was swept

    @property
    def der(self) -> float | None:
        return der(self.before, self.after)

    @property
    def fidelity(self) -> float | None:
        return fidelity(self.before, self.after)

    def to_document(self, model_sha256: str) -> dict[str, Any]:
        """The Result document of the API and of ``cleanroom purify --json``."""
        unlearning = (
            self.unlearning.to_dict() if self.unlearning is not None
            else {"epochs": 0, "steps": 0, "final_clean_acc": 0.0}
        )
        reinit: dict[str, Any] = (
            self.reinit.to_dict() if self.reinit is not None
            else {"neuron_ratio": 0.0, "weight_ratio": 0.0, "neurons_zeroed": 0, "weights_zeroed": 0}
        )
        if self.sweep:
            reinit["sweep"] = [p.to_dict() for p in self.sweep]
        return {
            "metrics": {
                "before": self.before.to_dict(),
                "after_stage1": self.after_stage1.to_dict(),
                "after": self.after.to_dict(),
            },
            "der": self.der,
            "fidelity": self.fidelity,
            "timings_s": dict(self.timings_s),
            "unlearning": unlearning,
            "reinit": reinit,
            "top_neurons": [n.to_dict() for n in self.top_neurons],
            "params": dict(self.params),
            "model_sha256": model_sha256,
        }


@dataclass(frozen=True)
class SweepPoint:
    """One n of a sweep: the metrics after stage 1 and at the end, and the DER it scored."""

    neuron_ratio: float
    after_stage1: StageMetrics
    after: StageMetrics
    der: float | None
    chosen: bool

    def to_dict(self) -> dict[str, Any]:
        return {"neuron_ratio": self.neuron_ratio, "after_stage1": self.after_stage1.to_dict(),
                "after": self.after.to_dict(), "der": self.der, "chosen": self.chosen}


# --------------------------------------------------------------------------- registry

DefenseFn = Callable[["_Run"], PurificationResult]
_DEFENSES: dict[str, DefenseFn] = {}


def register_defense(name: str) -> Callable[[DefenseFn], DefenseFn]:
    def deco(fn: DefenseFn) -> DefenseFn:
        if name in _DEFENSES:
            raise ValueError(f"defense {name!r} is registered twice")
        _DEFENSES[name] = fn
        return fn

    return deco


def available_defenses() -> list[str]:
    return sorted(_DEFENSES)


# --------------------------------------------------------------------------- run


@dataclass
class _Run:
    """The state one ``purify`` call threads through its stages."""

    model: nn.Module          # the working copy: theta0, then purified in place
    spec: ModelSpec
    clean: ImageSet
    test: ImageSet | None
    poisoned: ImageSet | None
    config: PurifyConfig
    runtime: DeviceRuntime
    reporter: Reporter
    cancel: CancelHook | None
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("unlearning", "ranking", "reinitializing", "finetuning", "evaluating"), 0.0))

    def measure(self, *, stage: str, step: int, total: int) -> StageMetrics:
        check_cancel(self.cancel)
        started = time.monotonic()
        metrics = StageMetrics()
        if self.test is not None or self.poisoned is not None:
            metrics = evaluate(self.model, self.spec, test=self.test, poisoned=self.poisoned,
                               batch_size=self.config.eval_batch_size, runtime=self.runtime.for_evaluation())
        self.timings["evaluating"] += time.monotonic() - started
        shown = {k: v for k, v in metrics.to_dict().items() if v is not None}
        self.reporter.update(stage=stage, step=step, total=total, metrics=shown)
        return metrics

    def generator(self, offset: int) -> torch.Generator:
        # One stream per stage, so a change in one stage's length leaves the others alone.
        return torch.Generator().manual_seed((self.config.seed + offset) % MAX_SEED)

    def finetune(self, aft: AFTConfig) -> FinetuneResult:
        started = time.monotonic()
        result = finetune_(
            self.model, self.clean, spec=self.spec, config=aft, augment=self.config.augment,
            batch_size=self.config.batch_size, generator=self.generator(1), runtime=self.runtime,
            reporter=self.reporter, cancel=self.cancel,
        )
        self.timings["finetuning"] += time.monotonic() - started
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}


def copy_model(model: nn.Module) -> nn.Module:
    """An independent copy with leaf parameters. ``copy.deepcopy`` of a TorchScript
    module gives non-leaf parameters an optimizer refuses, so those go through
    an in-memory ``torch.jit.save``/``load`` round trip instead."""
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
        clone = torch.jit.load(buffer, map_location=device)
        clone.train(model.training)
        return clone
    return copy.deepcopy(model)


@register_defense("tsbd")
def _tsbd(run: _Run) -> PurificationResult:
    cfg = run.config
    before = run.measure(stage="loading", step=2, total=2)

    started = time.monotonic()
    unlearned = copy_model(run.model)
    unlearning = unlearn_(
        unlearned, run.clean, spec=run.spec, config=cfg.unlearn, augment=cfg.augment,
        batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, generator=run.generator(0),
        runtime=run.runtime, reporter=run.reporter, cancel=run.cancel,
    )
    run.timings["unlearning"] = time.monotonic() - started

    check_cancel(run.cancel)
    started = time.monotonic()
    run.reporter.update(stage="ranking", step=0, total=1)
    ranking = rank_neurons(run.model, unlearned)
    del unlearned
    run.reporter.update(stage="ranking", step=1, total=1, metrics={"neurons": float(len(ranking))})
    run.timings["ranking"] = time.monotonic() - started

    check_cancel(run.cancel)
    params = cfg.to_params()
    params["stop_acc"] = unlearning.threshold
    common = dict(defense="tsbd", before=before, unlearning=unlearning,
                  top_neurons=tuple(ranking.top(TOP_NEURONS)), params=params)
    if cfg.sweep:
        return _sweep_n(run, ranking, before, common)
    reinit_config = cfg.reinit
    if reinit_config.neuron_ratio == "auto":
        # The clean-data rule: smallest n whose reset halves the accuracy on D above chance.
        started = time.monotonic()
        chosen = choose_neuron_ratio(run.model, ranking, run.clean, spec=run.spec,
                                     weight_ratio=reinit_config.weight_ratio, batch_size=cfg.eval_batch_size)
        run.timings["reinitializing"] += time.monotonic() - started
        reinit_config = dataclasses.replace(reinit_config, neuron_ratio=chosen)
    reinit, after_stage1 = _reinit(run, ranking, reinit_config)
    finetune = run.finetune(cfg.aft)
    after = run.measure(stage="evaluating", step=1, total=1)
    return PurificationResult(after_stage1=after_stage1, after=after, timings_s=run.timings, reinit=reinit,
                              finetune=finetune, state_dict=run.state_dict(), **common)


def _reinit(run: _Run, ranking: NeuronRanking, config: ReinitConfig) -> tuple[ReinitResult, StageMetrics]:
    """Zero-reinitialize ``run.model`` (the original weights) and measure it."""
    started = time.monotonic()
    reinit = zero_reinit_(run.model, ranking, config)
    run.timings["reinitializing"] += time.monotonic() - started
    run.reporter.update(stage="reinitializing", step=1, total=2, metrics={
        "neurons_zeroed": float(reinit.neurons_zeroed), "weights_zeroed": float(reinit.weights_zeroed)})
    return reinit, run.measure(stage="reinitializing", step=2, total=2)


@dataclass
class _SweepReporter:
    """Tags every update of one sweep point with its n and position."""

    inner: Reporter
    tags: dict[str, float]

    def update(self, *, stage: str, step: int, total: int | None, metrics: Mapping[str, float] | None = None) -> None:
        self.inner.update(stage=stage, step=step, total=total, metrics={**(metrics or {}), **self.tags})


def _sweep_n(run: _Run, ranking: NeuronRanking, before: StageMetrics, common: dict[str, Any]) -> PurificationResult:
    """The paper's way of choosing n: run stage 1 and stage 2 from the original
    weights for every n of the sweep, measure each on the test and poisoned data,
    keep the model with the highest DER (the smaller n on a tie)."""
    cfg = run.config
    assert cfg.sweep is not None
    original = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    reporter = run.reporter
    points: list[SweepPoint] = []
    best: dict[str, Any] | None = None
    try:
        for i, n in enumerate(cfg.sweep):
            if i:
                run.model.load_state_dict(original)
            run.reporter = _SweepReporter(reporter, {"sweep_n": n, "sweep_point": float(i + 1),
                                                     "sweep_points": float(len(cfg.sweep))})
            reinit, after_stage1 = _reinit(run, ranking, dataclasses.replace(cfg.reinit, neuron_ratio=n))
            finetune = run.finetune(cfg.aft)
            after = run.measure(stage="evaluating", step=1, total=1)
            score = der(before, after)
            points.append(SweepPoint(n, after_stage1, after, score, chosen=False))
            log.info("sweep n=%g: %s -> %s (DER %s)", n, before.to_dict(), after.to_dict(), score)
            if best is None or (score is not None and score > best["score"]):
                best = dict(score=score, index=i, reinit=reinit, after_stage1=after_stage1, after=after,
                            finetune=finetune, state_dict=run.state_dict())
    finally:
        run.reporter = reporter
    assert best is not None
    points[best["index"]] = dataclasses.replace(points[best["index"]], chosen=True)
    return PurificationResult(after_stage1=best["after_stage1"], after=best["after"], timings_s=run.timings,
                              reinit=best["reinit"], finetune=best["finetune"], state_dict=best["state_dict"],
                              sweep=tuple(points), **common)


@register_defense("ft")
def _ft(run: _Run) -> PurificationResult:
    before = run.measure(stage="loading", step=2, total=2)
    finetune = run.finetune(dataclasses.replace(run.config.aft, alpha=0.0))
    after = run.measure(stage="evaluating", step=1, total=1)
    return PurificationResult(
        defense="ft", before=before, after_stage1=before, after=after, timings_s=run.timings,
        unlearning=None, reinit=None, top_neurons=(), finetune=finetune,
        params=run.config.to_params(), state_dict=run.state_dict(),
    )


def _check_inputs(spec: ModelSpec, clean: ImageSet, test: ImageSet | None, poisoned: ImageSet | None,
                  config: PurifyConfig) -> None:
    if config.sweep and (test is None or poisoned is None):
        raise InputError("a neuron_ratio sweep chooses n by DER: it needs a test set and poisoned data "
                         "(a poisoned set or a trigger)")
    clean.check_fits(spec, what="clean set")
    if test is not None:
        test.check_fits(spec, what="test set")
    if poisoned is not None:
        if poisoned.target is None:
            raise DatasetError("poisoned set: no target labels (the NPZ needs a 'target' array)")
        poisoned.check_fits(spec, what="poisoned set")


def purify(
    model: nn.Module,
    spec: ModelSpec,
    clean: ImageSet,
    *,
    test: ImageSet | None = None,
    poisoned: ImageSet | None = None,
    config: PurifyConfig = PurifyConfig(),
    reporter: Reporter | None = None,
    cancel: CancelHook | None = None,
    device: torch.device | str | None = None,
) -> PurificationResult:
    """Purify a copy of ``model`` (the caller's model is not modified) with
    ``config.defense`` and measure it before, after stage 1 and at the end.

    Metrics need ``test`` (CA) and/or ``poisoned`` (ASR, RA); without them the
    values are None. Deterministic on CPU for a given ``config.seed``. Raises
    :class:`InputError` on inputs that do not fit ``spec`` and
    :class:`~defense_core.errors.Cancelled` when ``cancel()`` answers True.
    """
    reporter = reporter or NullReporter()
    _check_inputs(spec, clean, test, poisoned, config)
    options = config.device if device is None else dataclasses.replace(config.device, device=str(device))
    try:
        runtime = make_runtime(options, model=model,
                               input_shape=(spec.in_channels, *spec.input_size))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    started = time.monotonic()
    reporter.update(stage="loading", step=0, total=2)
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)  # layers that draw from the global stream (dropout)
        working = runtime.prepare_model(copy_model(model))
        reporter.update(stage="loading", step=1, total=2)
        run = _Run(model=working, spec=spec, clean=clean, test=test, poisoned=poisoned, config=config,
                   runtime=runtime, reporter=reporter, cancel=cancel)
        result = _DEFENSES[config.defense](run)
    result.timings_s["total"] = time.monotonic() - started
    log.info("purified with %s in %.1fs: %s -> %s", config.defense, result.timings_s["total"],
             result.before.to_dict(), result.after.to_dict())
    return result
