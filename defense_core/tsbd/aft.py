"""Stage 2: activeness-aware fine-tuning (AFT); ``alpha = 0`` is vanilla FT.

One step (two forward/backward passes, nothing more)::

    g1 = grad L(theta)                        # train mode, BN statistics updated
    theta' = theta + rho * g1 / ||g1||        # in place
    g2 = grad L(theta')                       # BN running statistics left untouched
    theta <- restored exactly; step with (1 - alpha) * g1 + alpha * g2

``theta`` is saved into buffers allocated once per stepper (no model copies,
no per-step allocation of the backup); ``g1`` is kept by taking the first
pass's ``.grad`` tensors instead of copying them. The model's buffers (BN
running mean/var and batch counters) are saved before the perturbed pass and
copied back after it, which works for any module with running statistics,
TorchScript included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from defense_core.device import CPU_FP32, DeviceRuntime
from defense_core.imageset import ImageSet
from defense_core.progress import CancelHook, NullReporter, Reporter, check_cancel
from defense_core.spec import ModelSpec
from defense_core.transforms import AugmentConfig, Normalizer
from defense_core.tsbd.batches import TrainBatches, cross_entropy
from defense_core.tsbd.config import AFTConfig

log = logging.getLogger(__name__)

_EPS = 1e-12


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor      # 0-dim, loss of the first pass
    correct: torch.Tensor   # 0-dim int, correct predictions of the first pass


class AFTStepper:
    """Runs AFT (or FT when ``alpha == 0``) steps on ``model`` with ``optimizer``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: AFTConfig = AFTConfig(),
        *,
        runtime: DeviceRuntime = CPU_FP32,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.runtime = runtime
        self.scaler = runtime.grad_scaler()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.two_pass = config.alpha > 0
        self._theta = [torch.empty_like(p) for p in self.params] if self.two_pass else []
        self._buffers = [b for b in model.buffers()] if self.two_pass else []
        self._buffer_backup = [torch.empty_like(b) for b in self._buffers]

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.runtime.autocast():
            logits = self.model(x)
        loss = cross_entropy(logits, y)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss.detach(), logits.detach()

    def _optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._forward_backward(x, y)
        correct = (logits.argmax(dim=1) == y).sum()
        if not self.two_pass:
            self._optimizer_step()
            return StepOutput(loss, correct)

        alpha, rho = self.config.alpha, self.config.rho
        live = [(p, th) for p, th in zip(self.params, self._theta, strict=True) if p.grad is not None]
        params = [p for p, _ in live]
        g1 = [p.grad for p in params]
        with torch.no_grad():
            for p, th in live:
                th.copy_(p)
            norms = torch._foreach_norm(g1)
            if self.config.perturb_norm == "global":
                total = torch.linalg.vector_norm(torch.stack(norms))
                scales = [rho / (total + _EPS)] * len(g1)
            else:
                scales = [rho / (n + _EPS) for n in norms]
            for p, g, s in zip(params, g1, scales, strict=True):
                # A non-finite scale (overflowed fp16 gradients) means no perturbation;
                # the scaler then skips the step anyway.
                p.add_(g * torch.nan_to_num(s, nan=0.0, posinf=0.0))
            for p in params:
                p.grad = None
            for b, backup in zip(self._buffers, self._buffer_backup, strict=True):
                backup.copy_(b)
        self._forward_backward(x, y)
        with torch.no_grad():
            for b, backup in zip(self._buffers, self._buffer_backup, strict=True):
                b.copy_(backup)
            for p, th in live:
                p.copy_(th)
            for p, g in zip(params, g1, strict=True):
                if p.grad is None:
                    p.grad = g.mul_(1.0 - alpha)
                else:
                    p.grad.mul_(alpha).add_(g, alpha=1.0 - alpha)
        self._optimizer_step()
        return StepOutput(loss, correct)


@dataclass(frozen=True)
class FinetuneResult:
    epochs: int
    steps: int
    final_loss: float        # mean first-pass loss over the last epoch
    final_train_acc: float   # first-pass accuracy over the last epoch (augmented, train mode)


def make_optimizer(model: nn.Module, config: AFTConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )


