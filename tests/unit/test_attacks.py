"""Triggers: shapes, determinism, exact pixels, spec validation, poisoned test sets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from defense_core.attacks import TriggerSpec, apply_trigger, available_triggers, make_poisoned_test_set
from defense_core.attacks.families.blended import BlendedParams, blend_pattern
from defense_core.attacks.families.wanet import WaNetParams, wanet_cross, warp_grid
from defense_core.errors import DatasetError, InputError
from defense_core.imageset import ImageSet


def _batch(n: int = 3, c: int = 1, h: int = 32, w: int = 32, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.int64).to(torch.uint8)


def test_registry_lists_the_four_families() -> None:
    assert available_triggers() == ["badnets", "blended", "sig", "wanet"]


@pytest.mark.parametrize("kind", ["badnets", "blended", "sig", "wanet"])
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (1, 3, 20, 36)])
def test_trigger_shape_dtype_determinism(kind: str, shape: tuple[int, ...]) -> None:
    x = _batch(*shape)
    before = x.clone()
    trigger = TriggerSpec.from_dict({"type": kind, "target": 0})
    out = apply_trigger(x, trigger)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(x, before), "the input must not be modified"
    assert not torch.equal(out, x), "the trigger must change the images"
    assert torch.equal(out, apply_trigger(x, trigger)), "triggers are deterministic"


@pytest.mark.parametrize("kind", ["badnets", "blended", "sig", "wanet"])
def test_trigger_is_per_image(kind: str) -> None:
    # Triggering a batch equals triggering each image alone.
    x = _batch(4, 3, 32, 32)
    trigger = TriggerSpec.from_dict({"type": kind, "target": 1})
    whole = apply_trigger(x, trigger)
    for i in range(len(x)):
        assert torch.equal(whole[i : i + 1], apply_trigger(x[i : i + 1], trigger))


def test_trigger_rejects_non_uint8() -> None:
    trigger = TriggerSpec.from_dict({"type": "badnets", "target": 0})
    with pytest.raises(InputError, match="uint8"):
        apply_trigger(torch.zeros(1, 1, 8, 8), trigger)


@pytest.mark.parametrize(("side", "expected"), [(32, 3), (28, 3), (64, 6), (96, 9), (16, 3)])
def test_badnets_square_exactly_bottom_right(side: int, expected: int) -> None:
    x = torch.full((2, 3, side, side), 7, dtype=torch.uint8)
    out = apply_trigger(x, TriggerSpec.from_dict({"type": "badnets", "target": 0}))
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[side - expected :, side - expected :] = True
    assert bool((out[..., mask] == 255).all())
    assert bool((out[..., ~mask] == 7).all())


def test_badnets_explicit_size_and_value() -> None:
    x = torch.zeros(1, 1, 10, 12, dtype=torch.uint8)
    out = apply_trigger(x, TriggerSpec.from_dict({"type": "badnets", "target": 0, "size": 2, "value": 128}))
    assert int(out.sum()) == 4 * 128
    assert torch.equal(out[0, 0, 8:, 10:], torch.full((2, 2), 128, dtype=torch.uint8))


def test_blended_formula_on_known_pixels() -> None:
    params = BlendedParams(alpha=0.2, seed=3)
    pattern = blend_pattern(params, (1, 4, 4))
    x = torch.tensor([0, 50, 100, 255], dtype=torch.uint8).repeat(4, 1).view(1, 1, 4, 4)
    out = apply_trigger(x, TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 0.2, "seed": 3}))
    for i in range(4):
        for j in range(4):
            expected = round(0.8 * int(x[0, 0, i, j]) + 0.2 * int(pattern[0, i, j]) + 1e-9)
            assert int(out[0, 0, i, j]) == expected


def test_blended_alpha_extremes_and_seeds() -> None:
    x = _batch(2, 3, 8, 8)
    one = apply_trigger(x, TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 1.0, "seed": 5}))
    assert torch.equal(one, blend_pattern(BlendedParams(alpha=1.0, seed=5), (3, 8, 8)).expand_as(x))
    zero = apply_trigger(x, TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 0.0}))
    assert torch.equal(zero, x)
    assert not torch.equal(
        blend_pattern(BlendedParams(seed=1), (1, 8, 8)), blend_pattern(BlendedParams(seed=2), (1, 8, 8))
    )


def test_blended_with_a_given_pattern_image() -> None:
    # a 2x2 grayscale pattern on 2x2 images: no resizing, the formula pixel by pixel
    x = torch.tensor([[0, 100], [200, 255]], dtype=torch.uint8).view(1, 1, 2, 2)
    spec = TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 0.5, "pattern": [[255, 0], [10, 50]]})
    assert apply_trigger(x, spec)[0, 0].tolist() == [[128, 50], [105, 152]]  # (x + p) / 2, halves round to even
    # the same image as RGB values [H][W][3] on 3-channel images, and as a grey pattern repeated over channels
    rgb = TriggerSpec.from_dict(
        {"type": "blended", "target": 0, "alpha": 1.0, "pattern": [[[255, 0, 9], [0, 0, 0]], [[1, 2, 3], [4, 5, 6]]]}
    )
    out = apply_trigger(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), rgb)
    assert out[0, :, 0, 0].tolist() == [255, 0, 9] and out[0, :, 1, 1].tolist() == [4, 5, 6]
    grey = TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 1.0, "pattern": [[7, 7], [7, 7]]})
    assert bool((apply_trigger(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), grey) == 7).all())
    # a colour pattern on grayscale images: BT.601 luma, 0.299 * 255 = 76.2
    red = TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 1.0, "pattern": [[[255, 0, 0]]]})
    assert bool((apply_trigger(torch.zeros(1, 1, 3, 3, dtype=torch.uint8), red) == 76).all())
    # a constant pattern stays constant when resized, and the spec round-trips through JSON
    big = TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 1.0, "pattern": [[90] * 3] * 4})
    assert bool((apply_trigger(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), big) == 90).all())
    assert TriggerSpec.from_dict(json.loads(json.dumps(big.to_dict()))) == big


def test_blended_pattern_resizing_keeps_structure() -> None:
    # left half black, right half white, downsampled 2x: the halves stay black and white
    pattern = [[0] * 8 + [255] * 8 for _ in range(16)]
    spec = TriggerSpec.from_dict({"type": "blended", "target": 0, "alpha": 1.0, "pattern": pattern})
    out = apply_trigger(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), spec)[0, 0]
    assert out[:, :3].max() == 0 and out[:, 5:].min() == 255 and out[:, 3].max() < out[:, 4].min()


def test_blended_without_a_pattern_keeps_its_json_form() -> None:
    spec = TriggerSpec.from_dict({"type": "blended", "target": 0})
    assert spec.to_dict() == {"type": "blended", "target": 0, "alpha": 0.2, "seed": 0}


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("kitty.png", "list of 1 to 64 rows"),
        ([], "list of 1 to 64 rows"),
        ([[0] * 65], "1 to 64 pixels"),
        ([[0] * 3] * 65, "list of 1 to 64 rows"),
        ([[0, 0], [0]], "row 1 has 1 pixels"),
        ([[0, 256]], "integers in \\[0, 255\\]"),
        ([[0, -1]], "integers in"),
        ([[0.5, 1]], "integers in"),
        ([[True, 1]], "integers in"),
        ([[[1, 2]]], "1 or 3 channels, got 2"),
        ([[[1, 2, 3], 4]], "list of 3 channel values"),
    ],
)
def test_blended_pattern_validation(pattern: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TriggerSpec.from_dict({"type": "blended", "target": 0, "pattern": pattern})


def test_blended_pattern_channels_must_fit_the_images() -> None:
    spec = TriggerSpec.from_dict({"type": "blended", "target": 0, "pattern": [[[1, 2, 3]]]})
    with pytest.raises(InputError, match="3 channels, the images have 2"):
        apply_trigger(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), spec)


def test_sig_exact_pixels_with_clipping() -> None:
    # width 24, 6 periods: column j has phase 2*pi*j/4, so columns 0, 1, 2, 3 get 0, +40, 0, -40.
    x = torch.tensor([[100] * 24, [230] * 24, [10] * 24], dtype=torch.uint8).view(1, 1, 3, 24)
    out = apply_trigger(x, TriggerSpec.from_dict({"type": "sig", "target": 0}))
    assert out[0, 0, :, 0].tolist() == [100, 230, 10]
    assert out[0, 0, :, 1].tolist() == [140, 255, 50]  # 230 + 40 clipped to 255
    assert out[0, 0, :, 2].tolist() == [100, 230, 10]
    assert out[0, 0, :, 3].tolist() == [60, 190, 0]  # 10 - 40 clipped to 0
    # an off-peak column: 100 + 40 * sin(2*pi*5*6/24)
    assert int(out[0, 0, 0, 5]) == round(100 + 40 * math.sin(2 * math.pi * 5 * 6 / 24))


def test_wanet_identity_when_strength_zero() -> None:
    x = _batch(3, 3, 32, 32)
    out = apply_trigger(x, TriggerSpec.from_dict({"type": "wanet", "target": 0, "s": 0}))
    assert torch.equal(out, x)


def test_wanet_field_is_seeded_and_bounded() -> None:
    a = warp_grid(WaNetParams(seed=1), 28, 28)
    assert a.shape == (1, 28, 28, 2)
    assert float(a.abs().max()) <= 1.0
    assert torch.equal(a, warp_grid(WaNetParams(seed=1), 28, 28))
    assert not torch.equal(a, warp_grid(WaNetParams(seed=2), 28, 28))
    # the warp is small: at most s * max|field| / H away from the identity grid
    identity = warp_grid(WaNetParams(s=0.0), 28, 28)
    assert 0 < float((a - identity).abs().max()) < 0.5


def test_wanet_cross_samples_differ_from_backdoor_warp() -> None:
    x = _batch(4, 1, 28, 28)
    params = WaNetParams()
    cross = wanet_cross(x, params, generator=torch.Generator().manual_seed(0))
    backdoor = apply_trigger(x, TriggerSpec.from_dict({"type": "wanet", "target": 0}))
    assert cross.dtype == torch.uint8 and cross.shape == x.shape
    assert not torch.equal(cross, backdoor)
    again = wanet_cross(x, params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cross, again)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "nope", "target": 0}, "known: badnets, blended, sig, wanet"),
        ({"type": "badnets"}, "'type' and 'target'"),
        ({"type": "badnets", "target": -1}, "target"),
        ({"type": "badnets", "target": True}, "target"),
        ({"type": "badnets", "target": 0, "size": 0}, "badnets.size"),
        ({"type": "badnets", "target": 0, "size": 2.5}, "integer"),
        ({"type": "badnets", "target": 0, "value": 256}, "badnets.value"),
        ({"type": "blended", "target": 0, "alpha": 1.5}, "blended.alpha"),
        ({"type": "blended", "target": 0, "alpha": float("nan")}, "blended.alpha"),
        ({"type": "blended", "target": 0, "alpha": "0.2"}, "must be a number"),
        ({"type": "sig", "target": 0, "delta": -1}, "sig.delta"),
        ({"type": "wanet", "target": 0, "k": 1}, "wanet.k"),
        ({"type": "wanet", "target": 0, "grid": 4}, "unknown parameters"),
        ([1, 2], "JSON object"),
    ],
)
def test_trigger_spec_validation(data: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TriggerSpec.from_dict(data)  # type: ignore[arg-type]


def test_trigger_spec_round_trip() -> None:
    spec = TriggerSpec.from_dict({"type": "wanet", "target": 3, "k": 8, "s": 1.0})
    assert spec.to_dict() == {"type": "wanet", "target": 3, "k": 8, "s": 1.0, "seed": 0, "cross_ratio": 2.0}
    assert TriggerSpec.from_dict(spec.to_dict()) == spec


def test_poisoned_test_set_excludes_target_class() -> None:
    x = _batch(10, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 3, 0, 4, 5, 6, 0])
    trigger = TriggerSpec.from_dict({"type": "badnets", "target": 0})
    poisoned = make_poisoned_test_set(ImageSet(x=x, y=y), trigger)
    assert poisoned.y.tolist() == [1, 2, 3, 4, 5, 6]
    assert poisoned.target is not None and poisoned.target.tolist() == [0] * 6
    kept = torch.tensor([1, 2, 4, 6, 7, 8])
    assert torch.equal(poisoned.x, apply_trigger(x[kept], trigger))


def test_poisoned_test_set_needs_non_target_images() -> None:
    data = ImageSet(x=_batch(3, 1, 8, 8), y=torch.tensor([2, 2, 2]))
    with pytest.raises(DatasetError, match="target class 2"):
        make_poisoned_test_set(data, TriggerSpec.from_dict({"type": "sig", "target": 2}))
