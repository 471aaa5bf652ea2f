"""CPU precision choice: bf16 autocast only where a timed step of the model says it pays."""

from __future__ import annotations

import pytest
import torch

from defense_core import device as dev
from defense_core.device import DeviceOptions, bf16_pays, choose_cpu_bf16, make_runtime
from defense_core.registry import create_model
from defense_core.spec import ModelSpec

SPEC = ModelSpec(arch="small_cnn", num_classes=4, in_channels=1, input_size=(16, 16), mean=(0.5,), std=(0.25,))


def test_calibration_leaves_the_model_and_random_streams_untouched() -> None:
    torch.manual_seed(0)
    model = create_model(SPEC).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    use_bf16, fp32_s, _ = choose_cpu_bf16(model, (1, 16, 16))
    assert fp32_s > 0
    assert torch.equal(torch.get_rng_state(), state)
    for name, value in model.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    # a model this small is timed but too fast to be worth bf16
    assert use_bf16 is False


def test_bf16_only_when_clearly_faster() -> None:
    assert bf16_pays(0.10, 0.05)              # 2x faster
    assert bf16_pays(0.31, 0.20)              # just over 1.5x
    assert not bf16_pays(0.10, 0.08)          # 1.25x: not worth leaving fp32
    assert not bf16_pays(0.10, 0.30)          # slower (seen on an AVX512-BF16 Xeon)
    assert not bf16_pays(0.01, 0.001)         # too fast to time reliably


def test_explicit_choice_wins_and_unset_without_a_model_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    model = create_model(SPEC)
    assert make_runtime(DeviceOptions(device="cpu", cpu_bf16=True)).autocast_dtype == torch.bfloat16
    assert make_runtime(DeviceOptions(device="cpu", cpu_bf16=False), model=model,
                        input_shape=(1, 16, 16)).autocast_dtype is None
    assert make_runtime(DeviceOptions(device="cpu")).autocast_dtype is None
    called = []
    monkeypatch.setattr(dev, "choose_cpu_bf16", lambda m, shape: called.append(shape) or (True, 0.1, 0.05))
    runtime = make_runtime(DeviceOptions(device="cpu"), model=model, input_shape=(1, 16, 16))
    assert called == [(1, 16, 16)] and runtime.autocast_dtype == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: False)
    assert make_runtime(DeviceOptions(device="cpu"), model=model, input_shape=(1, 16, 16)).autocast_dtype is None
