"""Clean accuracy, attack success rate and robust accuracy (BackdoorBench
definitions), plus DER and fidelity computed from two stages' metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from defense_core.device import CPU_FP32, DeviceRuntime
from defense_core.imageset import ImageSet
from defense_core.spec import ModelSpec
from defense_core.transforms import Normalizer


@dataclass(frozen=True)
class StageMetrics:
    """Fractions in [0, 1]; ``None`` when the data to measure it was not given."""

    ca: float | None = None
    asr: float | None = None
    ra: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"ca": self.ca, "asr": self.asr, "ra": self.ra}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd inside; every submodule's previous mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    normalizer: Normalizer,
    batch_size: int = 512,
    runtime: DeviceRuntime = CPU_FP32,
) -> torch.Tensor:
    """Predicted labels (int64, on the images' device) for uint8 ``[N, C, H, W]`` images."""
    out = torch.empty(images.shape[0], dtype=torch.int64, device=images.device)
    with eval_mode(model), runtime.autocast():
        for start in range(0, images.shape[0], batch_size):
            x = runtime.prepare_input(normalizer(images[start : start + batch_size]))
            out[start : start + x.shape[0]] = model(x).argmax(dim=1).to(images.device)
    return out


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    normalizer: Normalizer,
    batch_size: int = 512,
    runtime: DeviceRuntime = CPU_FP32,
) -> float:
    if images.shape[0] == 0:
        raise ValueError("accuracy of an empty set")
    pred = predict(model, images, normalizer=normalizer, batch_size=batch_size, runtime=runtime)
    return (pred == labels.to(pred.device)).double().mean().item()


def evaluate(
    model: nn.Module,
    spec: ModelSpec,
    *,
    test: ImageSet | None = None,
    poisoned: ImageSet | None = None,
    batch_size: int = 512,
    runtime: DeviceRuntime = CPU_FP32,
) -> StageMetrics:
    """CA on ``test``; ASR and RA on the triggered images of ``poisoned`` whose
    true label is not the target (target-class images are ignored)."""
    normalizer = Normalizer(spec, runtime.device)
    ca = asr = ra = None
    if test is not None and len(test) > 0:
        ca = accuracy(model, test.x, test.y, normalizer=normalizer, batch_size=batch_size, runtime=runtime)
    if poisoned is not None:
        if poisoned.target is None:
            raise ValueError("the poisoned set carries no target labels")
        keep = poisoned.y != poisoned.target
        if bool(keep.any()):
            x, y, target = poisoned.x[keep], poisoned.y[keep], poisoned.target[keep]
            pred = predict(model, x, normalizer=normalizer, batch_size=batch_size, runtime=runtime).cpu()
            asr = (pred == target).double().mean().item()
            ra = (pred == y).double().mean().item()
    return StageMetrics(ca=ca, asr=asr, ra=ra)


def der(before: StageMetrics, after: StageMetrics) -> float | None:
    """Defense effectiveness rating: ``[max(0, dASR) - max(0, dCA) + 1] / 2``."""
    if None in (before.ca, after.ca, before.asr, after.asr):
        return None
    asr_drop = max(0.0, before.asr - after.asr)  # type: ignore[operator]
    ca_drop = max(0.0, before.ca - after.ca)  # type: ignore[operator]
    return (asr_drop - ca_drop + 1.0) / 2.0


def fidelity(before: StageMetrics, after: StageMetrics) -> float | None:
    """TrojAI fidelity ``((ASR_b - ASR_a) / ASR_b) * (CA_a / CA_b)``; None when undefined."""
    if None in (before.ca, after.ca, before.asr, after.asr) or before.asr == 0 or before.ca == 0:
        return None
    return ((before.asr - after.asr) / before.asr) * (after.ca / before.ca)  # type: ignore[operator]
