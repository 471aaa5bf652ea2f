"""CPU precision choice: bf16 autocast only where a timed step of the model says it pays."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from defense_core import cpu_mode, cpu_mode_cache
from defense_core.cpu_mode import choose_cpu_mode, mode_pays
from defense_core.device import DeviceOptions, make_runtime
from defense_core.registry import create_model
from defense_core.spec import ModelSpec

SPEC = ModelSpec(arch="small_cnn", num_classes=4, in_channels=1, input_size=(16, 16), mean=(0.5,), std=(0.25,))


def test_calibration_leaves_the_model_and_random_streams_untouched() -> None:
    torch.manual_seed(0)
    model = create_model(SPEC).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    mode, times = choose_cpu_mode(model, (1, 16, 16))
    assert times["fp32"] > 0 and "channels_last" in times
    assert torch.equal(torch.get_rng_state(), state)
    for name, value in model.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    # the choice follows the rule for the measured times (on a quiet machine a model
    # this small is too fast to time and stays fp32; on a loaded one it may not be)
    paying = [m for m in times if m == "fp32" or mode_pays(m, times["fp32"], times[m])]
    assert mode == min(paying, key=times.__getitem__)


def test_bf16_only_when_clearly_faster() -> None:
    assert mode_pays("bf16", 0.10, 0.05)                   # 2x faster
    assert mode_pays("channels_last+bf16", 0.31, 0.20)     # just over 1.5x
    assert not mode_pays("bf16", 0.10, 0.08)               # 1.25x: not worth leaving fp32
    assert not mode_pays("bf16", 0.10, 0.30)               # slower (seen on an AVX512-BF16 Xeon)
    assert not mode_pays("bf16", 0.01, 0.001)              # too fast to time reliably
    assert mode_pays("channels_last", 0.10, 0.08)          # layout only: 1.25x is enough
    assert not mode_pays("channels_last", 0.10, 0.096)     # 4% (the Xeon): not enough


@pytest.fixture(autouse=True)
def fresh_mode_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no remembered CPU mode choices."""
    monkeypatch.setattr(cpu_mode_cache, "_PROCESS_CACHES", {})


def test_explicit_choice_wins_and_unset_without_a_model_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_mode, "cpu_supports_bf16", lambda: True)
    model = create_model(SPEC)
    assert make_runtime(DeviceOptions(device="cpu", cpu_bf16=True)).autocast_dtype == torch.bfloat16
    assert make_runtime(DeviceOptions(device="cpu", cpu_bf16=False), model=model,
                        input_shape=(1, 16, 16)).autocast_dtype is None
    assert make_runtime(DeviceOptions(device="cpu")).autocast_dtype is None
    called = []

    def fake_choice(m, shape, *, bf16, channels_last):
        called.append((shape, bf16, channels_last))
        return "channels_last+bf16", {}

    monkeypatch.setattr(cpu_mode, "choose_cpu_mode", fake_choice)
    runtime = make_runtime(DeviceOptions(device="cpu"), model=model, input_shape=(1, 16, 16))
    assert called == [((1, 16, 16), None, None)]
    assert runtime.autocast_dtype == torch.bfloat16 and runtime.channels_last
    # a pinned choice is passed on, so only modes that respect it are timed
    make_runtime(DeviceOptions(device="cpu", channels_last=False), model=model, input_shape=(1, 16, 16))
    assert called[-1] == ((1, 16, 16), None, False)
    # both pinned: nothing is timed
    make_runtime(DeviceOptions(device="cpu", cpu_bf16=False, channels_last=False), model=model,
                 input_shape=(1, 16, 16))
    assert len(called) == 2


def test_modes_respect_pins_and_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model(SPEC)
    monkeypatch.setattr(cpu_mode, "cpu_supports_bf16", lambda: False)
    _, times = choose_cpu_mode(model, (1, 16, 16))
    assert set(times) == {"fp32", "channels_last"}       # no bf16 timing without native bf16
    mode, times = choose_cpu_mode(model, (1, 16, 16), channels_last=False)
    assert (mode, times) == ("fp32", {})                  # one mode left: nothing to time


