"""The state one purification threads through its stages, shared by the defenses."""

from __future__ import annotations

import copy
import io
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from defense_core.device import DeviceRuntime
from defense_core.imageset import ImageSet
from defense_core.jobs.params import MAX_SEED, PurifyConfig
from defense_core.metrics import StageMetrics, evaluate
from defense_core.progress import CancelHook, Reporter, check_cancel
from defense_core.screening import ScreeningReport, screen
from defense_core.spec import ModelSpec
from defense_core.tsbd.aft import FinetuneResult, finetune_
from defense_core.tsbd.config import AFTConfig


@dataclass
class DefenseRun:
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
    screening: ScreeningReport | None = None

    @property
    def screens(self) -> bool:
        """Whether this run screens: screening on, and three classes or more (the margin test needs them)."""
        return self.config.screening is not None and self.spec.num_classes >= 3

    def screen(self, *, unlearned_predictions: torch.Tensor | None = None) -> ScreeningReport | None:
        """Screen the model as it came (call before the defense changes ``model``);
        ``unlearned_predictions``: the defense's own stage-1 predictions on ``clean``, so
        the screening does not unlearn again. None when the run does not :attr:`screens`."""
        config = self.config.screening
        if config is None or not self.screens:
            return None
        model = self.model
        if unlearned_predictions is None and self.runtime.device.type != "cpu":
            model = copy_model(model).cpu()  # the screening's own unlearning runs on the CPU
        self.screening = screen(model, self.clean, self.spec, config, progress=self.reporter,
                                should_stop=self.cancel, unlearned_predictions=unlearned_predictions)
        return self.screening

    def screening_document(self) -> dict | None:
        return None if self.screening is None else self.screening.to_dict()

    def measure(self, *, stage: str, step: int, total: int) -> StageMetrics:
        check_cancel(self.cancel)
        started = time.monotonic()
        metrics = StageMetrics()
        if self.test is not None or self.poisoned is not None:
            metrics = evaluate(self.model, self.spec, test=self.test, poisoned=self.poisoned,
                               batch_size=self.config.eval_batch_size,
                               runtime=self.runtime.for_evaluation())
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
        state = self.model.state_dict()
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


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
