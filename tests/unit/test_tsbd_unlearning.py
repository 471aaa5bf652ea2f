"""Clean unlearning: the stop rule (first check at or below tau), the check
schedule, the caps, cancellation between steps, and a real ascent run."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import pytest
import torch

import defense_core.tsbd.unlearning as unlearning
from defense_core.errors import Cancelled
from defense_core.metrics import accuracy
from defense_core.transforms import NO_AUGMENT, Normalizer
from defense_core.tsbd.config import UnlearnConfig
from defense_core.tsbd.unlearning import unlearn_
from tests.unit.tsbd_fixtures import SPEC, TinyNet, quadrant_set, single_thread, trained_tiny  # noqa: F401 (autouse fixture)


class Recorder:
    def __init__(self) -> None:
        self.updates: list[dict] = []

    def update(self, *, stage, step, total, metrics=None) -> None:
        self.updates.append({"stage": stage, "step": step, "total": total, "metrics": dict(metrics or {})})


def _scripted_accuracy(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> list[int]:
    """Replace the accuracy check with a script; returns the sizes of the sets it was asked about."""
    seq: Iterator[float] = iter(values)
    sizes: list[int] = []

    def fake(model, images, labels, **kwargs) -> float:
        sizes.append(int(images.shape[0]))
        return next(seq)

    monkeypatch.setattr(unlearning, "accuracy", fake)
    return sizes


def _run(data_size: int, config: UnlearnConfig, *, batch_size: int, reporter=None, cancel=None):
    return unlearn_(
        TinyNet(), quadrant_set(data_size), spec=SPEC, config=config, augment=NO_AUGMENT,
        batch_size=batch_size, generator=torch.Generator().manual_seed(0), reporter=reporter, cancel=cancel,
    )


def test_stops_at_first_check_at_or_below_tau(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _scripted_accuracy(monkeypatch, [0.9, 0.5, 0.1, 0.05])
    result = _run(600, UnlearnConfig(stop_acc=0.1), batch_size=256)  # 3 steps per epoch
    assert (result.checks, result.epochs, result.steps) == (3, 3, 9)
    assert result.final_clean_acc == 0.1 and result.reached_stop_acc
    assert sizes == [600, 600, 600]  # once per epoch, on all of D


def test_default_tau_is_chance_level(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted_accuracy(monkeypatch, [0.30, 0.26, 0.25])
    result = _run(64, UnlearnConfig(), batch_size=256)
    assert result.threshold == 0.25 and result.checks == 3 and result.steps == 3


def test_large_clean_set_adds_subset_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 600 images, batch 128: 5 steps per epoch; subset of 256 -> a check every 2 steps,
    # plus the full check at the end of each epoch.
    sizes = _scripted_accuracy(monkeypatch, [0.9, 0.8, 0.7, 0.6, 0.05])
    result = _run(600, UnlearnConfig(stop_acc=0.1, check_samples=256), batch_size=128)
    assert sizes == [256, 256, 600, 256, 256]
    assert (result.epochs, result.steps, result.checks) == (2, 9, 5)


def test_step_cap_ends_unlearning(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted_accuracy(monkeypatch, [0.9] * 100)
    result = _run(64, UnlearnConfig(stop_acc=0.1, max_steps=4), batch_size=256)
    assert result.steps == 4 and not result.reached_stop_acc
    # A cap hit mid-epoch still reports a measured accuracy (one extra check on all of D).
    sizes = _scripted_accuracy(monkeypatch, [0.9] * 100)
    result = _run(600, UnlearnConfig(stop_acc=0.1, max_steps=2), batch_size=256)
    assert (result.steps, result.checks, result.final_clean_acc) == (2, 1, 0.9) and sizes == [600]
    result = _run(64, UnlearnConfig(stop_acc=0.1, max_epochs=3), batch_size=256)
    assert result.steps == 3 and result.epochs == 3 and not result.reached_stop_acc


def test_cancellation_raises_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted_accuracy(monkeypatch, [0.9] * 100)
    asked = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) >= 3

    recorder = Recorder()
    with pytest.raises(Cancelled):
        _run(64, UnlearnConfig(stop_acc=0.1), batch_size=256, reporter=recorder, cancel=cancel)
    assert [u["step"] for u in recorder.updates] == [1, 2]
    assert all(u["stage"] == "unlearning" for u in recorder.updates)


@functools.lru_cache(maxsize=1)
def _trained() -> TinyNet:
    return trained_tiny()


def test_real_ascent_reaches_chance_level_and_reports_it() -> None:
    model = copy.deepcopy(_trained())
    clean = quadrant_set(200, seed=3)
    normalizer = Normalizer(SPEC)
    assert accuracy(model, clean.x, clean.y, normalizer=normalizer) > 0.9
    original = copy.deepcopy(model)
    recorder = Recorder()
    result = unlearn_(
        model, clean, spec=SPEC, config=UnlearnConfig(lr=1e-2), batch_size=256,
        generator=torch.Generator().manual_seed(0), reporter=recorder,
    )
    assert result.reached_stop_acc and result.final_clean_acc <= 0.25
    assert result.steps == result.epochs == result.checks  # 200 images: one step per epoch
    # The reported accuracy is the eval-mode accuracy of the unlearned weights on D.
    assert accuracy(model, clean.x, clean.y, normalizer=normalizer) == result.final_clean_acc
    assert model.training  # mode left as unlearning uses it
    assert not torch.equal(model.conv1.weight, original.conv1.weight)
    assert recorder.updates[-1]["metrics"]["clean_acc"] == result.final_clean_acc
