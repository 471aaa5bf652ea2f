"""Zero reinitialization: exactly which entries of the ORIGINAL weights become zero."""

from __future__ import annotations

import pytest
import torch

from defense_core.tsbd.config import ReinitConfig
from defense_core.tsbd.nwc import NeuronRanking, rank_neurons
from defense_core.tsbd.reinit import share_count, zero_reinit_
from tests.unit.tsbd_fixtures import hand_built_pair, single_thread  # noqa: F401 (autouse fixture)


def test_share_count_rounding() -> None:
    assert share_count(0.07, 100) == 7          # 0.07 * 100 = 7.000000000000001 in floats
    assert share_count(0.35, 45) == 16          # ceil(15.75)
    assert share_count(0.01, 10) == 1           # at least one
    assert share_count(1.0, 6) == 6
    assert share_count(0.5, 6) == 3


def test_zero_reinit_zeroes_exactly_the_expected_entries_of_theta0() -> None:
    original, unlearned = hand_built_pair()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    unlearned_before = {k: v.clone() for k, v in unlearned.state_dict().items()}
    ranking = rank_neurons(original, unlearned)

    # Top 3 neurons: block.conv#2 (changes 2.0 at offsets 0-4), conv1#0 (0.5 x 9),
    # block.conv#0 (0.5 at offsets 0-8). Pool = 18 + 9 + 18 = 45; ceil(0.35 * 45) = 16:
    # the five 2.0 entries, then the 0.5 ties in pool order: all 9 of conv1#0, then
    # offsets 0 and 1 of block.conv#0.
    result = zero_reinit_(original, ranking, ReinitConfig(neuron_ratio=0.5, weight_ratio=0.35))
    assert (result.neurons_zeroed, result.weights_zeroed) == (3, 16)
    assert result.to_dict() == {"neuron_ratio": 0.5, "weight_ratio": 0.35, "neurons_zeroed": 3, "weights_zeroed": 16}

    expected_conv1 = before["conv1.weight"].clone()
    expected_conv1[0] = 0.0
    expected_block = before["block.conv.weight"].clone().flatten(1)
    expected_block[2, :5] = 0.0
    expected_block[0, :2] = 0.0
    after = original.state_dict()
    torch.testing.assert_close(after["conv1.weight"], expected_conv1, rtol=0, atol=0)
    torch.testing.assert_close(after["block.conv.weight"], expected_block.view(4, 2, 3, 3), rtol=0, atol=0)
    for key in before:
        if key not in ("conv1.weight", "block.conv.weight"):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    # The unlearned model is only read.
    for key, value in unlearned.state_dict().items():
        torch.testing.assert_close(value, unlearned_before[key], rtol=0, atol=0)


def test_zero_reinit_single_neuron_minimum() -> None:
    original, unlearned = hand_built_pair()
    ranking = rank_neurons(original, unlearned)
    # ceil(0.01 * 6) -> 1 neuron (block.conv#2, 18 weights); ceil(0.7 * 18) = 13 entries:
    # the five 2.0 changes, then 8 zero-change entries in offset order 5..12.
    result = zero_reinit_(original, ranking, ReinitConfig(neuron_ratio=0.01, weight_ratio=0.7))
    assert (result.neurons_zeroed, result.weights_zeroed) == (1, 13)
    row = original.block.conv.weight.detach().flatten(1)[2]
    assert torch.equal(row[:13] == 0, torch.ones(13, dtype=torch.bool))
    assert bool((row[13:] != 0).all())


def _ranking_from_scores(scores: list[float]) -> NeuronRanking:
    s = torch.tensor(scores, dtype=torch.float64)
    sorted_s, order = torch.sort(s, descending=True, stable=True)
    return NeuronRanking(
        layers=("conv",), weight_changes=(torch.zeros(len(scores), 1, 1, 1),),
        layer_index=torch.zeros(len(scores), dtype=torch.int64), channel=order, scores=sorted_s,
    )


def test_zero_reinit_refuses_auto_which_is_chosen_from_the_clean_data() -> None:
    ranking = _ranking_from_scores([float(v) for v in range(1, 101)])
    with pytest.raises(ValueError, match="choose_neuron_ratio"):
        zero_reinit_(torch.nn.Sequential(), ranking, ReinitConfig(neuron_ratio="auto"))


def test_reinit_config_validation() -> None:
    for bad in (0.0, 1.5, -0.1, "most", True):
        with pytest.raises(ValueError):
            ReinitConfig(neuron_ratio=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ReinitConfig(weight_ratio=0.0)
