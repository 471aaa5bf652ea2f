"""Stage 1b: Neuron Weight Change — how far clean unlearning moved each
convolution output channel, ranked over all ranked layers together.

A neuron is one output channel ``k`` of a Conv2d weight ``[out, in, kh, kw]``;
``NWC_k = sum |W_unlearned[k] - W_0[k]|``. Residual-projection convolutions
(module path containing ``shortcut`` or ``downsample``) are not ranked.
Ties are broken by position: layers in ``named_modules()`` order, then channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from defense_core.errors import InputError, TrainingDivergedError

EXCLUDED_PATH_PARTS = ("shortcut", "downsample")


def _is_conv2d(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return True
    # TorchScript modules keep the class name of what was scripted.
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") == "Conv2d"


def ranked_conv_layers(model: nn.Module) -> list[str]:
    """Module paths of the Conv2d layers whose neurons are ranked, in model order."""
    names = []
    for name, module in model.named_modules():
        if not _is_conv2d(module):
            continue
        if any(part in name for part in EXCLUDED_PATH_PARTS):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 4:
            names.append(name)
    return names


@dataclass(frozen=True)
class NeuronScore:
    layer: str
    channel: int
    nwc: float

    def to_dict(self) -> dict[str, str | int | float]:
        return {"layer": self.layer, "channel": self.channel, "nwc": self.nwc}


@dataclass(frozen=True)
class NeuronRanking:
    """All ranked neurons, largest NWC first.

    ``weight_changes[i]`` is ``|W_unlearned - W_0|`` of ``layers[i]`` (same
    shape as the weight); ``layer_index``/``channel``/``scores`` are aligned
    and sorted by score, descending, ties in position order.
    """

    layers: tuple[str, ...]
    weight_changes: tuple[torch.Tensor, ...]
    layer_index: torch.Tensor   # int64 [N]
    channel: torch.Tensor       # int64 [N]
    scores: torch.Tensor        # float [N]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def top(self, k: int) -> list[NeuronScore]:
        k = min(k, len(self))
        return [
            NeuronScore(self.layers[int(li)], int(ch), float(s))
            for li, ch, s in zip(
                self.layer_index[:k].tolist(), self.channel[:k].tolist(), self.scores[:k].tolist(), strict=True
            )
        ]


def neuron_weight_change(original: torch.Tensor, unlearned: torch.Tensor) -> torch.Tensor:
    """Per output channel L1 of the change of one conv weight: float ``[out]``."""
    return (unlearned.detach() - original.detach()).abs().flatten(1).sum(dim=1)


def rank_neurons(original: nn.Module, unlearned: nn.Module) -> NeuronRanking:
    """Rank every neuron of the ranked conv layers of ``original`` by NWC."""
    layers = ranked_conv_layers(original)
    if not layers:
        raise InputError('the model has no convolution layers to rank: TSBD needs Conv2d layers (try defense "ft")')
    unlearned_modules = dict(unlearned.named_modules())
    original_modules = dict(original.named_modules())
    changes, layer_ids, channels, scores = [], [], [], []
    for i, name in enumerate(layers):
        w0 = original_modules[name].weight.detach()
        w1 = unlearned_modules[name].weight.detach().to(w0.device)
        delta = (w1 - w0).abs()
        changes.append(delta)
        nwc = delta.flatten(1).sum(dim=1)
        scores.append(nwc.to(torch.float64))
        layer_ids.append(torch.full((nwc.shape[0],), i, dtype=torch.int64, device=nwc.device))
        channels.append(torch.arange(nwc.shape[0], dtype=torch.int64, device=nwc.device))
    all_scores = torch.cat(scores)
    if not bool(torch.isfinite(all_scores).all()):
        raise TrainingDivergedError(
            "weight changes are not finite: clean unlearning diverged; try a smaller unlearn_lr"
        )
    # A stable sort keeps equal scores in position order (layer, then channel).
    sorted_scores, order = torch.sort(all_scores, descending=True, stable=True)
    return NeuronRanking(
        layers=tuple(layers),
        weight_changes=tuple(changes),
        layer_index=torch.cat(layer_ids)[order],
        channel=torch.cat(channels)[order],
        scores=sorted_scores,
    )
