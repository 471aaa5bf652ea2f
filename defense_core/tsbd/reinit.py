"""Stage 1c: zero reinitialization of the ORIGINAL weights.

Take the top ``ceil(n * N)`` ranked neurons (at least one); pool the
per-weight changes ``|W_unlearned - W_0|`` of exactly those neurons, in
ranking order and, within a neuron, in flat ``(in, kh, kw)`` order; zero the
``ceil(m * pool)`` largest (at least one). Ties are broken by pool position,
so the choice is deterministic: a stable descending sort of the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from defense_core.tsbd.config import ReinitConfig
from defense_core.tsbd.nwc import NeuronRanking


@dataclass(frozen=True)
class ReinitResult:
    neuron_ratio: float
    weight_ratio: float
    neurons_zeroed: int   # neurons selected (their weights were candidates)
    weights_zeroed: int   # weight entries set to zero

    def to_dict(self) -> dict[str, float | int]:
        return {
            "neuron_ratio": self.neuron_ratio,
            "weight_ratio": self.weight_ratio,
            "neurons_zeroed": self.neurons_zeroed,
            "weights_zeroed": self.weights_zeroed,
        }


def share_count(ratio: float, total: int) -> int:
    """``ceil(ratio * total)`` clamped to ``[1, total]``; the product is rounded to
    9 decimals first so that e.g. 0.07 * 100 gives 7, not 8."""
    return min(total, max(1, math.ceil(round(ratio * total, 9))))


def select_weights(
    ranking: NeuronRanking, *, num_neurons: int, weight_ratio: float
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The entries to zero, per ranked layer index: ``(channel, flat offset)`` int64 pairs."""
    layer_ids = ranking.layer_index[:num_neurons].tolist()
    channels = ranking.channel[:num_neurons].tolist()
    pieces = [ranking.weight_changes[li][ch].reshape(-1) for li, ch in zip(layer_ids, channels, strict=True)]
    sizes = torch.tensor([p.numel() for p in pieces], dtype=torch.int64)
    pool = torch.cat([p.to(torch.float64).cpu() for p in pieces])
    count = share_count(weight_ratio, pool.numel())
    chosen = torch.sort(pool, descending=True, stable=True).indices[:count]
    # Pool position -> (neuron rank, offset within that neuron's weights).
    starts = torch.cumsum(sizes, 0) - sizes
    neuron_rank = torch.repeat_interleave(torch.arange(len(pieces)), sizes)[chosen]
    offset = chosen - starts[neuron_rank]
    layer_of = torch.tensor(layer_ids, dtype=torch.int64)[neuron_rank]
    channel_of = torch.tensor(channels, dtype=torch.int64)[neuron_rank]
    selection: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for li in sorted(set(layer_of.tolist())):
        mask = layer_of == li
        selection[li] = (channel_of[mask], offset[mask])
    return selection


def zero_reinit_(model: nn.Module, ranking: NeuronRanking, config: ReinitConfig = ReinitConfig()) -> ReinitResult:
    """Zero the selected weights of ``model`` (the original weights) in place.

    ``config.neuron_ratio`` must be a number: ``"auto"`` is chosen from the clean data
    (:func:`defense_core.tsbd.choose_n.choose_neuron_ratio`, as the pipeline does) and
    refused here, so that "auto" means one rule."""
    if config.neuron_ratio == "auto":
        raise ValueError('neuron_ratio="auto" is chosen from the clean data: call '
                         "defense_core.tsbd.choose_n.choose_neuron_ratio and pass the ratio it returns")
    ratio = float(config.neuron_ratio)
    num_neurons = share_count(ratio, len(ranking))
    selection = select_weights(ranking, num_neurons=num_neurons, weight_ratio=config.weight_ratio)
    modules = dict(model.named_modules())
    zeroed = 0
    with torch.no_grad():
        for li, (channel, offset) in selection.items():
            weight = modules[ranking.layers[li]].weight
            inner = torch.unravel_index(offset, tuple(weight.shape[1:]))
            index = (channel.to(weight.device), *(i.to(weight.device) for i in inner))
            weight[index] = 0
            zeroed += int(channel.numel())
    return ReinitResult(
        neuron_ratio=ratio, weight_ratio=float(config.weight_ratio),
        neurons_zeroed=num_neurons, weights_zeroed=zeroed,
    )
