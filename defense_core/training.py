"""Train classifiers, clean or backdoored, to build test models and benchmarks.

Data stays in memory as uint8 and is normalized per batch. On CPU the model
runs in channels-last layout (oneDNN's preferred layout, faster for the
benchmark networks: ``bench/results/speed.md``). bf16 autocast is available but
off by default: without AMX it did not pay for these networks. Evaluation always
runs in float32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defense_core import metrics
from defense_core.attacks import TriggerSpec, apply_trigger
from defense_core.attacks.families.wanet import WaNetParams, wanet_cross
from defense_core.imageset import ImageSet
from defense_core.progress import NullReporter, Reporter
from defense_core.registry import create_model
from defense_core.spec import ModelSpec
from defense_core.transforms import AugmentConfig, Normalizer, augment, batch_indices, steps_per_epoch

log = logging.getLogger(__name__)

Schedule = Literal["cosine", "step", "constant"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_padding=2))
    schedule: Schedule = "cosine"
    step_size: int = 10        # "step": decay every step_size epochs
    gamma: float = 0.1         # "step": decay factor
    channels_last: bool = True  # channels-last layout on CPU
    bf16: bool = False          # bf16 autocast on CPU (only where oneDNN supports bf16)

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 10_000:
            raise ValueError(f"epochs must be in [1, 10000], got {self.epochs}")
        if not 0.0 < self.lr <= 10.0:
            raise ValueError(f"lr must be in (0, 10], got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.weight_decay <= 1.0:
            raise ValueError(f"weight_decay must be in [0, 1], got {self.weight_decay}")
        if not 1 <= self.batch_size <= 65_536:
            raise ValueError(f"batch_size must be in [1, 65536], got {self.batch_size}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be cosine, step or constant, got {self.schedule!r}")
        if self.step_size < 1 or not 0.0 < self.gamma <= 1.0:
            raise ValueError("step_size must be >= 1 and gamma in (0, 1]")


def cpu_bf16_supported() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _lr_factor(config: TrainConfig, epoch: float) -> float:
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "step":
        return config.gamma ** int(epoch // config.step_size)
    return 1.0


def train_model(
    spec: ModelSpec,
    train: ImageSet,
    *,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    device: torch.device | str | None = None,
    reporter: Reporter | None = None,
) -> nn.Module:
    """Train a fresh ``spec`` model on ``train`` with SGD; returns it in eval mode on CPU."""
    train.check_fits(spec, what="training set")
    device = torch.device(device or "cpu")
    reporter = reporter or NullReporter()
    torch.manual_seed(seed)  # weight init has no generator argument
    gen = torch.Generator().manual_seed(seed)
    model = create_model(spec).to(device)
    channels_last = config.channels_last and device.type == "cpu"
    use_bf16 = config.bf16 and device.type == "cpu" and cpu_bf16_supported()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    normalize = Normalizer(spec, device)
    x_all, y_all = train.x.to(device), train.y.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps = steps_per_epoch(len(train), config.batch_size)
    model.train()
    for epoch in range(config.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for i, idx in enumerate(batch_indices(len(train), config.batch_size, generator=gen)):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(config, epoch + i / steps)
            xb = normalize(augment(x_all[idx.to(device)], config.augment, gen))
            yb = y_all[idx.to(device)]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        metrics = {"loss": loss_sum / seen, "train_acc": correct / seen}
        log.info("epoch %d/%d loss %.4f acc %.4f", epoch + 1, config.epochs, metrics["loss"], metrics["train_acc"])
        reporter.update(stage="training", step=epoch + 1, total=config.epochs, metrics=metrics)
    model.eval()
    return model.to("cpu", memory_format=torch.contiguous_format)


def poison_dataset(
    train: ImageSet, trigger: TriggerSpec, *, ratio: float = 0.1, seed: int = 0
) -> tuple[ImageSet, torch.Tensor]:
    """Poison ``round(ratio * N)`` training images; return the set and their sorted indices.

    All-to-one families: images are drawn from the non-target classes, triggered
    and relabeled to the target. Clean-label families (SIG): drawn from the
    target class only, triggered, labels kept (capped at the class size).
    WaNet additionally warps ``cross_ratio`` times as many other images with a
    jittered field ("noise mode"); those keep their true labels and are not in
    the returned indices.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    if trigger.family.clean_label:
        pool = torch.nonzero(train.y == trigger.target).flatten()
    else:
        pool = torch.nonzero(train.y != trigger.target).flatten()
    count = min(round(ratio * n), len(pool))
    order = pool[torch.randperm(len(pool), generator=gen)]
    chosen = order[:count].sort().values
    x, y = train.x.clone(), train.y.clone()
    x[chosen] = apply_trigger(train.x[chosen], trigger, generator=gen)
    if not trigger.family.clean_label:
        y[chosen] = trigger.target
    if isinstance(trigger.params, WaNetParams) and trigger.params.cross_ratio > 0:
        mask = torch.ones(n, dtype=torch.bool)
        mask[chosen] = False
        rest = torch.nonzero(mask).flatten()
        rest = rest[torch.randperm(len(rest), generator=gen)]
        cross = rest[: min(round(trigger.params.cross_ratio * count), len(rest))]
        x[cross] = wanet_cross(train.x[cross], trigger.params, generator=gen)
    return ImageSet(x=x, y=y), chosen


def train_backdoored_model(
    spec: ModelSpec,
    train: ImageSet,
    trigger: TriggerSpec,
    *,
    ratio: float = 0.1,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    device: torch.device | str | None = None,
    reporter: Reporter | None = None,
) -> nn.Module:
    """Poison ``train`` with ``trigger`` at ``ratio`` and train a fresh model on it."""
    poisoned, _ = poison_dataset(train, trigger, ratio=ratio, seed=seed)
    return train_model(spec, poisoned, config=config, seed=seed, device=device, reporter=reporter)


def accuracy(model: nn.Module, data: ImageSet, spec: ModelSpec, *, labels: torch.Tensor | None = None,
             batch_size: int = 512) -> float:
    """Share of ``data`` classified as ``labels`` (default: the true labels); fp32, eval mode restored."""
    return metrics.accuracy(model, data.x, data.y if labels is None else labels,
                            normalizer=Normalizer(spec, "cpu"), batch_size=batch_size)
