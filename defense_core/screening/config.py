"""The screening's hyper-parameters: one frozen, validated config per signal."""

from __future__ import annotations

from dataclasses import dataclass, field

from defense_core.transforms import AugmentConfig
from defense_core.tsbd.config import UnlearnConfig


def _count(name: str, value: int, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass(frozen=True)
class MarginConfig:
    """Data-free maximum margin (MM-BD). The public code uses 30 images per class
    and 300 steps of SGD; we use Adam in pixel space, which reaches the same
    ordering of classes in fewer steps (see :mod:`.margin`); the defaults are
    sized to cost well under a TSBD job on PreAct-ResNet18 at 32x32 on a CPU."""

    images_per_class: int = 10
    steps: int = 100
    lr: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        _count("margin images_per_class", self.images_per_class)
        _count("margin steps", self.steps)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 10):
            raise ValueError(f"margin lr must be in (0, 10], got {self.lr!r}")


# TSBD's stage-1 unlearning with ten times its learning rate and a 300-step cap: the
# stop level tau, momentum, batch, augmentation and stop rule are TSBD's. At lr 1e-4 a
# small CNN needs more than 1,000 ascent steps to reach tau (more than a whole TSBD
# job would spend screening); a TSBD job passes its own stage-1 predictions instead.
SCREENING_UNLEARN = UnlearnConfig(lr=1e-3, max_steps=300)


@dataclass(frozen=True)
class CollapseConfig:
    """Clean-unlearning collapse: TSBD's stage-1 unlearning (``unlearn_``), with the
    augmentation, batch size and generator seed of a default ``purify`` run and
    :data:`SCREENING_UNLEARN` as the schedule."""

    unlearn: UnlearnConfig = SCREENING_UNLEARN
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 256
    eval_batch_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _count("collapse batch_size", self.batch_size)
        _count("collapse eval_batch_size", self.eval_batch_size)


@dataclass(frozen=True)
class ScreeningConfig:
    margin: MarginConfig = field(default_factory=MarginConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    use_margin: bool = True
    use_collapse: bool = True   # needs a clean set (or precomputed unlearned predictions)

    def __post_init__(self) -> None:
        if not (self.use_margin or self.use_collapse):
            raise ValueError("the screening needs at least one signal")
