"""Screening: known answers for each signal, monotone score, tiny clean/backdoored models, the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from defense_core.errors import Cancelled
from defense_core.screening import (
    CollapseConfig,
    MarginConfig,
    ScreeningConfig,
    class_statistics,
    collapse_shares,
    combine,
    margin_of,
    max_margins,
    screen,
)
from defense_core.screening.combine import DATA_FREE, THRESHOLDS_WITH_CLEAN, WITH_CLEAN, sigmoid
from defense_core.screening.stats import fit_gamma, max_order_pvalue
from defense_core.spec import ModelSpec
from tests.unit.digits_fixtures import DIGITS_SPEC, TARGET

FAST = ScreeningConfig(margin=MarginConfig(images_per_class=4, steps=40),
                       collapse=CollapseConfig())  # the default unlearning: 8x8 digits reach tau in 100-250 steps


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------- statistics

def test_gamma_fit_recovers_shape_and_scale() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sample = torch.distributions.Gamma(torch.tensor(25.0), torch.tensor(1.0)).sample((20000,)).double()
    fit = fit_gamma(sample)  # every value is far above 0.5 std, so the location stays 0
    assert fit.loc == 0.0
    assert math.isclose(fit.shape * fit.scale, float(sample.mean()), rel_tol=1e-9)  # MLE: mean = k * theta
    assert fit.shape == pytest.approx(25.0, rel=0.05) and fit.scale == pytest.approx(1.0, rel=0.05)


def test_gamma_fit_and_tail_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    values = torch.tensor([3.1, 4.0, 2.2, 5.5, 3.3, 4.8, 2.9, 3.7, 4.1], dtype=torch.float64)
    fit = fit_gamma(values)
    shape, _, scale = stats.gamma.fit((values - fit.loc).numpy(), floc=0)
    assert fit.shape == pytest.approx(shape, rel=1e-4) and fit.scale == pytest.approx(scale, rel=1e-4)
    assert fit.sf(7.0) == pytest.approx(stats.gamma.sf(7.0, fit.shape, loc=fit.loc, scale=fit.scale), rel=1e-9)


def test_max_order_pvalue_is_one_minus_cdf_to_the_k() -> None:
    fit = fit_gamma(torch.tensor([1.0, 2.0, 3.0, 4.0, 2.5, 1.5]))
    tail = fit.sf(6.0)
    assert math.isclose(max_order_pvalue(fit, 6.0, 10), 1 - (1 - tail) ** 10, rel_tol=1e-9)
    assert max_order_pvalue(fit, fit.loc - 1, 10) == 1.0


# ---------------------------------------------------------------- maximum margin

class FixedLogits(nn.Module):
    """Logits independent of the input except through one learnable-free bias: class c wins by a known margin."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.scale = nn.Parameter(torch.ones(()))  # the engine reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) * self.scale + 0 * x.flatten(1).sum(1, keepdim=True)


class MeanGain(nn.Module):
    """logit_c = gain_c * mean(model input): each class's best margin has a closed form."""

    def __init__(self, gains: torch.Tensor) -> None:
        super().__init__()
        self.gains = nn.Parameter(gains.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1, keepdim=True) * self.gains


def test_margin_of_rows() -> None:
    logits = torch.tensor([[1.0, 4.0, 2.0], [5.0, 0.0, 1.0]])
    assert margin_of(logits, torch.tensor([1, 1])).tolist() == [2.0, -5.0]


def test_max_margin_statistic_and_pvalue_known_answer() -> None:
    # class 2 wins by exactly 5 over the best other class whatever the input; every other class loses
    logits = torch.tensor([0.0, 1.0, 6.0, 0.5, 0.2])
    spec = ModelSpec(arch="small_cnn", num_classes=5, in_channels=1, input_size=(8, 8), mean=(0.5,), std=(0.5,))
    result = max_margins(FixedLogits(logits), spec, MarginConfig(images_per_class=2, steps=3))
    expected = torch.tensor([0.0 - 6.0, 1.0 - 6.0, 6.0 - 1.0, 0.5 - 6.0, 0.2 - 6.0], dtype=torch.float64)
    torch.testing.assert_close(result.margins, expected)
    assert result.top_class == 2
    others = torch.cat([expected[:2], expected[3:]])
    fit = fit_gamma(others)
    assert math.isclose(result.pvalue, max_order_pvalue(fit, 5.0, 5), rel_tol=1e-4)  # float32 logits
    assert result.pvalue < 1e-6  # 5 is far outside the null of [-6, -5, -5.5, -5.8]