def test_cpu_mode_is_timed_once_per_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model(SPEC)
    answers = iter(["channels_last", "fp32", "fp32"])
    calls = []

    def flaky_choice(m, shape, *, bf16, channels_last):  # what a loaded machine may do
        calls.append(shape)
        return next(answers), {"fp32": 0.1}

    monkeypatch.setattr(cpu_mode, "choose_cpu_mode", flaky_choice)
    first = make_runtime(DeviceOptions(device="cpu"), model=model, input_shape=(1, 16, 16))
    again = make_runtime(DeviceOptions(device="cpu"), model=create_model(SPEC), input_shape=(1, 16, 16))
    assert first.channels_last and again == first and calls == [(1, 16, 16)]
    # another workload (input shape) is timed on its own
    other = make_runtime(DeviceOptions(device="cpu"), model=model, input_shape=(1, 20, 20))
    assert not other.channels_last and calls == [(1, 16, 16), (1, 20, 20)]


def test_cpu_mode_choice_is_shared_through_the_cache_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "modes" / "cpu-modes.json"
    model = create_model(SPEC)
    monkeypatch.setattr(cpu_mode, "choose_cpu_mode", lambda *a, **k: ("channels_last", {"fp32": 0.1}))
    mode, times = cpu_mode_cache.remembered_cpu_mode(model, (1, 16, 16), cache=cpu_mode_cache.CpuModeCache(path))
    assert mode == "channels_last" and times
    # a new process (a fresh cache on the same file) reuses it without timing
    monkeypatch.setattr(cpu_mode, "choose_cpu_mode", lambda *a, **k: pytest.fail("timed again"))
    assert cpu_mode_cache.remembered_cpu_mode(model, (1, 16, 16), cache=cpu_mode_cache.CpuModeCache(path)) == (
        "channels_last",
        {},
    )
    runtime = make_runtime(DeviceOptions(device="cpu", mode_cache=str(path)), model=model, input_shape=(1, 16, 16))
    assert runtime.channels_last


def test_cpu_mode_cache_file_that_is_not_ours_counts_as_empty(tmp_path) -> None:
    path = tmp_path / "cpu-modes.json"
    for text in ("not json", "[1, 2]", '{"k": "turbo"}'):
        path.write_text(text)
        cache = cpu_mode_cache.CpuModeCache(path)
        assert cache.get("k") is None
        assert cache.put("k", "fp32") == "fp32"
        assert cpu_mode_cache.CpuModeCache(path).get("k") == "fp32"


def test_cpu_mode_cache_is_bounded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_mode_cache.CpuModeCache, "MAX_ENTRIES", 3)
    cache = cpu_mode_cache.CpuModeCache(tmp_path / "cpu-modes.json")
    for i in range(5):
        cache.put(f"k{i}", "fp32")
    assert len(cache._memory) == 3 and cache.get("k4") == "fp32"
    assert sorted(cpu_mode_cache.CpuModeCache(tmp_path / "cpu-modes.json")._read_file()) == ["k2", "k3", "k4"]


def test_cpu_mode_stored_by_another_process_meanwhile_wins(tmp_path) -> None:
    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "cpu-modes.json"
    result: list[str] = []
    # another process holds the file while it stores the choice it timed for the same workload
    with open(tmp_path / "cpu-modes.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        storing = threading.Thread(target=lambda: result.append(cpu_mode_cache.CpuModeCache(path).put("k", "fp32")))
        storing.start()
        storing.join(0.3)
        assert storing.is_alive() and not result  # waits instead of writing its own choice
        path.write_text(json.dumps({"k": "channels_last"}))
        fcntl.flock(lock, fcntl.LOCK_UN)
    storing.join(10)
    assert result == ["channels_last"]
    assert cpu_mode_cache.CpuModeCache(path).get("k") == "channels_last"


def test_cpu_mode_cache_that_cannot_be_written_still_answers(tmp_path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    cache = cpu_mode_cache.CpuModeCache(tmp_path / "not-a-dir" / "cpu-modes.json")  # neither lock nor file can be made
    assert cache.put("k", "bf16") == "bf16" and cache.get("k") == "bf16"
