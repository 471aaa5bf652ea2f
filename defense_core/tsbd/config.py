"""Hyper-parameters of the two TSBD stages, with the paper's defaults.

Every config is frozen and validated on construction (``ValueError`` on a bad
value); :mod:`defense_core.jobs.params` turns user parameters into these and maps
the errors to :class:`~defense_core.errors.InputError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

PerturbNorm = Literal["tensor", "global"]
NeuronRatio = float | Literal["auto"]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_count(name: str, value: int, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass(frozen=True)
class UnlearnConfig:
    """Stage 1a, clean unlearning: gradient *ascent* on the cross-entropy over D.

    Stop rule: stop at the first accuracy check at or below ``stop_acc`` (tau;
    ``None`` means chance level 1/K). A check is the accuracy of the model in
    eval mode (BatchNorm running statistics, no augmentation, no gradients) on
    the clean set D; one is made at the end of every epoch, over all of D,
    exactly the paper's rule. No check is made before the first step.

    How the schedule adapts to the size of D:

    * small D (up to ``check_samples`` images, e.g. 200 to 2,560): an epoch is
      one to ten steps, so the per-epoch check already runs every few steps and
      the epoch cap (``max_epochs``, 1,000 as in the reference code) amounts
      to 1,000 to 10,000 ascent steps, enough for lr 1e-4 to collapse any model
      we have seen;
    * large D (tens of thousands of images, hundreds of steps per epoch):
      in addition to the per-epoch check on all of D, a cheaper check runs
      every ``check_samples / batch_size`` steps on a fixed seeded subset of
      ``check_samples`` images of D, so unlearning stops close to tau instead
      of overshooting for a whole epoch. The epoch-end check on all of D still
      runs, so we never stop later than the per-epoch rule would.

    Safety caps: ``max_steps`` ascent steps in total, and optionally
    ``max_seconds`` of wall time (off by default: it would make the result
    depend on the machine's speed). If a cap is hit first, the ranking uses the
    weights reached so far and ``reached_stop_acc`` is False in the report.
    """

    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    stop_acc: float | None = None      # tau; None -> 1 / num_classes
    max_epochs: int = 1000
    max_steps: int = 10_000
    max_seconds: float | None = None
    check_samples: int = 2560          # size of the in-epoch check subset (large D only)

    def __post_init__(self) -> None:
        _check_positive("unlearn_lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"unlearn momentum must be in [0, 1), got {self.momentum!r}")
        _check_non_negative("unlearn weight_decay", self.weight_decay)
        if self.stop_acc is not None and not (
            isinstance(self.stop_acc, (int, float)) and 0.0 <= self.stop_acc < 1.0
        ):
            raise ValueError(f"stop_acc must be in [0, 1), got {self.stop_acc!r}")
        _check_count("unlearn_max_epochs", self.max_epochs)
        _check_count("unlearn_max_steps", self.max_steps)
        if self.max_seconds is not None:
            _check_positive("unlearn_max_seconds", self.max_seconds)
        _check_count("check_samples", self.check_samples)

    def threshold(self, num_classes: int) -> float:
        return 1.0 / num_classes if self.stop_acc is None else float(self.stop_acc)


@dataclass(frozen=True)
class ReinitConfig:
    """Stage 1c, zero reinitialization of the original weights.

    ``neuron_ratio`` (n): share of all ranked conv neurons taken, largest NWC
    first; ``ceil(n * N)`` neurons, at least one. ``"auto"``: n is chosen from the
    clean data by the rule of :mod:`defense_core.tsbd.choose_n` (the pipeline does
    this before stage 1c; :func:`zero_reinit_` itself refuses ``"auto"``).
    The default 0.05 comes from the paper's sweep; the quality benchmark
    (``bench/quality.py``) compares it with ``"auto"``.

    ``weight_ratio`` (m): share of the pooled weights of those neurons zeroed,
    largest ``|W_unlearned - W_0|`` first; ``ceil(m * pool)``, at least one.
    """

    neuron_ratio: NeuronRatio = 0.05
    weight_ratio: float = 0.7

    def __post_init__(self) -> None:
        if self.neuron_ratio != "auto" and (
            isinstance(self.neuron_ratio, bool)
            or not isinstance(self.neuron_ratio, (int, float))
            or not (0.0 < self.neuron_ratio <= 1.0)
        ):
            raise ValueError(f"neuron_ratio must be in (0, 1] or \"auto\", got {self.neuron_ratio!r}")
        if isinstance(self.weight_ratio, bool) or not isinstance(self.weight_ratio, (int, float)) or not (
            0.0 < self.weight_ratio <= 1.0
        ):
            raise ValueError(f"weight_ratio must be in (0, 1], got {self.weight_ratio!r}")


@dataclass(frozen=True)
class AFTConfig:
    """Stage 2, activeness-aware fine-tuning (``alpha = 0``: vanilla fine-tuning).

    Per step: ``g1`` at theta, ``g2`` at ``theta + rho * g1 / ||g1||`` (norm per
    parameter tensor, or over all parameters with ``perturb_norm="global"``),
    update with ``(1 - alpha) * g1 + alpha * g2``.

    Schedule: ``epochs`` passes over D, but at least ``min_steps`` optimizer
    steps: the number of epochs run is
    ``max(epochs, ceil(min_steps / steps_per_epoch))``. With the paper's D of
    2,500 images (10 steps of 256) the 20 epochs already give 200 steps; with
    200 images an epoch is a single step, and 20 steps cannot recover clean
    accuracy after the reinitialization, so 200 epochs are run instead. Set
    ``min_steps=0`` for the paper's epoch count regardless of D.
    """

    alpha: float = 0.7
    rho: float = 0.05
    perturb_norm: PerturbNorm = "tensor"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 20
    min_steps: int = 200
    # share of fine-tuning images blended with fresh noise (transforms.noise_blend); 0: off
    noise_blend: float = 0.0
    # after fine-tuning, replace the BN running statistics with those of D without
    # augmentation (one pass, no gradients); None: only when noise_blend > 0, whose
    # blended batches would otherwise leave statistics of noisy images behind
    bn_reestimate: bool | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_blend, (int, float)) and 0.0 <= self.noise_blend <= 1.0):
            raise ValueError(f"ft_noise_blend must be in [0, 1], got {self.noise_blend!r}")
        if self.bn_reestimate not in (None, True, False):
            raise ValueError(f"ft_bn_reestimate must be true, false or null, got {self.bn_reestimate!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        _check_positive("rho", self.rho)
        if self.perturb_norm not in ("tensor", "global"):
            raise ValueError(f"perturb_norm must be \"tensor\" or \"global\", got {self.perturb_norm!r}")
        _check_positive("ft_lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"ft_momentum must be in [0, 1), got {self.momentum!r}")
        _check_non_negative("ft_weight_decay", self.weight_decay)
        _check_count("ft_epochs", self.epochs)
        _check_count("ft_min_steps", self.min_steps, lo=0)

    def num_epochs(self, steps_per_epoch: int) -> int:
        return max(self.epochs, -(-self.min_steps // steps_per_epoch))

    @property
    def reestimates_bn(self) -> bool:
        return self.noise_blend > 0 if self.bn_reestimate is None else self.bn_reestimate