def finetune_(
    model: nn.Module,
    clean: ImageSet,
    *,
    spec: ModelSpec,
    config: AFTConfig = AFTConfig(),
    augment: AugmentConfig = AugmentConfig(),
    batch_size: int = 256,
    generator: torch.Generator,
    runtime: DeviceRuntime = CPU_FP32,
    reporter: Reporter | None = None,
    cancel: CancelHook | None = None,
) -> FinetuneResult:
    """Fine-tune all parameters of ``model`` in place on ``clean`` (AFT, or FT when alpha is 0).

    With ``config.reestimates_bn`` (noise blends on), the BatchNorm running
    statistics are re-estimated on ``clean`` at the end (:func:`reestimate_bn_`).
    """
    reporter = reporter or NullReporter()
    batches = TrainBatches(
        clean, spec=spec, batch_size=batch_size, augment_config=augment, generator=generator, runtime=runtime,
        noise_blend=config.noise_blend,
    )
    epochs = config.num_epochs(len(batches))
    total = epochs * len(batches)
    stepper = AFTStepper(model, make_optimizer(model, config), config, runtime=runtime)
    steps = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    correct = seen = 0
    for _ in range(epochs):
        loss_sum.zero_()
        correct = seen = 0
        for x, y in batches.epoch():
            check_cancel(cancel)
            out = stepper.step(x, y)
            steps += 1
            loss_sum += out.loss * y.shape[0]
            correct += int(out.correct)
            seen += int(y.shape[0])
            reporter.update(
                stage="finetuning", step=steps, total=total,
                metrics={"loss": float(out.loss), "train_acc": correct / seen},
            )
    if config.reestimates_bn:
        reestimate_bn_(model, clean, spec=spec, batch_size=batch_size, runtime=runtime)
    return FinetuneResult(epochs, steps, float(loss_sum) / max(seen, 1), correct / max(seen, 1))


_BATCHNORM_NAMES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})


def _tracked_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers that keep running statistics, eager or TorchScript."""
    found = []
    for module in model.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in _BATCHNORM_NAMES
        )
        if is_bn and getattr(module, "running_mean", None) is not None and module.momentum != 0:
            found.append(module)
    return found


@torch.no_grad()
def reestimate_bn_(model: nn.Module, clean: ImageSet, *, spec: ModelSpec, batch_size: int,
                   runtime: DeviceRuntime = CPU_FP32) -> None:
    """Replace the BatchNorm running statistics of ``model`` with the mean over
    batches of ``clean`` as it is (no augmentation, no gradients, weights
    untouched); the model's train/eval mode is kept. The set is cut into
    ``ceil(len / batch_size)`` batches whose sizes differ by at most one, so
    each batch's equal weight in the mean is also an equal share of images.

    Fine-tuning with noise blends leaves statistics of partly noisy batches in
    the running averages, which cost clean accuracy at evaluation.

    Works on TorchScript models too, whose momentum cannot be changed: before
    each batch a layer's statistics are zeroed (and its batch count, for
    ``momentum=None``), so after the forward pass they hold ``momentum`` times
    the batch's own statistics (all of them with ``None``).
    """
    layers = _tracked_batchnorms(model)
    if not layers:
        return
    sums = [(torch.zeros_like(bn.running_mean), torch.zeros_like(bn.running_var)) for bn in layers]
    saved = [{k: v.clone() for k, v in bn.named_buffers()} for bn in layers]
    normalizer = Normalizer(spec, runtime.device)
    parts = -(-len(clean) // batch_size)
    was_training = model.training
    model.train()
    try:
        with runtime.autocast():
            for chunk in torch.tensor_split(clean.x, parts):
                for bn in layers:
                    bn.running_mean.zero_()
                    bn.running_var.zero_()
                    if bn.num_batches_tracked is not None:
                        bn.num_batches_tracked.zero_()
                model(runtime.prepare_input(normalizer(chunk.to(runtime.device))))
                for bn, (mean, var) in zip(layers, sums, strict=True):
                    share = 1.0 if bn.momentum is None else float(bn.momentum)
                    mean.add_(bn.running_mean, alpha=1.0 / share)
                    var.add_(bn.running_var, alpha=1.0 / share)
    except BaseException:
        for bn, buffers in zip(layers, saved, strict=True):  # the statistics as they were
            for name, value in buffers.items():
                getattr(bn, name).copy_(value)
        raise
    finally:
        model.train(was_training)
    for bn, (mean, var), buffers in zip(layers, sums, saved, strict=True):
        bn.running_mean.copy_(mean / parts)
        bn.running_var.copy_(var / parts)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.copy_(buffers["num_batches_tracked"] + parts)