def test_max_margin_optimizes_the_input() -> None:
    # pixels in [0, 1], mean 0.5 and std 0.5: the model sees m = mean(input) in [-1, 1], logits m * (3, -1, 0.5).
    # class 0: 3m - 0.5m, best 2.5 at m = 1; class 1: -m - 0.5m... at m = -1 logits (-3, 1, -0.5): 1.5;
    # class 2: 0.5m - max(3m, -m) <= 0, best 0 at m = 0.
    spec = ModelSpec(arch="small_cnn", num_classes=3, in_channels=1, input_size=(8, 8), mean=(0.5,), std=(0.5,))
    net = MeanGain(torch.tensor([3.0, -1.0, 0.5]))
    result = max_margins(net, spec, MarginConfig(images_per_class=3, steps=200, lr=0.05))
    torch.testing.assert_close(result.margins, torch.tensor([2.5, 1.5, 0.0], dtype=torch.float64),
                               atol=2e-2, rtol=0)
    assert result.top_class == 0
    assert net.gains.grad is None  # the weights get no gradient


def test_class_statistics_needs_three_classes() -> None:
    with pytest.raises(ValueError):
        class_statistics(torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------- collapse

def test_collapse_share_and_target_from_a_hand_made_prediction_matrix() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    predictions = torch.tensor([2, 2, 2, 1, 2, 2, 2, 0])
    found = collapse_shares(predictions, labels, 4)
    assert found.modal_class == 2
    # six images outside class 2, four of them predicted 2
    assert found.share == pytest.approx(4 / 6)
    torch.testing.assert_close(found.shares, torch.tensor([1 / 6, 0.0, 4 / 6, 0.0], dtype=torch.float64))


def test_collapse_rejects_bad_predictions() -> None:
    with pytest.raises(ValueError):
        collapse_shares(torch.tensor([0, 5]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError):
        collapse_shares(torch.tensor([0]), torch.tensor([0, 1]), 4)


# ---------------------------------------------------------------- the combination

SPEC4 = ModelSpec(arch="small_cnn", num_classes=4, in_channels=1, input_size=(8, 8), mean=(0.5,), std=(0.5,))


def _score(top_margin: float, share: float, modal: int = 1) -> tuple[float, int | None]:
    margin = class_statistics(torch.tensor([1.0, top_margin, 1.2, 0.9], dtype=torch.float64))
    shares = torch.full((4,), (1 - share) / 3, dtype=torch.float64)
    shares[modal] = share
    collapse = collapse_shares(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 4)
    collapse = type(collapse)(shares=shares, modal_class=modal, share=share, unlearning=None)
    score, _, target, signals, per_class, _, _ = combine(SPEC4, margin, collapse)
    assert [row["class"] for row in per_class] == [0, 1, 2, 3]
    assert set(signals) == {"max_margin", "unlearning_collapse", "agreement", "intercept"}
    return score, target


def test_score_is_monotone_in_each_signal() -> None:
    margins = [1.3, 1.6, 2.0, 3.0, 6.0, 20.0]
    by_margin = [_score(m, 0.5)[0] for m in margins]
    assert all(a <= b for a, b in itertools.pairwise(by_margin))
    by_share = [_score(2.0, s)[0] for s in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert all(a <= b for a, b in itertools.pairwise(by_share))
    assert _score(3.0, 0.8, modal=2)[0] <= _score(3.0, 0.8, modal=1)[0]  # agreement only adds
    for model in (WITH_CLEAN, DATA_FREE):
        assert min(model.margin, model.collapse, model.agreement) >= 0


def test_strong_signals_name_the_target() -> None:
    score, target = _score(30.0, 0.95)
    assert score >= THRESHOLDS_WITH_CLEAN.suspicious and target == 1


def test_sigmoid_extremes() -> None:
    assert sigmoid(-800) == 0.0 and sigmoid(800) == 1.0 and sigmoid(0) == 0.5


# ---------------------------------------------------------------- tiny real models (sklearn digits, 8x8)



def test_clean_tiny_model_is_not_flagged(tiny_models: dict[str, nn.Module], digits: tuple) -> None:
    report = screen(tiny_models["clean"], digits[1], DIGITS_SPEC, FAST)
    assert report.verdict == "clean" and report.target is None, report.signals


def test_backdoored_tiny_model_is_flagged_with_its_target(tiny_models: dict[str, nn.Module], digits: tuple) -> None:
    updates: list[str] = []

    class Recorder:
        def update(self, *, stage: str, step: int, total: int | None, metrics=None) -> None:
            updates.append(stage)

    report = screen(tiny_models["backdoored"], digits[1], DIGITS_SPEC, FAST, progress=Recorder())
    assert report.verdict in ("suspicious", "backdoored"), report.signals
    assert report.target == TARGET
    assert set(updates) == {"screening"}
    doc = report.to_dict()
    assert list(doc) == ["verdict", "score", "target", "signals", "per_class", "thresholds", "timings_s"]
    json.dumps(doc)  # a JSON document
    assert doc["signals"]["unlearning_collapse"]["source"] == "computed"


def test_precomputed_unlearned_predictions_skip_the_unlearning(tiny_models: dict, digits: tuple) -> None:
    clean = digits[1]
    predictions = torch.full_like(clean.y, TARGET)
    report = screen(tiny_models["backdoored"], clean, DIGITS_SPEC, FAST, unlearned_predictions=predictions)
    entry = report.signals["unlearning_collapse"]
    assert entry["source"] == "given" and entry["class"] == TARGET and entry["share"] == 1.0
    assert "unlearning" not in entry


def test_data_free_screening_says_so(tiny_models: dict) -> None:
    report = screen(tiny_models["backdoored"], None, DIGITS_SPEC, FAST)
    assert report.signals["unlearning_collapse"]["skipped"] is True
    assert report.target == TARGET or report.verdict == "clean"


def test_cancel_between_steps(tiny_models: dict, digits: tuple) -> None:
    with pytest.raises(Cancelled):
        screen(tiny_models["clean"], digits[1], DIGITS_SPEC, FAST, should_stop=lambda: True)


# ---------------------------------------------------------------- the CLI

@pytest.fixture()
def cli_files(tmp_path: Path, tiny_models: dict, digits: tuple) -> dict[str, Path]:
    from defense_core.data import save_npz
    from defense_core.loading import save_safetensors

    paths = {"clean_model": tmp_path / "clean.safetensors", "bd_model": tmp_path / "bd.safetensors",
             "spec": tmp_path / "spec.json", "data": tmp_path / "clean.npz", "config": tmp_path / "fast.json"}
    save_safetensors(tiny_models["clean"].state_dict(), paths["clean_model"])
    save_safetensors(tiny_models["backdoored"].state_dict(), paths["bd_model"])
    paths["spec"].write_text(json.dumps(DIGITS_SPEC.to_dict()))
    save_npz(paths["data"], digits[1])
    return paths


FAST_FLAGS = ["--margin-steps", "40", "--margin-images", "4"]


def test_cli_exit_codes_and_json(cli_files: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    base = ["screen", "--spec", str(cli_files["spec"]), "--clean", str(cli_files["data"]), *FAST_FLAGS]
    ok = runner.invoke(app, [*base, "--model", str(cli_files["clean_model"]), "--json"])
    assert ok.exit_code == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert set(doc) == {"verdict", "score", "target", "signals", "per_class", "thresholds", "timings_s"}
    assert doc["verdict"] == "clean" and doc["target"] is None and len(doc["per_class"]) == 10

    flagged = runner.invoke(app, [*base, "--model", str(cli_files["bd_model"]), "--json"])
    assert flagged.exit_code == 1, flagged.stderr
    assert json.loads(flagged.stdout)["target"] == TARGET
    verdict = json.loads(flagged.stdout)["verdict"]
    only_backdoored = runner.invoke(app, [*base, "--model", str(cli_files["bd_model"]), "--fail-on", "backdoored"])
    assert only_backdoored.exit_code == (1 if verdict == "backdoored" else 0)

    bad = runner.invoke(app, [*base, "--model", str(cli_files["spec"])])  # not a model file
    assert bad.exit_code == 2
    missing = runner.invoke(app, ["screen", "--model", str(cli_files["bd_model"]), "--spec", "/nonexistent.json"])
    assert missing.exit_code == 2
    wrong = runner.invoke(app, [*base, "--model", str(cli_files["bd_model"]), "--fail-on", "sometimes"])
    assert wrong.exit_code == 2
