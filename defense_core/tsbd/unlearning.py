"""Stage 1a: clean unlearning — gradient ascent on the clean set until its
accuracy falls to the stop level (see :class:`UnlearnConfig` for the rule)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from defense_core.device import CPU_FP32, DeviceRuntime
from defense_core.errors import TrainingDivergedError
from defense_core.imageset import ImageSet
from defense_core.metrics import accuracy
from defense_core.progress import CancelHook, NullReporter, Reporter, check_cancel
from defense_core.spec import ModelSpec
from defense_core.transforms import AugmentConfig
from defense_core.tsbd.batches import TrainBatches, cross_entropy
from defense_core.tsbd.config import UnlearnConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnlearnResult:
    epochs: int              # epochs started (the last one may be partial)
    steps: int               # ascent steps taken
    checks: int              # accuracy checks made
    final_clean_acc: float   # accuracy at the last check (NaN if none was made)
    threshold: float         # tau used
    reached_stop_acc: bool   # False when a cap ended the stage first

    def to_dict(self) -> dict[str, float | int]:
        return {"epochs": self.epochs, "steps": self.steps, "final_clean_acc": self.final_clean_acc}


def make_ascent_optimizer(model: nn.Module, config: UnlearnConfig) -> torch.optim.SGD:
    """SGD that *maximizes* the loss (gradient ascent), same cost as a plain SGD step."""
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, maximize=True,
    )


def ascent_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    runtime: DeviceRuntime = CPU_FP32,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward and optimizer step; returns (loss, correct count), 0-dim tensors."""
    optimizer.zero_grad(set_to_none=True)
    with runtime.autocast():
        logits = model(x)
    loss = cross_entropy(logits, y)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


def unlearn_(
    model: nn.Module,
    clean: ImageSet,
    *,
    spec: ModelSpec,
    config: UnlearnConfig = UnlearnConfig(),
    augment: AugmentConfig = AugmentConfig(),
    batch_size: int = 256,
    eval_batch_size: int = 512,
    generator: torch.Generator,
    runtime: DeviceRuntime = CPU_FP32,
    reporter: Reporter | None = None,
    cancel: CancelHook | None = None,
) -> UnlearnResult:
    """Unlearn ``model`` in place (pass a copy of the original). Returns what happened."""
    reporter = reporter or NullReporter()
    tau = config.threshold(spec.num_classes)
    batches = TrainBatches(
        clean, spec=spec, batch_size=batch_size, augment_config=augment, generator=generator, runtime=runtime
    )
    spe = len(batches)
    # In-epoch checks on a fixed subset, only when D is larger than the subset.
    check_x, check_y = batches.x, batches.y
    interval = spe + 1  # never, unless D is large
    if len(clean) > config.check_samples:
        pick = torch.randperm(len(clean), generator=generator)[: config.check_samples].to(batches.x.device)
        check_x, check_y = batches.x[pick], batches.y[pick]
        interval = max(1, -(-config.check_samples // batch_size))

    def check(x: torch.Tensor, y: torch.Tensor) -> float:
        return accuracy(model, x, y, normalizer=batches.normalizer, batch_size=eval_batch_size, runtime=runtime)

    optimizer = make_ascent_optimizer(model, config)
    scaler = runtime.grad_scaler()
    model.train()
    started = time.monotonic()
    steps = checks = 0
    acc = math.nan
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        for i, (x, y) in enumerate(batches.epoch()):
            check_cancel(cancel)
            loss, correct = ascent_step(model, optimizer, x, y, runtime=runtime, scaler=scaler)
            steps += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDivergedError(
                    "clean unlearning diverged (non-finite loss); try a smaller unlearn_lr")
            metrics = {"loss": loss_value, "batch_acc": correct.item() / y.shape[0]}
            checked = False
            if i == spe - 1:
                acc, checked = check(batches.x, batches.y), True
            elif (i + 1) % interval == 0:
                acc, checked = check(check_x, check_y), True
            if checked:
                checks += 1
                metrics["clean_acc"] = acc
            reporter.update(stage="unlearning", step=steps, total=None, metrics=metrics)
            if checked and acc <= tau:
                log.info("unlearning reached accuracy %.4f <= %.4f after %d steps", acc, tau, steps)
                return UnlearnResult(epoch, steps, checks, acc, tau, True)
            if steps >= config.max_steps or (
                config.max_seconds is not None and time.monotonic() - started >= config.max_seconds
            ):
                if not checked:  # report the accuracy the weights actually reached
                    acc, checks = check(batches.x, batches.y), checks + 1
                log.warning("unlearning stopped by a cap after %d steps (accuracy %.4f, tau %.4f)", steps, acc, tau)
                return UnlearnResult(epoch, steps, checks, acc, tau, acc <= tau)
    log.warning("unlearning stopped after %d epochs (accuracy %.4f > %.4f)", epoch, acc, tau)
    return UnlearnResult(epoch, steps, checks, acc, tau, False)
